"""The seeds' Keras experiment with gradguard: an LSTM reads images row by row,
trained with plain SGD(), then with SGD(clipvalue=0.5) done by gradguard.

    KERAS_BACKEND=torch python examples/keras_seed_lstm.py [--epochs 3]

Data: the 8x8 digits shipped with gradguard (no download), as 8 rows of 8 pixels.
"""
import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402

import gradguard as gg  # noqa: E402
from gradguard.integrations.keras import GradGuardLogger, GuardedOptimizer  # noqa: E402
from gradguard.tools.tasks.digits import load_digits  # noqa: E402


def build(seed=0):
    keras.utils.set_random_seed(seed)
    # The seed's model: LSTM(10) over the rows, Dense(10) logits.
    return keras.Sequential([keras.Input((8, 8)), keras.layers.LSTM(10, name="lstm"),
                             keras.layers.Dense(10, name="logits")], name="seed_lstm")


def run(optimizer, x, y, xt, yt, epochs):
    model = build()
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")])
    hist = model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=[GradGuardLogger()])
    _, acc = model.evaluate(xt, yt, verbose=0)
    return hist.history, acc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--log-dir", default=None, help="gradguard run store (for `gradguard dashboard`)")
    args = ap.parse_args()
    x, y = (t.numpy() for t in load_digits("train"))
    xt, yt = (t.numpy() for t in load_digits("test"))

    for label, clip in [("SGD()", None), ("SGD() + gg.Value(0.5)  (= SGD(clipvalue=0.5))", gg.Value(0.5))]:
        opt = GuardedOptimizer(keras.optimizers.SGD(learning_rate=0.01), clip=clip, log_dir=args.log_dir,
                               run_name=label.split()[-1] if clip else "no-clip")
        hist, acc = run(opt, x, y, xt, yt, args.epochs)
        print(f"{label}: test accuracy {acc:.3f}")
        for e in range(args.epochs):
            print(f"  epoch {e}: loss {hist['loss'][e]:.4f}  "
                  f"max grad norm {hist['gradguard/global_norm_max'][e]:.3g}  "
                  f"min clip coef {hist['gradguard/clip_coef_min'][e]:.3g}  "
                  f"skipped {hist['gradguard/skipped'][e]}")
        opt.guard.close()


if __name__ == "__main__":
    main()
