"""Benchmark tasks: the Pascanu et al. 2013 synthetic problems, the seeds'
image-rows-as-sequences experiment, and deep MLPs that explode or vanish."""
from .deep import deep_mlp, exploding_mlp, regression_batch, vanishing_mlp
from .digits import SequenceClassifier, load_digits, load_fashion_mnist, read_idx
from .pascanu import TASKS, PascanuTask, addition, get_task, multiplication, temporal_order

__all__ = [
    "addition", "multiplication", "temporal_order", "PascanuTask", "TASKS", "get_task",
    "SequenceClassifier", "load_digits", "load_fashion_mnist", "read_idx",
    "deep_mlp", "exploding_mlp", "vanishing_mlp", "regression_batch",
]
