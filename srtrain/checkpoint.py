"""Checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint holds everything a run needs to continue with exactly the next batch: model,
optimizer, scheduler, GradScaler and EMA states, the loader's position, the step and epoch
counters, the best validation score and the config. Everything in it is tensors, numbers,
strings, lists and dicts, so it loads without unpickling arbitrary objects.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from srdata.format import atomic_file


def save(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` so that a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as f:
        torch.save(state, f)


def load(path: Path) -> dict:
    """A checkpoint's state; ValueError naming the file when it is not one of ours."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"no checkpoint at {path}") from None
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is not an srtrain checkpoint: torch cannot read it as "
                         "tensors and plain data (another kind of file, a damaged one, or one "
                         "holding code objects)") from None
    except Exception as e:  # torch raises several types for damaged or foreign files
        raise ValueError(f"cannot read checkpoint {path}: "
                         f"{load_error(e) or type(e).__name__}") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"{path} is not an srtrain checkpoint (no model or config in it)")
    return state


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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def model_weights(state: dict, ema: bool = True) -> tuple[dict, str]:
    """(the model's state dict, "ema" or "model"): the EMA weights when asked and kept."""
    saved = state.get("ema")
    if ema and saved:
        # AveragedModel keeps the model under "module." next to its "n_averaged" counter
        return {k[len("module."):]: v for k, v in saved.items()
                if k.startswith("module.")}, "ema"
    return state["model"], "model"


def load_model(path: Path, ema: bool = True) -> torch.nn.Module:
    """The trained model a checkpoint holds, built from its config, in eval mode."""
    from .config import TrainConfig
    from .models import build_model
    state = load(path)
    cfg = TrainConfig.from_dict(state["config"])
    model = build_model(cfg.model, cfg.scale, cfg.num_feat, cfg.num_block, cfg.num_grow_ch)
    weights, kind = model_weights(state, ema)
    bad = nonfinite(weights)
    if bad:  # it would upscale every image to black
        raise ValueError(f"{path} holds non-finite {'EMA ' if kind == 'ema' else ''}weights "
                         f"(NaN or inf in {bad[0]}{' and more' if len(bad) > 1 else ''}): "
                         "training had diverged when it was saved; use an earlier checkpoint")
    model.load_state_dict(weights)
    return model.eval()


def plain_weights(state: dict) -> dict:
    """BasicSR's weight file for a checkpoint: ``{"params": ..., "params_ema": ...}``.

    ``params`` are the trained weights, ``params_ema`` the EMA ones when the run kept them
    (BasicSR's ``load_network(param_key="params_ema")`` and Real-ESRGAN's inference take
    ``params_ema`` first). Only contiguous CPU tensors: no AveragedModel counter, no
    ``module.`` prefix, no channels_last strides, so any tool loads it with
    ``torch.load(weights_only=True)`` and a strict ``load_state_dict``.
    """
    def plain(sd: dict) -> dict:
        return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    out = {"params": plain(model_weights(state, ema=False)[0])}
    ema, kind = model_weights(state, ema=True)
    if kind == "ema":
        out["params_ema"] = plain(ema)
    return out


def export(ckpt: Path, out: Path, overwrite: bool = False) -> dict:
    """Write the weights of the checkpoint ``ckpt`` as BasicSR's ``.pth`` at ``out``
    (atomically; an existing ``out`` only with ``overwrite``). Returns the run's model facts."""
    from .config import TrainConfig
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"the output {out} is a folder; give a file name such as "
                         f"{out / 'net_g.pth'}")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")
    state = load(ckpt)
    weights = plain_weights(state)
    save(out, weights)
    cfg = TrainConfig.from_dict(state["config"])
    return {"model": cfg.model, "scale": cfg.scale, "keys": sorted(weights),
            "tensors": len(weights["params"])}
