"""A blind check of the detectors: runs written after the defaults were chosen, never used to tune.

    python benchmarks/detection/blind.py            # replay the stored runs (seconds)
    python benchmarks/detection/blind.py --rebuild  # train them again first (~45 s on 2 cores)

The corpus (``corpus.py``) holds a seed-1 half that no threshold was tuned on, but its
configurations are the ones the detectors were designed against.  These 24 configurations are
new: other optimizers (RMSprop, AdamW at lr 1), widths, a 4-layer tanh MLP, a wider LM, seeds 2
and 3, and faults *between* the guard's parameter-norm measurements (steps 180-241).  Labels
come from ``corpus.label_run`` (the corpus's rules, unchanged); runs are stored under
``benchmarks/results/detection/blind/`` and scored by ``metrics.py``.  docs/detection.md
reports what they showed.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import corpus as C  # noqa: E402
import metrics  # noqa: E402
from corpus import (CNN, Config, Digits, HeavyTailed, Markov, TinyLM, adam, adamw, lm_loss, mlp,  # noqa: E402
                    seq_model, sgd)

OUT = metrics.RESULTS / "blind"
SEEDS = (2, 3)


def rmsprop(lr):
    return lambda p: torch.optim.RMSprop(p, lr=lr)


def configs() -> list[Config]:
    dseq, dflat, dimg = (lambda: Digits("seq")), (lambda: Digits("flat")), (lambda: Digits("img"))
    lm, reg = (lambda: Markov()), (lambda: HeavyTailed())
    tanh4 = lambda: mlp([64, 48, 48, 48, 10], nn.Tanh)  # noqa: E731
    wide = lambda: mlp([64, 256, 10])  # noqa: E731
    c = [
        Config("x_gru", "sgdm_long", lambda: seq_model("gru", 48), dseq, sgd(0.1, 0.9), 1500),
        Config("x_gru", "sgd_lr40", lambda: seq_model("gru", 48), dseq, sgd(40.0), 300),
        Config("x_lstm", "rmsprop", lambda: seq_model("lstm", 48), dseq, rmsprop(2e-3), 800),
        Config("x_lstm", "rmsprop_lr0.5", lambda: seq_model("lstm", 48), dseq, rmsprop(0.5), 300),
        Config("x_tanh", "adam_long", tanh4, dflat, adam(2e-3), 1500),
        Config("x_tanh", "sgd_lr4", tanh4, dflat, sgd(4.0, 0.9), 300),
        Config("x_wide", "sgd_long_low_loss", wide, dflat, sgd(0.2, 0.9), 2500),
        Config("x_wide", "adam_lr0.3", wide, dflat, adam(0.3), 300),
        Config("x_cnn", "adam_long", CNN, dimg, adam(1e-3), 1500),
        Config("x_cnn", "adamw_lr1", CNN, dimg, adamw(1.0), 300),
        Config("x_lm", "pre_adamw_lr5e-4_long", lambda: TinyLM(True, d=48), lm, adamw(5e-4), 1500, lm_loss),
        Config("x_lm", "post_adamw_lr0.05", lambda: TinyLM(False, d=48), lm, adamw(0.05), 300, lm_loss),
        Config("x_lm", "pre_ramp_1.04", lambda: TinyLM(True, d=48), lm, adamw(1e-3), 500, lm_loss, ramp=(200, 1.04)),
        Config("x_reg", "adam_long", lambda: mlp([16, 64, 64, 1]), reg, adam(1e-3), 2000, F.mse_loss),
        Config("x_reg", "sgd_ramp_1.02", lambda: mlp([16, 64, 64, 1]), reg, sgd(0.01), 600, F.mse_loss, ramp=(200, 1.02)),
        Config("x_bf16", "cnn_adam", CNN, dimg, adam(2e-3), 800, bf16=True),
        Config("x_ft", "restart_x30", tanh4, dflat, sgd(0.02, 0.9), 800, lr_at={400: 30.0}),
    ]
    faults = [
        ("x_tanh", tanh4, dflat, adam(2e-3), F.cross_entropy, "4", "corrupt_weight", 237),
        ("x_tanh", tanh4, dflat, adam(2e-3), F.cross_entropy, "2", "nan_grad", 233),
        ("x_gru", lambda: seq_model("gru", 48), dseq, sgd(0.1, 0.9), F.cross_entropy, "rnn", "inf_forward", 241),
        ("x_wide", wide, dflat, sgd(0.2, 0.9), F.cross_entropy, "0", "corrupt_batch", 199),
        ("x_lm", lambda: TinyLM(True, d=48), lm, adamw(5e-4), lm_loss, "blocks.0.ff.0", "corrupt_weight", 180),
        ("x_reg", lambda: mlp([16, 64, 64, 1]), reg, adam(1e-3), F.mse_loss, "2", "nan_grad", 211),
        ("x_cnn", CNN, dimg, adam(1e-3), F.cross_entropy, None, "lr_spike", 222),
    ]
    for fam, build, data, opt, loss, layer, kind, at in faults:
        c.append(Config(fam, f"fault_{kind}_{layer}", build, data, opt, 400, loss,
                        fault={"kind": kind, "layer": layer, "step": at}))
    return c


def work(args):
    i, seed = args
    torch.set_num_threads(1)
    meta = C.run_one(configs()[i], seed, OUT)
    return {k: meta[k] for k in ("id", "label", "diverge_step", "fault", "seconds")}


def build(jobs: int = 2) -> None:
    import multiprocessing as mp
    todo = [(i, s) for i in range(len(configs())) for s in SEEDS]
    with mp.get_context("spawn").Pool(jobs) as pool:
        for r in pool.imap_unordered(work, todo):
            print(r, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="train the runs again")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    if args.rebuild or not any(OUT.glob("*.npz")):
        t = time.perf_counter()
        build(args.jobs)
        print(f"trained in {time.perf_counter() - t:.0f} s")
    from gradguard.detect import default_detectors
    res = metrics.evaluate(metrics.load_runs(OUT), default_detectors, "blind", write=False)
    print(metrics.table(res["scores"], "blind check (seeds 2, 3; configurations new to the detectors)"))
    for s in res["scores"]:
        if s["label"] == "healthy" and not s["fault"] and s["n_flags"]:
            print(f"- {s['id']}: healthy, flagged at step {s['first_flag']} ({s['first_kind']})")
        if s["fault"] and not s.get("fault_flag"):
            print(f"- {s['id']}: the {s['fault']} fault was not flagged (outcome: {s['label']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
