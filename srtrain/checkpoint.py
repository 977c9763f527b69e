"""Checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint holds everything a run needs to continue with exactly the next batch: model,
optimizer, scheduler, GradScaler and EMA states (``--stage gan``: the discriminator's
weights, optimizer and schedule too), the loader's position, the step and epoch counters,
the best validation score and the config. Everything in it is tensors, numbers,
strings, lists and dicts, so it loads without unpickling arbitrary objects.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from srdata.format import atomic_file

from . import exports
from .config import TrainConfig
from .models import build_model
from .weights import load_error, nonfinite


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
    state = load(path)
    cfg = TrainConfig.from_dict(state["config"])
    model = build_model(cfg.model, cfg.scale, cfg.num_feat, cfg.num_block, cfg.num_grow_ch)
    weights, kind = model_weights(state, ema)
    check_finite(path, weights, kind)
    model.load_state_dict(weights)
    return model.eval()


def check_finite(path: Path, weights: dict, kind: str) -> None:
    """ValueError when ``weights`` (``kind`` "ema", "model" or "net_d") of the checkpoint ``path``
    hold NaN or inf: they would upscale every image to black."""
    bad = nonfinite(weights)
    if bad:
        what = {"ema": "EMA weights", "net_d": "discriminator weights"}.get(kind, "weights")
        raise ValueError(f"{path} holds non-finite {what} "
                         f"(NaN or inf in {bad[0]}{' and more' if len(bad) > 1 else ''}): "
                         "training had diverged when it was saved; use an earlier checkpoint")


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds an srtrain checkpoint (memory-mapped: its tensors are not read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a file torch reads: not ours
        return False
    return isinstance(state, dict) and "config" in state and "model" in state


def plain_weights(state: dict) -> dict:
    """BasicSR's weight file for a checkpoint: ``{"params": ..., "params_ema": ...}``.

    ``params`` are the trained weights, ``params_ema`` the EMA ones when the run kept them
    (BasicSR's ``load_network(param_key="params_ema")`` and Real-ESRGAN's inference take
    ``params_ema`` first). Only contiguous CPU tensors: no AveragedModel counter, no
    ``module.`` prefix, no channels_last strides, so any tool loads it with
    ``torch.load(weights_only=True)`` and a strict ``load_state_dict``.
    """
    out = {"params": _plain(model_weights(state, ema=False)[0])}
    ema, kind = model_weights(state, ema=True)
    if kind == "ema":
        out["params_ema"] = _plain(ema)
    return out


def _plain(sd: dict) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def discriminator_weights(state: dict, ckpt: Path) -> dict:
    """BasicSR's weight file for the discriminator of a ``--stage gan`` checkpoint:
    ``{"params": ...}`` with the spectral norm's ``weight_u``/``weight_v`` (as
    ``RealESRGAN_x4plus_netD.pth`` holds it)."""
    net_d = state.get("net_d")
    if not net_d:
        raise ValueError(f"{ckpt} holds no discriminator (a --stage l1 run, or --gan-weight "
                         "0); drop --discriminator")
    check_finite(ckpt, net_d, "net_d")
    return {"params": _plain(net_d)}


def export(ckpt: Path, out: Path, overwrite: bool = False,
           discriminator: Path | None = None, fmt: str | None = None) -> dict:
    """Write the weights of the checkpoint ``ckpt`` at ``out`` in the format ``fmt`` (see
    srtrain.exports: BasicSR's ``.pth``, a flat ``safetensors`` file, or the model as
    ``onnx``; None: by OUTPUT's extension, else ``pth``), and its discriminator's as BasicSR's ``.pth`` at ``discriminator`` if given
    (atomically; an existing file only with ``overwrite``; both checked before either is
    written). Returns the run's model facts."""
    fmt = exports.resolve_format(fmt, out)
    if fmt == "onnx":
        exports.require_onnx()
    outs = [Path(out)] + ([Path(discriminator)] if discriminator is not None else [])
    if len(outs) == 2 and os.path.abspath(outs[0]) == os.path.abspath(outs[1]):
        raise ValueError(f"the generator and the discriminator would both be written to "
                         f"{outs[0]}; give --discriminator another file (such as net_d.pth)")
    suffix = ".pth" if fmt == "pth" else f".{fmt}"
    for path, name in zip(outs, ("net_g" + suffix, "net_d.pth")):
        if path.is_dir():
            raise ValueError(f"the output {path} is a folder; give a file name such as "
                             f"{path / name}")
        check_output(path, ckpt, overwrite)
    state = load(ckpt)
    weights = plain_weights(state)
    for key, kind in (("params", "model"), ("params_ema", "ema")):
        check_finite(ckpt, weights.get(key, {}), kind)
    cfg = TrainConfig.from_dict(state["config"])
    # the weights the run validated and upscale uses: the EMA ones when kept
    chosen = "params_ema" if "params_ema" in weights else "params"
    if discriminator is not None:  # its refusals come before anything is written
        net_d = discriminator_weights(state, ckpt)
    if fmt == "onnx":
        model = build_model(cfg.model, cfg.scale, cfg.num_feat, cfg.num_block, cfg.num_grow_ch)
        model.load_state_dict(weights[chosen])
        exports.write_onnx(outs[0], model)
    elif fmt == "safetensors":
        exports.write_safetensors(outs[0], weights[chosen])
    else:
        save(outs[0], weights)
    if discriminator is not None:
        save(outs[1], net_d)
    grow = exports.grow_channels(weights["params"])
    return {"model": cfg.model, "scale": cfg.scale, "format": fmt,
            "keys": sorted(weights) if fmt == "pth" else [chosen],
            "tensors": len(weights["params"]),
            "d_tensors": len(net_d["params"]) if discriminator is not None else None,
            "spandrel": (None if fmt == "onnx" else
                         exports.spandrel_note(cfg.model, cfg.scale, grow))}


def keep_checkpoints(out: Path, ckpts, command: str, hint: str = "") -> None:
    """Refuse to write ``out`` over one of ``ckpts`` (however spelled or linked) or any other
    srtrain checkpoint, --overwrite or not: a run resumes from them. ``command``: who
    refuses (export, upscale); ``hint``: what to choose instead."""
    if not out.exists():
        return
    for ckpt in ckpts:
        if os.path.samefile(out, ckpt):
            raise ValueError(f"the output {out} is the checkpoint {ckpt} itself; choose "
                             f"another OUTPUT{hint}")
    if is_checkpoint(out):
        raise ValueError(f"the output {out} is an srtrain checkpoint, which {command} never "
                         f"replaces (--overwrite or not); choose another OUTPUT{hint}")


def check_output(out: Path, ckpt: Path, overwrite: bool) -> None:
    """Refuse to write ``out`` over a checkpoint (keep_checkpoints), and over any other
    existing file unless ``overwrite``."""
    keep_checkpoints(out, [ckpt], "export", " (such as net_g.pth)")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")
