"""GuardedOptimizer in real Keras 3 model.fit (KERAS_BACKEND=torch), checked against Keras' own clipping."""
import importlib.util
import math
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
if importlib.util.find_spec("keras") is None:
    pytest.skip("needs keras", allow_module_level=True)

import gradguard as gg  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _keras():
    """Keras and the callbacks built on it (tests/_keras_kit.py), imported when this module's
    first test runs rather than at collection: every xdist worker collects every file, and
    Keras' torch backend takes ~4 s of CPU to import."""
    global keras, GradGuardLogger, GuardedOptimizer, Snapshot, BatchLoss
    import _keras_kit as kit
    if kit.keras.backend.backend() != "torch":  # keras was imported earlier with another backend
        pytest.skip("needs KERAS_BACKEND=torch")
    keras, GradGuardLogger, GuardedOptimizer = kit.keras, kit.GradGuardLogger, kit.GuardedOptimizer
    Snapshot, BatchLoss = kit.Snapshot, kit.BatchLoss

BATCH = 8


def data(n=32, seed=0, nan_batch=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 5)).astype("float32")
    y = (x.sum(axis=(1, 2)) * 10).astype("float32")[:, None]  # large targets: large gradients
    if nan_batch is not None:
        x[nan_batch * BATCH] = np.nan
    return x, y


def model(seed=0):
    keras.utils.set_random_seed(seed)
    # Fixed names: variable paths (the guard's layer names) must match across models.
    return keras.Sequential([keras.Input((6, 5)), keras.layers.LSTM(4, name="lstm"),
                             keras.layers.Dense(1, name="head")], name="net")


def fit(opt, steps_data=None, seed=0, callbacks=(), epochs=1):
    m = model(seed)
    m.compile(optimizer=opt, loss="mse")
    x, y = steps_data if steps_data is not None else data()
    h = m.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=list(callbacks))
    return m, h


@pytest.mark.parametrize("keras_kw, policy", [
    ({"clipvalue": 0.05}, gg.Value(0.05)),
    ({"clipnorm": 0.3}, gg.PerTensorNorm(0.3)),
    ({"global_clipnorm": 0.5}, gg.GlobalNorm(0.5)),
])
def test_clipping_matches_keras(keras_kw, policy):
    ref, _ = fit(keras.optimizers.SGD(0.05, **keras_kw))
    opt = GuardedOptimizer(keras.optimizers.SGD(0.05), clip=policy)
    got, h = fit(opt, callbacks=[GradGuardLogger()])
    plain, _ = fit(keras.optimizers.SGD(0.05))
    assert h.history["gradguard/clip_coef_min"][0] < 0.5  # the threshold bites
    for a, b, c in zip(got.get_weights(), ref.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    assert any(not np.allclose(a, c, rtol=1e-3) for a, c in zip(got.get_weights(), plain.get_weights()))


@pytest.mark.parametrize("clip", [None, gg.GlobalNorm(1.0)])
def test_nan_batch_is_skipped_bitwise(clip):
    opt = GuardedOptimizer(keras.optimizers.SGD(0.01, momentum=0.9), clip=clip)
    snap = Snapshot(2, opt)
    m, h = fit(opt, data(nan_batch=2), callbacks=[snap, GradGuardLogger(per_batch=True)])
    assert all(np.isfinite(w).all() for w in m.get_weights())
    for a, b in zip(snap.before[0] + snap.before[1], snap.after[0] + snap.after[1]):
        np.testing.assert_array_equal(a, b)
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 3  # 4 batches, 1 withheld
    assert opt.guard.skipped_steps == 1
    ev = [e for e in opt.guard.events if e.kind == "nonfinite"]
    assert [e.step for e in ev] == [2] and ev[0].layers
    assert h.history["gradguard/skipped"] == [1] and h.history["gradguard/nonfinite"] == [1]
    assert math.isfinite(h.history["gradguard/global_norm_mean"][0])


def test_history_per_epoch_and_state_round_trip():
    opt = GuardedOptimizer(keras.optimizers.Adam(1e-2), clip=gg.GlobalNorm(1.0))
    _, h = fit(opt, data(nan_batch=1), callbacks=[GradGuardLogger()], epochs=2)
    assert h.history["gradguard/steps"] == [4, 4]
    assert h.history["gradguard/skipped"] == [1, 1]  # the NaN row is in every epoch
    assert h.history["gradguard/events_total"] == [1, 2]
    opt2 = GuardedOptimizer(keras.optimizers.Adam(1e-2), clip=gg.GlobalNorm(1.0))
    m2 = model()
    opt2.build(m2.trainable_variables)
    opt2.guard.load_state_dict(opt.guard.state_dict())
    assert opt2.guard.state_dict() == opt.guard.state_dict()
    assert opt2.guard.steps == 8
    assert opt2.guard.names[0] == "net/lstm/lstm_cell/kernel"


def test_arguments_are_checked():
    with pytest.raises(TypeError, match="inner_optimizer"):
        GuardedOptimizer("sgd")
    with pytest.raises(TypeError, match="clip"):
        GuardedOptimizer(keras.optimizers.SGD(), clip=0.5)
    with pytest.raises(ValueError, match="clipped twice"):
        GuardedOptimizer(keras.optimizers.SGD(clipvalue=0.5), clip=gg.Value(0.5))
    with pytest.raises(ValueError, match="on_nonfinite"):
        GuardedOptimizer(keras.optimizers.SGD(), on_nonfinite="drop")


def test_raise_mode():
    opt = GuardedOptimizer(keras.optimizers.SGD(0.01), on_nonfinite="raise")
    with pytest.raises(gg.NonFiniteGradientError):
        fit(opt, data(nan_batch=0))


def test_store_loss_is_the_loss_keras_logs(tmp_path):
    opt = GuardedOptimizer(keras.optimizers.SGD(0.01), log_dir=tmp_path / "runs", run_name="k")
    cb = BatchLoss()
    fit(opt, data(nan_batch=2), callbacks=[cb, GradGuardLogger()])
    opt.guard.close()
    loss = gg.RunStore(tmp_path / "runs").steps("k")["loss"].astype(np.float64)
    assert np.isfinite(loss).sum() == 3 and np.isnan(loss[2])  # the NaN batch's loss is NaN
    # Keras' Mean metric of the batch losses (a NaN batch included) is what it logs
    running = np.cumsum(loss) / np.arange(1, len(loss) + 1)
    np.testing.assert_allclose(running[:2], cb.logged[:2], rtol=1e-5)
    assert opt.guard.last_report.loss == pytest.approx(float(loss[-1]))


@pytest.mark.parametrize("bad", [0, 2])
def test_schedule_does_not_advance_on_a_withheld_step(bad):
    def opt():
        sched = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.7)
        return GuardedOptimizer(keras.optimizers.SGD(sched))

    poisoned, cb = opt(), BatchLoss()
    fit(poisoned, data(nan_batch=bad), callbacks=[cb])
    assert int(keras.ops.convert_to_numpy(poisoned.iterations)) == 3 == (
        poisoned.guard.steps - poisoned.guard.skipped_steps)
    # the lr after each batch: the withheld batch leaves it where it was
    ref, rcb = opt(), BatchLoss()
    x, y = data()
    keep = np.r_[0:bad * BATCH, (bad + 1) * BATCH:len(x)]
    fit(ref, (x[keep], y[keep]), callbacks=[rcb])
    np.testing.assert_allclose(np.delete(cb.lr, bad), rcb.lr, rtol=1e-6)
    assert cb.lr[bad] == pytest.approx(0.05 if bad == 0 else cb.lr[bad - 1], rel=1e-6)


def test_nan_loss_with_finite_gradients_is_skipped():
    """Only the loss tells this step apart (its gradients are finite): the guard needs it."""
    calls = {"n": 0}
    POISON_CALL = 4  # Keras may call the loss once more to build: a training step's call either way

    def loss_fn(y, p):
        calls["n"] += 1
        m = keras.ops.mean((y - p) ** 2)
        bad = math.nan if calls["n"] == POISON_CALL else 0.0
        return m + bad * keras.ops.stop_gradient(m)

    opt = GuardedOptimizer(keras.optimizers.SGD(0.01))
    m = model()
    m.compile(optimizer=opt, loss=loss_fn)
    x, y = data()
    m.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert opt.guard.skipped_steps == 1
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 3
    ev = [e for e in opt.guard.events if e.kind == "nonfinite"]
    assert len(ev) == 1 and not ev[0].layers  # the loss, not a gradient, was NaN
    assert all(np.isfinite(w).all() for w in m.get_weights())
