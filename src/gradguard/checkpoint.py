"""Guard checkpoints: the state format's version and the checks a state passes before loading.

``Guard.state_dict()`` saves counters, the clip policy's and detectors' states, remedies,
events and the rows still waiting for their flush; ``check_state`` validates a saved state
against a guard (names, policy, detectors, row layout) and parses it, without changing
anything, so that a state that does not fit never leaves a guard half-loaded.
"""
from __future__ import annotations

import copy

import numpy as np

from ._json import list_to_array
from .detect import ADDED_DEFAULTS
from .events import Event
from .layout import N_GLOBAL

__all__ = ["STATE_VERSION", "check_state"]

STATE_VERSION = 2  # 2: rows pending a flush are saved ("pending")


def check_state(state_dict, names, clip, detectors, params, layout):
    """``(events, pending, rows)`` of a valid ``state_dict`` for rows of ``layout`` (a
    ``RowLayout``); TypeError/ValueError otherwise."""
    width = layout.width
    if not isinstance(state_dict, dict) or "version" not in state_dict:
        raise TypeError("state_dict must be a dict made by Guard.state_dict()")
    if state_dict["version"] > STATE_VERSION:
        raise ValueError(f"state_dict has version {state_dict['version']}; this gradguard reads "
                         f"up to {STATE_VERSION}: upgrade gradguard")
    if list(state_dict["names"]) != names:
        theirs = set(state_dict["names"])
        diff = sorted(theirs.symmetric_difference(names))[:3]
        raise ValueError(f"state_dict was saved for another model (parameter names differ, "
                         f"e.g. {diff})")
    saved = state_dict.get("clip_config", state_dict.get("clip") and {"policy": "?"})
    mine = clip.config() if clip is not None else None
    if "clip_config" in state_dict and (saved or {}).get("policy") != (mine or {}).get("policy"):
        def name(c):
            return "None" if c is None else c.get("policy", "?")
        raise ValueError(f"state_dict was saved with clip={name(saved)}, this guard has "
                         f"clip={name(mine)}: its learned state would be lost or misread")
    dets = state_dict.get("detectors", [])
    # fewer states than detectors loads only when the rest were appended to the defaults
    # since (detect.ADDED_DEFAULTS): they start fresh
    if len(dets) > len(detectors) or not all(isinstance(d, ADDED_DEFAULTS) for d in detectors[len(dets):]):
        raise ValueError(f"state_dict has {len(dets)} detector states, the guard has "
                         f"{len(detectors)} detectors")
    trial = copy.deepcopy(clip)  # loaded into copies: a state that fails leaves the guard untouched
    if trial is not None and state_dict.get("clip") is not None:
        trial.load_state_dict(state_dict["clip"])
    keep = {id(p): p for p in params}  # never copy the model's tensors
    for d, sd in zip(copy.deepcopy(detectors, keep), dets):
        d.load_state_dict(sd)
    events = [Event.from_dict(e) for e in state_dict["events"]]
    pending = state_dict.get("pending") or {"steps": [], "rows": []}
    rows = list_to_array(pending["rows"]).astype(np.float32).reshape(len(pending["rows"]), -1) \
        if pending["rows"] else np.zeros((0, width), np.float32)
    # saved before rows held parameter norms (2 blocks) or buffer norms (3 blocks): NaN, not measured
    old = (N_GLOBAL + 2 * layout.n, N_GLOBAL + 3 * layout.n)
    if len(rows) and rows.shape[1] in old and rows.shape[1] != width:
        rows = np.concatenate([rows, np.full((len(rows), width - rows.shape[1]), np.nan, np.float32)], axis=1)
    if len(rows) != len(pending["steps"]) or (len(rows) and rows.shape[1] != width):
        raise ValueError("state_dict['pending'] does not hold rows of this guard's layout")
    return events, pending, rows
