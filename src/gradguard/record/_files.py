"""Run directories on disk: reserving a name, the one-writer lock, text SQLite can store.

A run directory is owned by whoever holds the advisory lock on ``RUN/writer.lock``
(released by the kernel when the process dies, whatever its pid).  A directory that
holds only that lock file and the temporary store, with nobody holding the lock, is
an abandoned reservation (a creation that was killed or failed): the next run of
that name takes it over instead of moving to ``NAME-2``.
"""
from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

from .._json import json_safe
from .schema import DB_NAME, LOCK_NAME, check_run_name

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per run is then not enforced
    fcntl = None

TMP_NAME = DB_NAME + ".tmp"
_OWN_FILES = {LOCK_NAME, TMP_NAME, TMP_NAME + "-journal"}


def _dumps(obj) -> str:
    """Strict JSON (non-finite numbers as "NaN"/"Inf"/"-Inf"); objects JSON lacks as their str."""
    return json.dumps(json_safe(obj), default=str, allow_nan=False)


def _text(s) -> str:
    """Text SQLite can store: a lone surrogate (possible in a module name) is escaped, not fatal."""
    return str(s).encode("utf-8", "backslashreplace").decode("utf-8")


# ------------------------------------------------------------------ locks
def _try_lock(path: Path) -> int | None:
    """Exclusive advisory lock on ``path`` (created if missing): the fd, or None if taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _lock_with_retry(path: Path, tries: int = 20) -> int | None:
    # A reader probing the lock (store.py) holds it for microseconds: retry briefly.
    for i in range(tries):
        fd = _try_lock(path)
        if fd is not None:
            return fd
        if i == 0:
            gc.collect()  # a guard dropped without close() in this process frees its run when collected
        time.sleep(0.01)
    return None


def _unlock(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)  # closing the only fd releases the flock
        except OSError:
            pass


def _reserve_run_dir(log_dir: Path, run_name: str | None) -> tuple[str, Path, int]:
    """Create (or take over an abandoned) run directory and lock it; never reuse a run."""
    base = check_run_name(run_name) if run_name is not None else time.strftime("%Y%m%d-%H%M%S")
    for i in range(10_000):
        name = base if i == 0 else f"{base}-{i + 1}"
        path = log_dir / name
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                continue
        try:
            fd = _try_lock(path / LOCK_NAME)
        except OSError:
            continue
        if fd is None:
            continue  # a live writer (or a creator racing us) owns it
        try:
            left = {p.name for p in path.iterdir()}
        except OSError:
            left = {DB_NAME}
        if not left <= _OWN_FILES:  # a real run, or someone else's directory
            _unlock(fd)
            continue
        for f in left - {LOCK_NAME}:  # debris of a creation that was killed
            try:
                (path / f).unlink()
            except OSError:
                pass
        return name, path, fd
    raise RuntimeError(f"could not find a free run name starting with {base!r} in {log_dir}")


class _Vanished(RuntimeError):
    pass

