"""The file formats ``srtrain export`` writes, and which tools load them.

``pth``: BasicSR's ``{"params": ..., "params_ema": ...}``. ``safetensors``: one flat state
dict (the EMA weights when kept), as traiNNer-redux saves and spandrel (chaiNNer, ComfyUI)
reads. ``onnx``: the model itself, for ONNX runtimes, chaiNNer and ncnn converters; unlike
the weight files it runs whatever the model's shape.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch

from srdata.format import atomic_file

FORMATS = ("pth", "safetensors", "onnx")
# The newest opset torch's TorchScript exporter writes; ONNX Runtime has read it since 1.12.
ONNX_OPSET = 17
# spandrel builds every ESRGAN with 32 growth channels, whatever the file holds.
SPANDREL_GROW_CH = 32


def resolve_format(fmt: str | None, out: Path) -> str:
    """``fmt`` when given, else ``safetensors`` or ``onnx`` when OUTPUT ends so, else ``pth``."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"got --format {fmt}, expected one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(out).suffix.lower()
    return {".safetensors": "safetensors", ".onnx": "onnx"}.get(suffix, "pth")


def grow_channels(weights: dict) -> int | None:
    """An RRDBNet's ``num_grow_ch`` read off its weights; None for other models (or none)."""
    w = weights.get("body.0.rdb1.conv1.weight")
    return None if w is None else int(w.shape[0])


def spandrel_reason(model: str, scale: int, num_grow_ch: int | None) -> str | None:
    """Why spandrel (the loader of chaiNNer and ComfyUI) cannot run this model's weights
    correctly, or None when it can. It knows RRDBNet only with 32 growth channels, and reads
    an x3 RRDBNet's two upsampling convs as x4."""
    if model == "srcnn" or num_grow_ch is None:
        return "SRCNN is not among its architectures"
    if num_grow_ch != SPANDREL_GROW_CH:
        return f"num_grow_ch {num_grow_ch}; it assumes {SPANDREL_GROW_CH}"
    if scale == 3:
        return "it reads an x3 RRDBNet as x4"
    return None


def spandrel_note(model: str, scale: int, num_grow_ch: int | None) -> str | None:
    """The one line to print after a weight-file export spandrel cannot load; None if it can."""
    why = spandrel_reason(model, scale, num_grow_ch)
    if why is None:
        return None
    can = ("BasicSR and srtrain upscale can" if model != "srcnn" and scale != 3
           else "srtrain upscale can")
    return (f"chaiNNer/ComfyUI (spandrel) cannot load this model's shape ({why}); {can}; "
            "for chaiNNer, ncnn and ONNX tools export --format onnx")


def write_safetensors(path: Path, weights: dict) -> None:
    """``weights`` (contiguous CPU tensors) as one flat safetensors file, atomically."""
    from safetensors.torch import save
    data = save(weights)
    with atomic_file(Path(path), "wb") as f:
        f.write(data)


def require_onnx() -> None:
    """ValueError saying what to install when torch's ONNX exporter cannot run here."""
    try:
        import onnx  # noqa: F401  (torch's exporter writes the file through it)
    except ImportError:
        raise ValueError('--format onnx needs the onnx package: pip install -e ".[onnx]"') \
            from None


def onnx_bytes(model: torch.nn.Module) -> bytes:
    """``model`` as an ONNX graph, fp32: input ``input`` and output ``output``, NCHW RGB,
    with batch, height and width left free."""
    model = model.float().eval()
    # 32 px: even (x2 pixel-unshuffles), small enough to trace the largest model in a second
    example = torch.rand(1, 3, 32, 32)
    axes = {0: "batch", 2: "height", 3: "width"}
    buf = io.BytesIO()
    # The TorchScript exporter needs only the onnx package (the torch.export one also needs
    # onnxscript) and keeps interpolate's scale factor, so height and width stay free.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": axes, "output": axes})
    return buf.getvalue()


def write_onnx(path: Path, model: torch.nn.Module) -> None:
    """``model`` as ONNX (see ``onnx_bytes``) at ``path``, atomically."""
    data = onnx_bytes(model)
    with atomic_file(Path(path), "wb") as f:
        f.write(data)
