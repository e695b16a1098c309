"""Old module paths of the tools, kept working for one release.

``gradguard.demo`` (and ``diagnose``, ``replay``, ``bench``, ``tasks``) moved
to ``gradguard.tools``.  Each old path is a small module that calls
``alias()``: the old name then *is* the new module in ``sys.modules`` (one
module object, so private names and monkeypatching keep working), and a
``DeprecationWarning`` names the new path.
"""
from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType


def moved(old: str, new: str) -> None:
    """Warn, once per import of ``old``, that it moved to ``new``."""
    warnings.warn(f"{old} moved to {new}; the old path goes in the next release",
                  DeprecationWarning, stacklevel=3)


def alias(old: str, new: str, submodules: tuple[str, ...] = ()) -> ModuleType:
    """Make ``old`` (and ``old.<sub>`` for each of ``submodules``) the module ``new``."""
    moved(old, new)
    mod = importlib.import_module(new)
    sys.modules[old] = mod
    for sub in submodules:
        # Registered before anyone asks: otherwise `import old.sub` would load the file a
        # second time under the old name (two copies of every class).
        sys.modules[f"{old}.{sub}"] = importlib.import_module(f"{new}.{sub}")
    return mod
