"""Thin adapters that put a ``gradguard.Guard`` inside other training loops.

Each submodule imports its framework when it is imported, never before:
``import gradguard`` (and ``import gradguard.integrations``) stay free of them.

- ``gradguard.integrations.lightning``: ``GradGuardCallback`` for ``lightning.pytorch.Trainer``
- ``gradguard.integrations.transformers``: ``GradGuardCallback`` and ``GuardedTrainer``
  for ``transformers.Trainer``
- ``gradguard.integrations.keras``: ``GuardedOptimizer`` and ``GradGuardLogger`` for Keras 3
"""

__all__: list[str] = []
