"""The advice catalogue: concrete remedies for each event kind, chosen by the culprits' module types.

A leaf module (numpy-free, imports nothing from gradguard) so that detectors,
the non-finite event builder and the diagnosis can share one wording.
"""
from __future__ import annotations

import math

__all__ = [
    "advice_for", "NONFINITE_ADVICE", "CLIP_ADVICE", "LR_ADVICE", "L2_ADVICE", "NORM_ADVICE",
    "INIT_ADVICE", "ACT_ADVICE", "RNN_ADVICE", "TBPTT_ADVICE", "RECUR_INIT_ADVICE", "ROLLBACK_ADVICE",
    "BATCH_ADVICE", "UNUSED_ADVICE", "AMP_OVERFLOW_ADVICE", "RUNNING_STATS_ADVICE",
]

_RNN_TYPES = ("RNN", "RNNCell")
_GATED_TYPES = ("LSTM", "GRU", "LSTMCell", "GRUCell")
_CONV_PREFIX = "Conv"
_SATURATING = ("Sigmoid", "Tanh", "Hardtanh", "Softsign", "Hardsigmoid")

NONFINITE_ADVICE = [
    "Lower the learning rate (divide by 10) and keep gradient clipping on, e.g. gg.GlobalNorm(1.0).",
    "Look for log(0), division by ~0 or sqrt of a negative in the loss and in the layers named; "
    "add an epsilon there.",
    "Under fp16 autocast, use torch.amp.GradScaler, or bf16 instead.",
    "Check the batch for NaN/Inf inputs or labels (pass batch=... to keep it in the flight record).",
]
RUNNING_STATS_ADVICE = [
    "Check the batches the event's step range covers: an input on another scale (unnormalised "
    "pixels, other units) or corrupted values; validate or clamp inputs in the data pipeline.",
    "Before evaluating or saving, re-estimate the statistics: call reset_running_stats() on the "
    "normalisation layers named and run a few hundred training batches through the model in train "
    "mode under torch.no_grad() (as torch.optim.swa_utils.update_bn does), or restore them from a "
    "checkpoint.",
    "Guard(..., remedies=\"auto\") rolls the model, its running statistics included, back to its "
    "last snapshot on this event.",
]
AMP_OVERFLOW_ADVICE = ["Nothing to do unless this happens on most steps; then check the loss for NaN."]
CLIP_ADVICE = ("Clip the gradients: Guard(..., clip=gg.GlobalNorm(1.0)) (norm), gg.Value(0.5) (value) "
               "or gg.PerLayer({...}) (per-layer thresholds).")
LR_ADVICE = ("Lower the learning rate (divide by 10) or the batch size, or let gradguard back off: "
             "Guard(..., remedies={'exploding': 'lr_backoff'}).")
L2_ADVICE = "Add an L2 weight penalty: loss = loss + gg.penalty(model, l2=1e-4) (or AdamW weight_decay)."
NORM_ADVICE = "Add LayerNorm/BatchNorm between layers, or residual connections; or use fewer layers."
INIT_ADVICE = ("Re-initialise the weights: He (nn.init.kaiming_normal_) for ReLU layers, Xavier "
               "(nn.init.xavier_uniform_) for tanh/sigmoid layers.")
ACT_ADVICE = "Use ReLU, LeakyReLU or ELU instead of sigmoid/tanh activations."
RNN_ADVICE = "Replace nn.RNN with nn.LSTM or nn.GRU: gated units keep long-range gradients bounded."
TBPTT_ADVICE = ("Use truncated BPTT: for chunk, h in gg.tbptt(x, k=..., hidden=h): ... "
                "(the hidden state is detached between chunks).")
RECUR_INIT_ADVICE = ("Initialise the recurrent weight orthogonally (nn.init.orthogonal_) and keep "
                     "its spectral radius at or below 1.")
ROLLBACK_ADVICE = ("Restore the last good state and skip the next batches (PaLM's recipe): "
                   "Guard(..., remedies={'spike': 'rollback'}).")
BATCH_ADVICE = ("Inspect this step's batch (pass guard.step(loss, batch=batch) and a flight recorder "
                "to keep it) for corrupt inputs or labels.")
LAYER_LR_ADVICE = "If only these layers lag, give them a higher learning rate (a separate param group)."
UNUSED_ADVICE = [
    "Check that these layers are used in forward() and that no .detach() or torch.no_grad() cuts "
    "them off the loss.",
    "If they are meant to be frozen, set requires_grad_(False) (and leave them out of the optimizer).",
]

# The same advice by topic, for ``gradguard diagnose`` (one catalogue for both).
TOPICS = {
    "lstm": RNN_ADVICE,
    "tbptt": TBPTT_ADVICE,
    "clip": CLIP_ADVICE,
    "fewer": "Use fewer layers, or add residual connections so gradients have a short path.",
    "relu": ACT_ADVICE,
    "leaky": "Use LeakyReLU or ELU (non-zero slope for negative inputs) so dead units can recover.",
    "init": INIT_ADVICE,
    "norm": NORM_ADVICE,
    "reg": L2_ADVICE,
    "lr": LR_ADVICE,
    "orth": RECUR_INIT_ADVICE,
}


def advice_for(kind: str, layers, owner, all_types, data: dict | None = None) -> list[str]:
    """Concrete remedies for an event of ``kind`` whose culprits are ``layers``.

    Args:
        kind: an event kind.
        layers: culprit parameter names, most responsible first.
        owner: parameter name -> owning module's type name (may be empty).
        all_types: every module type name in the model (may be empty: then
            nothing is known about the model and saturating activations are assumed possible).
        data: the event's numbers (e.g. ``median_norm`` for over_clipping).
    Returns:
        a list of advice strings, the most specific first.
    """
    all_types = set(all_types)
    types = [owner.get(n, "") for n in list(layers)[:3]]
    rnn = any(t in _RNN_TYPES for t in types)
    gated = any(t in _GATED_TYPES for t in types)
    conv = any(t.startswith(_CONV_PREFIX) for t in types)
    saturating = bool(all_types & set(_SATURATING)) or not all_types
    has_norm = any("Norm" in t for t in all_types)
    out: list[str] = []
    if kind in ("exploding", "spike", "diverging"):
        if rnn:
            out += [RNN_ADVICE, TBPTT_ADVICE, RECUR_INIT_ADVICE]
        elif gated:
            out += [TBPTT_ADVICE]
        out += [CLIP_ADVICE, LR_ADVICE]
        if kind == "spike":
            out += [ROLLBACK_ADVICE, BATCH_ADVICE]
        elif kind == "diverging":
            out += [ROLLBACK_ADVICE, INIT_ADVICE]
        else:
            out += [INIT_ADVICE]
            if not has_norm and not (rnn or gated):
                out.append(("Add BatchNorm2d after each convolution. " if conv else "") + NORM_ADVICE)
            out.append(L2_ADVICE)
    elif kind == "loss_spike":
        out += [BATCH_ADVICE, ROLLBACK_ADVICE, CLIP_ADVICE, LR_ADVICE]
    elif kind == "nonfinite":
        if rnn:
            out += [RNN_ADVICE, TBPTT_ADVICE]
        out += NONFINITE_ADVICE
    elif kind == "amp_overflow":
        out += AMP_OVERFLOW_ADVICE
    elif kind == "vanishing":
        if rnn:
            out += [RNN_ADVICE, TBPTT_ADVICE]
        if saturating:
            out.append(ACT_ADVICE)
        out += [INIT_ADVICE, ("Add BatchNorm2d after each convolution; " if conv else "") + NORM_ADVICE]
        out.append(LAYER_LR_ADVICE)
    elif kind == "weight_growth":
        out += [L2_ADVICE, LR_ADVICE, CLIP_ADVICE]
        if not has_norm:
            out.append(NORM_ADVICE)
    elif kind == "over_clipping":
        med = (data or {}).get("median_norm")
        thr = f" (about the median pre-clip norm, {med:.3g})" if med and math.isfinite(med) else ""
        out += [f"Raise the clip threshold{thr}, or use adaptive clipping (gg.AutoClip / gg.ZClip).",
                "If the norm is huge because training is diverging, fix the cause (lower the learning "
                "rate, better init) rather than clipping harder."]
    elif kind == "unused":
        out += UNUSED_ADVICE
    elif kind == "running_stats":
        out += RUNNING_STATS_ADVICE
    return out
