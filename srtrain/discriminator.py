"""Real-ESRGAN's discriminator: a U-Net of spectral-normalised convolutions that scores
every pixel of its input as real or generated.

Module names and shapes follow BasicSR's ``UNetDiscriminatorSN`` (conv0 .. conv9, torch's
``spectral_norm`` on conv1 .. conv8, so the state dict holds ``convN.weight_orig``,
``convN.weight_u`` and ``convN.weight_v``): ``RealESRGAN_x4plus_netD.pth`` loads into it
with ``srtrain.models.load_weights`` and its state dict loads into BasicSR. Renaming any
attribute breaks that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm
from torch.nn.utils.spectral_norm import SpectralNorm

# three stride-2 convolutions down, three 2x upsamplings back with skip additions
DOWNSAMPLING = 8


class _FullPrecision:
    """A spectral-norm forward pre-hook run with autocast off. Under CUDA autocast ``mv``
    runs in bf16/fp16 and ``dot`` does not, so the power iteration would lose the
    precision sigma needs (or stop at a dtype mismatch); in float32 it is as in BasicSR."""

    def __init__(self, hook: SpectralNorm):
        self.hook = hook

    def __call__(self, module: nn.Module, inputs) -> None:
        with torch.autocast(module.weight_orig.device.type, enabled=False):
            self.hook(module, inputs)


def _sn(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` with torch's spectral norm, its power iteration kept in float32. The
    iteration updates the ``weight_u``/``weight_v`` buffers in place on every forward in
    training mode, as BasicSR's discriminator does."""
    spectral_norm(conv)
    hooks = conv._forward_pre_hooks
    for key, hook in hooks.items():
        if isinstance(hook, SpectralNorm):
            hooks[key] = _FullPrecision(hook)
    return conv


class UNetDiscriminatorSN(nn.Module):
    """A per-pixel discriminator: logits of shape (N, 1, H, W) for an (N, C, H, W) batch,
    H and W divisible by 8. PyTorch's default initialisation, as BasicSR (trained from
    scratch in Real-ESRGAN)."""

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64, skip_connection: bool = True):
        super().__init__()
        f = num_feat
        self.skip_connection = skip_connection
        self.conv0 = nn.Conv2d(num_in_ch, f, 3, 1, 1)
        self.conv1 = _sn(nn.Conv2d(f, f * 2, 4, 2, 1, bias=False))
        self.conv2 = _sn(nn.Conv2d(f * 2, f * 4, 4, 2, 1, bias=False))
        self.conv3 = _sn(nn.Conv2d(f * 4, f * 8, 4, 2, 1, bias=False))
        self.conv4 = _sn(nn.Conv2d(f * 8, f * 4, 3, 1, 1, bias=False))
        self.conv5 = _sn(nn.Conv2d(f * 4, f * 2, 3, 1, 1, bias=False))
        self.conv6 = _sn(nn.Conv2d(f * 2, f, 3, 1, 1, bias=False))
        self.conv7 = _sn(nn.Conv2d(f, f, 3, 1, 1, bias=False))
        self.conv8 = _sn(nn.Conv2d(f, f, 3, 1, 1, bias=False))
        self.conv9 = nn.Conv2d(f, 1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % DOWNSAMPLING or w % DOWNSAMPLING:
            raise ValueError(f"the discriminator got a {h}x{w} patch, expected sides "
                             f"divisible by {DOWNSAMPLING}; choose another --patch")
        act = _lrelu
        x0 = act(self.conv0(x))
        x1 = act(self.conv1(x0))
        x2 = act(self.conv2(x1))
        x3 = act(self.conv3(x2))
        x4 = self._up(self.conv4, x3, x2)
        x5 = self._up(self.conv5, x4, x1)
        x6 = self._up(self.conv6, x5, x0)
        return self.conv9(act(self.conv8(act(self.conv7(x6)))))

    def _up(self, conv: nn.Module, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """One decoder stage: 2x bilinear upsampling, conv, activation, then the encoder's
        feature map of that size added (the U-Net's skip connection)."""
        y = _lrelu(conv(F.interpolate(x, scale_factor=2, mode="bilinear",
                                      align_corners=False)))
        return y + skip if self.skip_connection else y


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2, inplace=True)
