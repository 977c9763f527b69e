"""Plain checks on saved weights, shared by the model loader (``srtrain.models``) and
checkpoints (``srtrain.checkpoint``): why a file did not load, which tensors are not finite.
"""
from __future__ import annotations

import pickle

import torch


def load_error(e: Exception) -> str:
    """Why torch.load(weights_only=True) failed, in one line ("" if it does not say). An
    UnpicklingError's own text advises weights_only=False, which runs whatever the file
    holds: it is not passed on."""
    if isinstance(e, pickle.UnpicklingError):
        return "not tensors and plain data"
    lines = str(e).splitlines()
    return lines[0] if lines else ""


def nonfinite(state_dict: dict) -> list[str]:
    """The names of the floating-point tensors in ``state_dict`` holding NaN or inf."""
    names = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not names:
        return []
    # NaN and inf propagate into a sum: summing is the cheap screen (one host sync, 8x less
    # than isfinite on every element); a sum of finite values that overflowed is told apart
    finite = torch.stack([state_dict[k].sum(dtype=torch.float32) for k in names]).isfinite()
    return [k for k, ok in zip(names, finite.tolist())
            if not ok and not torch.isfinite(state_dict[k]).all()]
