"""The edges of the install: a light `import gradguard`, the tools' old paths,
one-line errors for missing extras, `--version`, the shipped digits data."""
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard._extras import MissingExtra, require
from gradguard.cli import main

SRC = str(Path(gg.__file__).resolve().parents[1])

# What `import gradguard` must not load: the tools, the run store's writer and
# reader, the web stack, and the old heavy dependencies.
HEAVY = ["gradguard.tools", "gradguard.demo", "gradguard.diagnose", "gradguard.replay", "gradguard.bench",
         "gradguard.tasks", "gradguard.record.store", "gradguard.record.writer", "gradguard.record.schema",
         "gradguard.dashboard", "gradguard.report", "gradguard.sinks",
         "starlette", "uvicorn", "plotly", "sklearn", "rich", "scipy", "matplotlib"]


@pytest.fixture(scope="module")
def _python(fresh_python):
    """``python -c code`` in a fresh interpreter (conftest.fresh_python) with the source on the path."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return lambda code, cwd=None: fresh_python.run(code, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def loaded_after_import(_python) -> frozenset[str]:
    """The modules a fresh interpreter holds after `import gradguard`: one probe, read (never
    changed) by the three tests below, instead of one identical interpreter each."""
    r = _python("import json, sys, gradguard; print(json.dumps(sorted(sys.modules)))")
    assert r.returncode == 0, r.stderr
    return frozenset(json.loads(r.stdout))


def test_import_gradguard_is_light(loaded_after_import):
    loaded = loaded_after_import
    assert "gradguard.guard" in loaded  # the probe sees the package's own modules
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == []


@pytest.mark.parametrize("module", ["sqlite3", "gradguard.record"])
def test_import_gradguard_skips_sqlite(module, loaded_after_import):
    assert "gradguard.guard" in loaded_after_import  # the probe sees the package's own modules
    assert module not in loaded_after_import


def test_lazy_public_names(_python):
    lazy = [("RunStore", "gradguard.record.store"), ("Finding", "gradguard.tools.diagnose"),
            ("diagnose", "gradguard.tools.diagnose"), ("Diagnosis", "gradguard.tools.diagnose")]
    code = "import sys, gradguard as gg\n"
    for name, module in lazy:  # each is loaded by the first access, not before
        code += (f"print({module!r} in sys.modules, {name!r} in dir(gg), end=' ')\n"
                 f"print(gg.{name}.__module__, {module!r} in sys.modules)\n")
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert [l.split() for l in r.stdout.splitlines()] == [
        ["False", "True", "gradguard.record.store", "True"],
        ["False", "True", "gradguard.tools.diagnose", "True"],
        ["True", "True", "gradguard.tools.diagnose", "True"],
        ["True", "True", "gradguard.tools.diagnose", "True"]]


def test_every_public_name_resolves():
    ns = {}
    exec("from gradguard import *", ns)
    assert set(gg.__all__) <= set(ns)
    with pytest.raises(AttributeError, match="no_such_name"):
        gg.no_such_name


OLD_PATHS = [("gradguard.demo", "gradguard.tools.demo"), ("gradguard.replay", "gradguard.tools.replay"),
             ("gradguard.bench", "gradguard.tools.bench"), ("gradguard.tasks", "gradguard.tools.tasks"),
             ("gradguard.tasks.digits", "gradguard.tools.tasks.digits"),
             ("gradguard.tasks.deep", "gradguard.tools.tasks.deep"),
             ("gradguard.tasks.pascanu", "gradguard.tools.tasks.pascanu")]


def test_old_paths_are_the_new_modules(_python):
    # In a fresh interpreter, old paths first (a submodule before its package): a second
    # copy of a module (two SequenceClassifier classes) would only show that way.
    r = _python(f"import importlib, warnings\n"
                f"with warnings.catch_warnings(record=True) as w:\n"
                f"    warnings.simplefilter('always')\n"
                f"    old = [importlib.import_module(o) for o, _ in {OLD_PATHS!r}]\n"
                f"new = [importlib.import_module(n) for _, n in {OLD_PATHS!r}]\n"
                f"print(*[o is n for o, n in zip(old, new)])\n"
                f"print(*sorted({{str(x.message).split()[0] for x in w if x.category is DeprecationWarning}}))\n")
    assert r.returncode == 0, r.stderr
    same, warned = r.stdout.splitlines()
    assert same.split() == ["True"] * len(OLD_PATHS)
    assert warned.split() == ["gradguard.bench", "gradguard.demo", "gradguard.replay", "gradguard.tasks"]


def test_old_from_imports_work(_python):
    r = _python("import warnings; warnings.simplefilter('ignore')\n"
                "from gradguard.tasks.digits import SequenceClassifier, load_digits\n"
                "from gradguard.tasks import get_task\n"
                "from gradguard.demo import run_demo, _cli\n"
                "from gradguard.replay import replay\n"
                "from gradguard.bench import SUITES\n"
                "from gradguard.diagnose import diagnose, Diagnosis, _load_factory\n"
                "import gradguard.tools.tasks.digits as d, gradguard.tools.diagnose as t\n"
                "assert SequenceClassifier is d.SequenceClassifier and diagnose is t.diagnose\n"
                "assert Diagnosis is t.Diagnosis\n")
    assert r.returncode == 0, r.stderr


def test_gg_diagnose_stays_callable_after_the_old_module_is_imported(_python):
    # `import gradguard.diagnose` rebinds the attribute gradguard.diagnose to the module.
    r = _python("import warnings; warnings.simplefilter('ignore')\n"
                "import gradguard as gg, gradguard.diagnose\n"
                "from gradguard.tools.tasks.deep import vanishing_case\n"
                "d = gg.diagnose(*vanishing_case())\n"
                "assert type(d) is gg.Diagnosis, type(d)\n"
                "print(sorted({f.kind for f in d.findings}))\n")
    assert r.returncode == 0, r.stderr
    assert "vanishing" in r.stdout


def test_core_imports_no_tool():
    # The core modules never name gradguard.tools (nor the old tool paths).
    src = Path(gg.__file__).parent
    core = [p for p in src.rglob("*.py") if "tools" not in p.parts and p.name not in
            {"cli.py", "demo.py", "diagnose.py", "replay.py", "bench.py", "tasks.py", "_moved.py", "__init__.py"}]
    assert len(core) > 10
    for p in core:
        text = p.read_text()
        for needle in ("from .tools", "from ..tools", "gradguard.tools", "from .tasks", "from .demo",
                       "from .diagnose", "from .replay", "from .bench"):
            assert needle not in text, (p, needle)


# ------------------------------------------------------------------ the CLI
def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"gradguard {gg.__version__}"


@pytest.mark.parametrize("argv,blocked,extra", [
    (["dashboard", "runs"], "uvicorn", "dashboard"),
    (["dashboard", "runs"], "starlette", "dashboard"),
])
def test_cli_missing_extra_is_one_line_and_exit_2(argv, blocked, extra, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, blocked, None)  # what `import blocked` then fails on
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"gradguard {argv[0]} needs the [{extra}] extra: ")
    assert f'pip install "gradguard[{extra}]"' in lines[0] and f'pip install -e ".[{extra}]"' in lines[0]
    assert lines[0].endswith(f"missing: {blocked}")


def test_cli_script_missing_extra(tmp_path, _python):
    # A fresh interpreter, argv from the command line: no traceback, one line, exit 2.
    r = _python("import sys; sys.modules['uvicorn'] = None; "
                "sys.argv = ['gradguard', 'dashboard', '--port', '0']; "
                "from gradguard.cli import main; raise SystemExit(main())", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "[dashboard]" in r.stderr, r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("factory,blocked,extra", [
    ("TensorBoardSink('tb')", "tensorboard", "tensorboard"),
    ("WandbSink(mode='offline')", "wandb", "wandb"),
    ("MlflowSink()", "mlflow", "mlflow"),
])
def test_sink_missing_extra(factory, blocked, extra, monkeypatch):
    from gradguard import sinks

    monkeypatch.setitem(sys.modules, blocked, None)
    with pytest.raises(MissingExtra) as e:
        eval(factory, vars(sinks))
    msg = str(e.value)
    assert msg.startswith(f"{factory.split('(')[0]} needs the [{extra}] extra: ") and "\n" not in msg
    assert e.value.extra == extra and e.value.missing == [blocked]
    assert isinstance(e.value, ImportError)


@pytest.mark.parametrize("module,blocked,extra", [
    ("gradguard.integrations.lightning", ["lightning", "pytorch_lightning"], "lightning"),
    ("gradguard.integrations.transformers", ["transformers"], "hf"),
    ("gradguard.integrations.keras", ["keras"], "keras"),
])
def test_integration_missing_extra(module, blocked, extra, _python):
    r = _python("import sys\n" + "".join(f"sys.modules[{b!r}] = None\n" for b in blocked) +
                "from gradguard._extras import MissingExtra\n"
                f"try:\n    import {module}\nexcept MissingExtra as e:\n    print(e.extra)\n")
    assert r.returncode == 0 and r.stdout.strip() == extra, r.stderr[-500:]


@pytest.mark.parametrize("modules,missing", [
    (("numpy",), []), (("numpy", "no_such_mod_x"), ["no_such_mod_x"]),
    (("no_such_mod_x.sub", "torch"), ["no_such_mod_x.sub"]), (("os.path", "blocked_mod"), ["blocked_mod"]),
])
def test_require(modules, missing, monkeypatch):
    monkeypatch.setitem(sys.modules, "blocked_mod", None)
    if not missing:
        assert require("x", "y", *modules) is None
        return
    with pytest.raises(MissingExtra) as e:
        require("thing", "extra1", *modules)
    assert e.value.missing == missing
    assert str(e.value) == ('thing needs the [extra1] extra: pip install "gradguard[extra1]" '
                            f'(from a checkout: pip install -e ".[extra1]"); missing: {", ".join(missing)}')


def test_require_accepts_a_stand_in_module(monkeypatch):
    # Tests replace frameworks with stand-ins that have no __spec__; those count as installed.
    monkeypatch.setitem(sys.modules, "fake_fw", type(sys)("fake_fw"))
    require("x", "y", "fake_fw")


def test_core_dependencies_are_torch_and_numpy():
    import tomllib

    meta = tomllib.loads((Path(SRC).parent / "pyproject.toml").read_text())
    deps = sorted(d.split(">")[0].split("=")[0].split("<")[0].strip() for d in meta["project"]["dependencies"])
    assert deps == ["numpy", "torch"]


# ------------------------------------------------------------------ digits data
def test_shipped_digits_data():
    from gradguard.tools.tasks.digits import DIGITS_FILE, load_digits

    with np.load(DIGITS_FILE) as d:
        images, target = d["images"], d["target"]
    # The arrays scripts/make_digits_data.py wrote from sklearn 1.x's load_digits().
    assert hashlib.sha256(images.tobytes()).hexdigest() == \
        "8f26b2bd9d135c256808f68f14fdabddde6d9c7f869ae419704b051f0f14b3b3"
    assert hashlib.sha256(target.tobytes()).hexdigest() == \
        "8ba4f891220f5e4c9c819638d1602d74b83618f167043c6da52a2a247841ddf0"
    assert images.shape == (1797, 8, 8) and images.max() == 16
    assert np.bincount(target).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    assert (len(xtr), len(xte)) == (1438, 359)
    x = torch.cat([xtr, xte])
    assert x.dtype == torch.float32 and torch.equal(torch.unique(x * 16), torch.arange(17.0))


def test_shipped_digits_match_sklearn():
    sk = pytest.importorskip("sklearn.datasets")
    from gradguard.tools.tasks.digits import load_digits

    d = sk.load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    xte, yte = load_digits("test")
    assert torch.equal(xte, x[perm[:359]]) and torch.equal(yte, y[perm[:359]])


def test_demo_needs_no_sklearn_nor_rich(tmp_path, _python):
    r = _python("import sys; sys.modules['sklearn'] = None; sys.modules['rich'] = None\n"
                "from gradguard.cli import main\n"
                f"sys.exit(main(['demo', '--steps', '3', '--log-dir', {str(tmp_path)!r}, '--no-progress']))")
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
