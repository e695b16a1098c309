"""conftest.fresh_python (tests/_helpers.Zygote) against a real ``python -c``: the same exit
code, stdout and stderr for the shapes of snippet the tests run."""
import os
import subprocess
import sys

import pytest

SNIPPETS = [
    "print('hi'); import sys; print('err', file=sys.stderr)",
    "raise ValueError('boom')",
    "import sys; sys.excepthook = lambda *e: print('hooked', e[0].__name__); raise KeyError(1)",
    "import sys; sys.exit(3)",
    "import sys; sys.exit('a message')",
    "raise SystemExit(None)",
    "import os; print(os.getcwd() == os.environ['WANT_CWD'], os.environ.get('ONLY_HERE'))",
    "import sys; print(sys.path[0] == '', sys.argv)",
    "import atexit; atexit.register(lambda: print('atexit ran'))",
    "import threading, time; threading.Thread(target=lambda: (time.sleep(0.2), print('joined'))).start()",
    "import sys; print(sorted(m for m in ('gradguard', 'lightning', 'sklearn') if m in sys.modules))",
]


@pytest.mark.parametrize("code", SNIPPETS)
def test_fresh_python_behaves_like_python_c(code, fresh_python, tmp_path):
    env = {**os.environ, "WANT_CWD": str(tmp_path), "ONLY_HERE": "1"}
    want = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    got = fresh_python.run(code, env=env, cwd=tmp_path)
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout)
    assert got.stderr.strip().splitlines()[-1:] == want.stderr.strip().splitlines()[-1:]
    assert "ONLY_HERE" not in os.environ  # the child's environment stays the child's


def test_fresh_python_times_out_and_goes_on(fresh_python):
    with pytest.raises(subprocess.TimeoutExpired):
        fresh_python.run("import time; time.sleep(60)", timeout=0.5)
    assert fresh_python.run("print(1)").stdout == "1\n"


SCRIPT = """\
import os, sys
print(sys.argv[1:], os.path.basename(sys.argv[0]), __name__)
print(sys.path[0] == os.path.dirname(os.path.abspath(__file__)))
import helper_next_to_it  # found through sys.path[0], as python puts the script's folder there
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("args", [("0", "a b"), ("4", "--flag")])
def test_fresh_python_runs_a_script_and_a_module_like_python(args, fresh_python, tmp_path):
    pkg = tmp_path / "scripts"
    pkg.mkdir()
    (pkg / "tool.py").write_text(SCRIPT)
    (pkg / "helper_next_to_it.py").write_text("")
    (tmp_path / "mod_here.py").write_text("import sys; print(sys.argv[1:], __name__); sys.exit(int(sys.argv[1]))\n")
    for real, forked in (([str(pkg / "tool.py"), *args], fresh_python.run_script(pkg / "tool.py", *args, cwd=tmp_path)),
                         (["-m", "mod_here", *args], fresh_python.run_module("mod_here", *args, cwd=tmp_path))):
        want = subprocess.run([sys.executable, *real], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert (forked.returncode, forked.stdout, forked.stderr) == (want.returncode, want.stdout, want.stderr)
    assert want.returncode == int(args[0])
