"""A blind check of the detectors: runs written after the defaults were chosen, never used to tune.

    python benchmarks/detection/blind.py            # replay the stored runs (seconds)
    python benchmarks/detection/blind.py --rebuild  # train them again first (~2 min on 2 cores)

The corpus (``corpus.py``) holds a seed-1 half that no threshold was tuned on, but its
configurations are the ones the detectors were designed against.  These 28 configurations are
new: other optimizers (RMSprop, AdamW at lr 1), widths, a 4-layer tanh MLP, a wider LM, batches
of 4 and 8, dropout, a warm-up + cosine schedule, seeds 2 and 3, and faults *between* the
guard's parameter-norm measurements (steps 180-241).  Labels come from ``corpus.label_run`` (the
corpus's rules, unchanged); runs are stored under ``benchmarks/results/detection/blind/`` and
scored by ``metrics.py``.  docs/detection.md reports what they showed.
"""
import argparse
import math
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


def dropout_mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 128), nn.ReLU(),
                         nn.Dropout(0.3), nn.Linear(128, 10))


def warmup_cosine(steps, warm):
    """lr multipliers by step: linear warm-up, then a cosine decay to 0."""
    return {i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / (steps - warm)))
            for i in range(steps)}


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
        # long, noisy healthy runs: batches of 4 and 8, dropout, a warm-up + cosine schedule
        Config("x_noisy", "batch4_sgdm_long", lambda: mlp([64, 64, 64, 10]), lambda: Digits("flat", batch=4),
               sgd(0.02, 0.9), 3000),
        Config("x_noisy", "dropout_adam_long", dropout_mlp, dflat, adam(1e-3), 2500),
        Config("x_lstm", "batch8_adam_long", lambda: seq_model("lstm"), lambda: Digits("seq", batch=8),
               adam(2e-3), 3000),
        Config("x_lm", "pre_warmup_cosine_long", lambda: TinyLM(True), lm, adamw(3e-3), 2000, lm_loss,
               lr_at=warmup_cosine(2000, 100)),
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="train the runs again")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default=None, help="with --rebuild: only the runs whose id contains this")
    args = ap.parse_args(argv)
    if args.rebuild or not any(OUT.glob("*.npz")):
        t = time.perf_counter()
        for r in C.build(args.jobs, args.only, make=configs, seeds=SEEDS, out=OUT):
            print(r)
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
