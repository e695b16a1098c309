"""Moved to ``gradguard.tools.diagnose``; this old path works for one more release.

Unlike the other old paths this one stays a module of its own: importing
``gradguard.diagnose`` makes Python set the attribute ``gradguard.diagnose``
to this module, shadowing the public function ``gg.diagnose``.  So this
module is callable (it calls the function) and hands every other name,
private ones included, on to the new module.
"""
import sys
from types import ModuleType

from ._moved import moved
from .tools import diagnose as _impl

moved(__name__, "gradguard.tools.diagnose")


class _CallableModule(ModuleType):
    def __call__(self, *args, **kwargs):
        return _impl.diagnose(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(_impl, name)


sys.modules[__name__].__class__ = _CallableModule
