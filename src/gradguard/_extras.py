"""Optional pieces of gradguard and the extra that installs each.

A missing extra is reported as one line that names it, never as a traceback
from deep inside a framework's import:

    gradguard dashboard needs the [dashboard] extra: pip install "gradguard[dashboard]" (from a checkout: pip install -e ".[dashboard]"); missing: uvicorn

``require`` only looks modules up (``importlib.util.find_spec``); the
frameworks themselves are still imported where they are used.
"""
from __future__ import annotations

import importlib.util
import sys

__all__ = ["MissingExtra", "require", "install_hint"]


def install_hint(extra: str) -> str:
    return f'pip install "gradguard[{extra}]" (from a checkout: pip install -e ".[{extra}]")'


class MissingExtra(ImportError):
    """An optional dependency is not installed; ``str()`` is the one-line message.

    Attributes:
        what: the piece that needs it (``"gradguard dashboard"``).
        extra: the extra that installs it (``"dashboard"``).
        missing: the modules not found.
    """

    def __init__(self, what: str, extra: str, missing: list[str]):
        self.what, self.extra, self.missing = what, extra, list(missing)
        super().__init__(f"{what} needs the [{extra}] extra: {install_hint(extra)}; "
                         f"missing: {', '.join(self.missing)}", name=self.missing[0])


def _found(module: str) -> bool:
    if module in sys.modules:  # None there means "blocked"; a stand-in module counts as found
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a None entry in sys.modules
        return False


def require(what: str, extra: str, *modules: str) -> None:
    """Raise ``MissingExtra`` unless every one of ``modules`` can be imported.

    Args:
        what: the piece asking, as the user calls it (``"TensorBoardSink"``).
        extra: the extra that installs ``modules``.
        modules: top-level or dotted module names.
    Raises:
        MissingExtra: naming ``extra`` and the modules not found.

    Example:
        >>> require("gradguard dashboard", "dashboard", "starlette", "uvicorn")
    """
    missing = [m for m in modules if not _found(m)]
    if missing:
        raise MissingExtra(what, extra, missing)
