"""The Keras side of test_integration_keras: imported by that module's first test, not when
pytest collects it (every xdist worker collects every file; Keras' torch backend takes ~4 s)."""
import numpy as np

import keras

from gradguard.integrations.keras import GradGuardLogger, GuardedOptimizer  # noqa: F401  (re-exported)


class Snapshot(keras.callbacks.Callback):
    def __init__(self, batch, opt):
        super().__init__()
        self.batch, self.opt, self.before, self.after = batch, opt, None, None

    def _take(self):
        return ([w.copy() for w in self.model.get_weights()],
                [np.array(keras.ops.convert_to_numpy(v)) for v in self.opt.inner_optimizer.variables])

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.batch:
            self.before = self._take()

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            self.after = self._take()


class BatchLoss(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logged, self.lr = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.logged.append(logs["loss"])  # Keras logs the running mean over the epoch
        self.lr.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
