"""Shared test helpers: one bitwise comparison and one state snapshot.

Bitwise means the floats' bit patterns: -0.0 != 0.0, and NaN payloads count (two NaNs are
equal only when their bits are), which is what "a skipped step leaves everything untouched"
and "a resume is bitwise" promise.  ``torch.equal`` is not that (-0.0 == 0.0, NaN != NaN),
nor is comparing ``str()`` of a state (4 significant digits).
"""
from __future__ import annotations

import copy
import pathlib
import struct

import numpy as np
import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(x):
    """The bit pattern of a tensor (an integer tensor of the same shape), a numpy array or
    scalar (an unsigned integer array), or a Python float (an int).  Non-floats unchanged."""
    if torch.is_tensor(x):
        x = x.detach()
        if x.is_complex():
            x = torch.view_as_real(x)
        if x.is_floating_point():
            return x.contiguous().view(_INT_OF_SIZE[x.element_size()])
        return x
    if isinstance(x, (np.ndarray, np.generic)):
        a = np.asarray(x)
        return a.view(f"u{a.itemsize}") if a.dtype.kind in "fc" else a
    if isinstance(x, float):
        return struct.unpack("<q", struct.pack("<d", x))[0]
    return x


def assert_bitwise(a, b, path: str = "value") -> None:
    """Deep bitwise equality of tensors, arrays, floats and nested dicts/lists/tuples.

    Tensors must agree in dtype, shape and bits (their device is not compared)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b), (path, type(b))
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(bits(a.cpu()), bits(b.cpu())), (path, a, b)
    elif isinstance(a, (np.ndarray, np.generic)):
        a2, b2 = np.asarray(a), np.asarray(b)
        assert a2.dtype == b2.dtype and a2.shape == b2.shape, path
        assert np.array_equal(bits(a2), bits(b2)), (path, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, set(a) ^ set(b) if isinstance(b, dict) else b)
        for k in a:
            assert_bitwise(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, float) and bits(a) == bits(b), (path, a, b)
    else:
        assert a == b, (path, a, b)


def snapshot(model=None, opt=None, *extra) -> dict:
    """Deep copies of everything a step may change: parameters, buffers, optimizer state
    (and any further ``state_dict``-bearing objects: a scheduler, a scaler, a policy)."""
    out = {}
    if model is not None:
        out["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if opt is not None:
        out["opt"] = copy.deepcopy(opt.state_dict())
    for i, obj in enumerate(extra):
        out[f"extra{i}"] = copy.deepcopy(obj.state_dict())
    return out



_ACTS = {"tanh": lambda w: torch.nn.Tanh(), "relu": lambda w: torch.nn.ReLU(),
         "layernorm": lambda w: torch.nn.LayerNorm(w)}


def mlp(*widths: int, act="tanh", seed: int | None = 0, dtype=None) -> torch.nn.Sequential:
    """The tests' one model factory: ``Linear`` layers through ``widths`` (``mlp(6, 16, 2)`` is
    Linear(6, 16), Tanh, Linear(16, 2)), built after ``torch.manual_seed(seed)`` (None: not
    seeded).  ``act``: ``"tanh"``, ``"relu"``, ``"layernorm"``, or one name per hidden layer."""
    if len(widths) < 2:
        raise ValueError(f"widths needs an input and an output width, got {widths}")
    hidden = len(widths) - 2
    acts = [act] * hidden if isinstance(act, str) else list(act)
    if len(acts) != hidden:
        raise ValueError(f"act names {len(acts)} activations for {hidden} hidden layers")
    if seed is not None:
        torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < hidden:
            layers.append(_ACTS[acts[i]](b))
    model = torch.nn.Sequential(*layers)
    return model if dtype is None else model.to(dtype)


# A "python -c CODE" that does not pay torch's import each time: one process imports torch and
# numpy once, then forks a child per snippet (fork copies the imported modules; nothing else of
# the parent's state exists yet: the zygote runs no torch op and starts no thread).
_ZYGOTE = r"""
import json, os, sys
import numpy, torch  # the expensive part, paid once
base = [p for p in sys.path if p and p not in os.environ.get("PYTHONPATH", "").split(os.pathsep)]
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(req["cwd"])
            os.environ.clear(); os.environ.update(req["env"])
            sys.path[:] = [""] + [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p] + base
            sys.argv = ["-c", *req["argv"]]
            for fd, path in ((1, req["out"]), (2, req["err"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            try:
                exec(compile(req["code"], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
                code = 0
            except SystemExit as e:
                if e.code is None:
                    code = 0
                elif isinstance(e.code, int):
                    code = e.code
                else:
                    print(e.code, file=sys.stderr)
            except BaseException:  # what python does with an uncaught exception
                sys.excepthook(*sys.exc_info())
        finally:
            try:  # what an interpreter does at exit: join non-daemon threads, run atexit
                import atexit, threading
                threading._shutdown()
                atexit._run_exitfuncs()
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


class Zygote:
    """Runs ``python -c CODE`` snippets, each in a fresh child forked from an interpreter that
    has imported only torch and numpy (as a fresh ``python -c`` would have to).  ``run`` returns
    a ``subprocess.CompletedProcess`` like ``subprocess.run(..., capture_output=True, text=True)``."""

    def __init__(self, tmp_dir):
        import subprocess
        import sys

        self.tmp = tmp_dir
        self.n = 0
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def run(self, code: str, env: dict | None = None, cwd=None, timeout: float = 120, argv=()):
        import json
        import os
        import select
        import signal
        import subprocess

        self.n += 1
        out, err = self.tmp / f"out{self.n}", self.tmp / f"err{self.n}"
        req = {"code": code, "env": dict(os.environ if env is None else env), "cwd": str(cwd or os.getcwd()),
               "out": str(out), "err": str(err), "argv": [str(a) for a in argv]}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            self.proc.stdout.readline()
            raise subprocess.TimeoutExpired(["python", "-c", code, *argv], timeout)
        rc = int(self.proc.stdout.readline())
        return subprocess.CompletedProcess(["python", "-c", code, *argv], rc, out.read_text(), err.read_text())

    def run_script(self, path, *args, **kwargs):
        """``python PATH ARGS...`` (``run_path`` as ``__main__``, ``sys.path[0]`` its folder)."""
        code = (f"import runpy, sys; sys.argv = [{str(path)!r}] + sys.argv[1:]; "
                f"sys.path[0] = {str(pathlib.Path(path).parent)!r}; "
                f"runpy.run_path({str(path)!r}, run_name='__main__')")
        return self.run(code, argv=args, **kwargs)

    def run_module(self, module: str, *args, **kwargs):
        """``python -m MODULE ARGS...``."""
        code = (f"import runpy, sys; sys.argv = [{module!r}] + sys.argv[1:]; "
                f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
        return self.run(code, argv=args, **kwargs)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
