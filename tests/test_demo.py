"""`gradguard demo` end to end: short mode writes a readable store; the default rescues."""
import io
import math

import pytest
from gradguard.cli import main
from gradguard.tools.demo import run_demo, top_events
from gradguard.events import Event


def test_demo_cli_short_mode_writes_both_runs(tmp_path, capsys):
    log_dir = tmp_path / "runs"
    assert main(["demo", "--steps", "30", "--log-dir", str(log_dir), "--seed", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "unguarded" in out and "guarded" in out and "test accuracy" in out
    # The exact command: the venv's script by path when the venv is not activated.
    from gradguard.tools.demo import _cli

    last = out.rstrip().splitlines()[-1].strip()
    assert last == f"{_cli()} dashboard {log_dir}"
    assert last.split()[0].endswith("gradguard")

    from gradguard.record import RunStore  # the run store: read back what the demo wrote
    store = RunStore(log_dir)
    runs = store.runs()
    assert len(runs) == 2
    by_kind = {("unguarded" if "unguarded" in r["name"] else "guarded"): r for r in runs}
    assert set(by_kind) == {"unguarded", "guarded"}
    for kind, r in by_kind.items():
        steps = store.steps(r["name"])
        assert list(steps["step"]) == list(range(30))
        assert all(math.isfinite(v) for v in steps["loss"])
        assert isinstance(store.events(r["name"]), list)
    assert by_kind["guarded"]["config"]["clip"] is not None
    assert by_kind["unguarded"]["config"]["clip"] is None
    assert by_kind["unguarded"]["config"]["on_nonfinite"] == "warn"


def _quiet():
    return io.StringIO()


def test_demo_is_deterministic_per_seed():
    a = run_demo(steps=30, seed=1, log_dir=None, out=_quiet(), show_progress=False)
    b = run_demo(steps=30, seed=1, log_dir=None, out=_quiet(), show_progress=False)
    c = run_demo(steps=30, seed=2, log_dir=None, out=_quiet(), show_progress=False)
    for x, y in zip(a, b):
        assert (x.loss, x.accuracy, x.max_train_loss, x.clipped) == (y.loss, y.accuracy, y.max_train_loss, y.clipped)
    assert a[0].loss != c[0].loss


@pytest.fixture(scope="module")
def default_demo():
    """One run of the default demo (the same call in both tests below, deterministic per
    seed: test_demo_is_deterministic_per_seed), shared so that the suite pays for it once."""
    buf = io.StringIO()
    ung, gua = run_demo(log_dir=None, out=buf, show_progress=False)
    return ung, gua, buf.getvalue()


def test_default_demo_shows_a_rescue(default_demo):
    # The claim `make demo` makes: same seed, same init; unguarded fails, guarded learns.
    ung, gua, _ = default_demo
    assert ung.accuracy < 0.3 and not (ung.loss < 5)          # chance level, loss blown up (or NaN)
    assert gua.accuracy > 0.8 and gua.loss < 1.0
    assert gua.clipped > 0


def test_default_demo_names_its_explosion_first(default_demo):
    """The unguarded run's explosion is named (kind, culprit layer, step) before step 30, and
    the summary leads with it, before the table."""
    ung, _, text = default_demo
    from gradguard.tools.demo import first_alarm

    alarm = first_alarm(ung.events)
    assert alarm is not None and alarm.step < 30
    assert alarm.kind in ("diverging", "exploding", "spike", "loss_spike") and alarm.layers
    assert text.index("What happened") < text.index("unguarded vs guarded")
    assert f"step {alarm.step}" in text.split("What happened", 1)[1].splitlines()[0]


@pytest.mark.parametrize("argv,needle", [
    (["--steps", "0"], "steps must be a positive int"),
    (["--clip", "-1"], "clip must be a positive"),
    (["--clip", "nan"], "clip must be a positive"),
    (["--task", "fashion"], "needs --data"),
])
def test_demo_bad_arguments_exit_2(argv, needle, tmp_path, capsys):
    assert main(["demo", "--log-dir", str(tmp_path), "--no-progress", *argv]) == 2
    assert needle in capsys.readouterr().out


def test_demo_missing_data_dir(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "nope"), "--no-progress", "--log-dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_top_events_orders_by_severity_and_dedups():
    evs = [Event(5, "spike", "warning", [], "a"), Event(2, "nonfinite", "critical", [], "b"),
           Event(1, "spike", "warning", [], "c"), Event(9, "info_thing", "info", [], "d")]
    assert [(e.kind, e.step) for e in top_events(evs)] == [("nonfinite", 2), ("spike", 1), ("info_thing", 9)]
    assert len(top_events(evs, n=1)) == 1


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream,live", [(io.StringIO, False), (_Tty, True)])
def test_demo_plain_output_and_progress(stream, live):
    # Plain text, no rich: a table row per measure, one finished status line per run;
    # on a terminal the status line is redrawn in place ("\r"), in a log file it is not.
    out = stream()
    ung, gua = run_demo(steps=20, seed=0, log_dir=None, out=out, show_progress=True)
    text = out.getvalue()
    assert ("\r" in text) == live
    finished = [l.split("\r")[-1] for l in text.splitlines() if "20/20" in l]
    assert [l.split()[0] for l in finished] == ["unguarded", "guarded"]
    rows = {l.split("  ")[0]: l for l in text.splitlines() if l.startswith(("test accuracy", "steps run"))}
    assert rows["test accuracy"].split()[-2:] == [f"{100 * ung.accuracy:.1f}%", f"{100 * gua.accuracy:.1f}%"]
    assert rows["steps run"].split()[-2:] == ["20", "20"]
    assert "[bold]" not in text and "[yellow]" not in text


def test_demo_console_argument_still_accepted():
    class Console:  # what rich's Console offered the old signature: a .file to write to
        file = io.StringIO()

    run_demo(steps=5, log_dir=None, console=Console(), show_progress=False)
    assert "test accuracy" in Console.file.getvalue()
