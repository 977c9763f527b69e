"""Super-resolution models: ESRGAN's RRDBNet (three size presets) and SRCNN.

``RRDBNet`` reproduces BasicSR's ``basicsr/archs/rrdbnet_arch.py`` parameter for parameter:
the same module names, shapes, initialisation and forward pass. That is the whole point of
writing it by hand rather than importing basicsr: public ESRGAN / Real-ESRGAN weights
(``RealESRGAN_x4plus.pth``, ``RealESRGAN_x2plus.pth``, ...) load into it unchanged, and
checkpoints trained here load into BasicSR, without basicsr and its dependencies installed.
Renaming any attribute below breaks that compatibility.

``load_weights`` accepts BasicSR's checkpoint wrappers (``params_ema`` / ``params``), our own
trainer checkpoints (``model``) and plain or DDP (``module.``-prefixed) state dicts.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from .weights import load_error, nonfinite

SCALES = (2, 3, 4)


def _check_scale(scale: int) -> None:
    if scale not in SCALES:
        raise ValueError(f"got scale={scale}, expected 2, 3 or 4")


@torch.no_grad()
def default_init_weights(modules, scale: float = 1.0, bias_fill: float = 0.0) -> None:
    """BasicSR's ``default_init_weights``: kaiming normal times ``scale``. The small scale
    keeps each residual branch near zero at the start, so the deep net begins close to
    identity and trains stably."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                init.kaiming_normal_(m.weight)
                m.weight.mul_(scale)
                if m.bias is not None:
                    m.bias.fill_(bias_fill)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; conv ``i`` sees the input plus all earlier outputs."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        default_init_weights([self.conv1, self.conv2, self.conv3, self.conv4, self.conv5], 0.1)

    def forward(self, x):
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        # residual scaling 0.2, as in ESRGAN, keeps the 69 stacked residuals from blowing up
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three RDBs under one more scaled residual."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator, BasicSR-compatible (see the module docstring).

    Scale 4 upsamples twice by nearest x2, each followed by a conv. Scale 2 first
    pixel-unshuffles the input by 2 (so ``conv_first`` takes ``num_in_ch * 4`` channels, as
    RealESRGAN_x2plus expects) and then runs the x4 network. Scale 3 is our own: nearest x3,
    then ``conv_up1`` and ``conv_up2`` at the same resolution, so it has exactly the x4
    parameter names and shapes. BasicSR has no x3 RRDBNet and no public weights exist for
    it: x4 weights load into it but do not produce a sensible x3 image without fine-tuning.
    Only the convs inside the dense blocks get the 0.1-scaled init; the others keep PyTorch's
    default init, as in BasicSR.
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, scale: int = 4,
                 num_feat: int = 64, num_block: int = 23, num_grow_ch: int = 32):
        super().__init__()
        _check_scale(scale)
        self.scale = scale
        first_in = num_in_ch * 4 if scale == 2 else num_in_ch
        self.conv_first = nn.Conv2d(first_in, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x):
        # torch's pixel_unshuffle orders channels as BasicSR's view/permute version does
        # (c, dy, dx), and unlike that version it also accepts channels_last input.
        feat = F.pixel_unshuffle(x, 2) if self.scale == 2 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        first_up = 3 if self.scale == 3 else 2
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=first_up, mode="nearest")))
        if self.scale != 3:
            feat = F.interpolate(feat, scale_factor=2, mode="nearest")
        feat = self.lrelu(self.conv_up2(feat))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


class SRCNN(nn.Module):
    """Dong et al. 2014 (9-5-5). The paper feeds a bicubic-upsampled image; doing the
    upsampling here lets SRCNN take the same LR batches as RRDBNet."""

    def __init__(self, scale: int, num_channels: int = 3, n1: int = 64, n2: int = 32):
        super().__init__()
        _check_scale(scale)
        self.scale = scale
        self.conv1 = nn.Conv2d(num_channels, n1, 9, padding=4)
        self.conv2 = nn.Conv2d(n1, n2, 5, padding=2)
        self.conv3 = nn.Conv2d(n2, num_channels, 5, padding=2)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.conv3(x)


def _rrdb_preset(num_feat: int, num_block: int, num_grow_ch: int):
    def make(scale: int) -> nn.Module:
        return RRDBNet(scale=scale, num_feat=num_feat, num_block=num_block, num_grow_ch=num_grow_ch)
    return make


# CLI name -> factory. Presets take only the scale; "rrdbnet" also takes the three sizes.
MODELS = {
    "esrgan": _rrdb_preset(64, 23, 32),  # the published ESRGAN / Real-ESRGAN size
    "light": _rrdb_preset(32, 12, 16),
    "fast": _rrdb_preset(32, 8, 16),
    "rrdbnet": lambda scale, num_feat, num_block, num_grow_ch: RRDBNet(
        scale=scale, num_feat=num_feat, num_block=num_block, num_grow_ch=num_grow_ch),
    "srcnn": lambda scale: SRCNN(scale),
}


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks a model repeats (RRDBNet's RRDBs), for regional compilation; [] if none."""
    return [m for m in model.modules() if isinstance(m, RRDB)]


def build_model(name: str, scale: int, num_feat: int | None = None,
                num_block: int | None = None, num_grow_ch: int | None = None) -> nn.Module:
    """The model ``--model name --scale scale`` asks for."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}, expected one of {', '.join(MODELS)}")
    sizes = {"num_feat": num_feat, "num_block": num_block, "num_grow_ch": num_grow_ch}
    given = [k for k, v in sizes.items() if v is not None]
    if name == "rrdbnet":
        if len(given) != 3:
            raise ValueError("--model rrdbnet needs all of --num-feat, --num-block and "
                             "--num-grow-ch")
        return MODELS[name](scale, **sizes)
    if given:
        # silently ignoring them would train a different model than the user asked for
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{flags} only apply to --model rrdbnet, not --model {name}")
    return MODELS[name](scale)


# Checked in this order: BasicSR saves both EMA and raw weights, and the EMA ones are the
# ones it evaluates and publishes.
WRAPPER_KEYS = ("params_ema", "params", "model")


def _unwrap(ckpt: Mapping) -> tuple[Mapping, str | None]:
    ema = ckpt.get("ema")
    if "config" in ckpt and isinstance(ema, Mapping) and ema:
        # an srtrain checkpoint that kept an EMA: the weights its validation scored, as
        # BasicSR's params_ema (what Real-ESRGAN's GAN stage starts from); AveragedModel
        # keeps them under "module." beside its "n_averaged" counter
        return {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}, "ema"
    for key in WRAPPER_KEYS:
        if isinstance(ckpt.get(key), Mapping):
            return ckpt[key], key
    return ckpt, None


def _read(source, what: str) -> tuple[Mapping, str]:
    if isinstance(source, Mapping):
        return source, "the given dict"
    name = os.fspath(source)
    try:
        ckpt = torch.load(name, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and OS errors all mean: not loadable weights
        raise ValueError(f"cannot read {what} from {name}: not a readable torch checkpoint "
                         f"({type(e).__name__}: {load_error(e)})") from e
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{what} file {name} holds a {type(ckpt).__name__}, not a state dict")
    return ckpt, name


def _listed(label: str, items: list[str], limit: int = 5) -> str:
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return f"\n  {label} ({len(items)}): {'; '.join(items[:limit])}{more}"


def load_weights(model: nn.Module, source, what: str = "weights") -> str | None:
    """Load ``source`` (a path or an already-loaded dict) into ``model``, strictly.

    Returns the wrapper key the state dict came from (``"ema"`` for an srtrain checkpoint
    that kept one, ``"params_ema"``, ``"params"`` or ``"model"``), or None for a plain state
    dict. Raises ValueError naming the file when it
    cannot be read or does not fit the model.
    """
    ckpt, name = _read(source, what)
    state, key = _unwrap(ckpt)
    # DDP-wrapped models save every key under "module."
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(getattr(v, 'shape', ()))}, model {tuple(own[k].shape)}"
              for k, v in state.items()
              if k in own and (not torch.is_tensor(v) or v.shape != own[k].shape)]
    if missing or unexpected or shapes:
        problems = [_listed(label, items) for label, items in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("shape mismatches", shapes)) if items]
        raise ValueError(f"{what} in {name} do not fit the model (check --model and --scale "
                         "match the weights):" + "".join(problems))
    bad = nonfinite(state)
    if bad:  # training would start from NaN and stop at the first loss it reads
        raise ValueError(f"{what} in {name} hold NaN or inf (in {bad[0]}"
                         f"{' and more' if len(bad) > 1 else ''}); give weights saved before "
                         "their training diverged")
    model.load_state_dict(state, strict=True)
    return key
