"""The Trainer side of test_integration_transformers: imported by that module's first test,
not when pytest collects it (every xdist worker collects every file; transformers' Trainer and
gradguard's integration take ~4 s to import)."""
import transformers

from gradguard.integrations.transformers import GradGuardCallback, GuardedTrainer  # noqa: F401  (re-exported)


class Snapshot(transformers.TrainerCallback):
    def __init__(self, step):
        self.step, self.before, self.after = step, None, None

    @staticmethod
    def _take(model, optimizer):
        opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        return ([p.detach().clone() for p in model.parameters()],
                [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()])

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
        if state.global_step == self.step:
            self.before = self._take(model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        if state.global_step == self.step + 1:
            self.after = self._take(model, optimizer)
