"""The yardstick for srtrain's GAN-stage step (``train_throughput.py --stages gan
--reference``): Real-ESRGAN's step written the way BasicSR's
``RealESRGANModel.optimize_parameters`` runs it, and a perceptual loss on random VGG19
weights, so both steps can be timed without the 548 MB ImageNet file.

The reference is what a Real-ESRGAN user's GAN stage costs: fp32, eager, NCHW, torch's
default Adam, the generator's losses summed into one backward with the discriminator
frozen, the discriminator's real and fake passes each with its own backward, the EMA of
the generator updated parameter by parameter in Python, and every logged loss read back
to the host (their ``reduce_loss_dict``). Same networks as srtrain's (RRDBNet, the U-Net
discriminator, VGG19 up to conv5_4), so the two differ only in how the step runs.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from srdata.degrade import usm_sharpen
from srtrain.gan import BETAS, GANConfig
from srtrain.perceptual import PERCEPTUAL_LAYERS, PerceptualLoss, VGGFeatures

VGG_NOTE = "random weights (timing only)"
REFERENCE = ("BasicSR's RealESRGANModel.optimize_parameters: fp32 (TF32 convolutions, as "
             "torch leaves them), eager, NCHW, Adam, separate discriminator passes, "
             "per-parameter EMA, losses read each step")


def random_perceptual(weight: float = 1.0, seed: int = 0) -> PerceptualLoss:
    """srtrain's PerceptualLoss over a VGG19 of random weights: timing does not depend on
    the values. He-scaled, so the features keep their size through the 16 convolutions:
    torch's default initialisation shrinks them towards subnormal floats, which a CPU
    multiplies far more slowly."""
    vgg = VGGFeatures()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in vgg.features:
            if isinstance(layer, nn.Conv2d):
                fan_in = layer.in_channels * 9
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g)
                                   * (2 / fan_in) ** 0.5)
                layer.bias.zero_()
    return PerceptualLoss(vgg, weight)


def _gan_loss(pred: torch.Tensor, real: bool, weight: float = 1.0) -> torch.Tensor:
    """BasicSR's vanilla GANLoss: BCE with logits against a label tensor made per call."""
    target = pred.new_ones(pred.size()) * (1.0 if real else 0.0)
    return weight * F.binary_cross_entropy_with_logits(pred, target)


class ReferenceStep:
    """One Real-ESRGAN GAN-stage iteration per call, in BasicSR's manner (see the module's
    doc); ``(lq, gt)`` fp32 NCHW batches. Same call interface as srtrain's steppers."""

    def __init__(self, model: nn.Module, disc: nn.Module | None, vgg: VGGFeatures | None,
                 gan: GANConfig, lr: float = 1e-4, ema: float = 0.999):
        self.net_g, self.net_d, self.vgg, self.gan = model, disc, vgg, gan
        self.net_g_ema = copy.deepcopy(model).eval() if ema else None
        self.ema_decay = ema
        # torch's default Adam (foreach on a GPU, not fused), as BasicSR builds it
        self.optimizer_g = torch.optim.Adam(model.parameters(), lr=lr, betas=BETAS)
        self.optimizer_d = (torch.optim.Adam(disc.parameters(), lr=lr, betas=BETAS)
                            if disc is not None else None)
        model.train()
        if disc is not None:
            disc.train()

    def _perceptual(self, x: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        # BasicSR's PerceptualLoss: both feature passes outside no_grad, L1 per layer
        x_features, gt_features = self.vgg(x), self.vgg(gt.detach())
        loss = 0
        for name, w in PERCEPTUAL_LAYERS.items():
            loss = loss + F.l1_loss(x_features[name], gt_features[name]) * w
        return loss * self.gan.perceptual_weight

    def __call__(self, lq: torch.Tensor, gt: torch.Tensor) -> tuple[dict, bool]:
        gan = self.gan
        # feed_data sharpens the target per batch; x4plus's D sees the plain one
        gt_usm = usm_sharpen(gt) if gan.usm else gt
        if self.net_d is not None:
            for p in self.net_d.parameters():
                p.requires_grad = False
        self.optimizer_g.zero_grad()
        output = self.net_g(lq)
        l_g_total, loss_dict = 0, {}
        if gan.pixel_weight:
            loss_dict["l_g_pix"] = gan.pixel_weight * F.l1_loss(output, gt_usm)
        if self.vgg is not None:
            loss_dict["l_g_percep"] = self._perceptual(output, gt_usm)
        if self.net_d is not None:
            loss_dict["l_g_gan"] = _gan_loss(self.net_d(output), True, gan.gan_weight)
        for loss in loss_dict.values():
            l_g_total = l_g_total + loss
        l_g_total.backward()
        self.optimizer_g.step()
        if self.net_d is not None:
            loss_dict |= self._d_step(gt, output)
        if self.net_g_ema is not None:
            self._model_ema()
        return {name: v.mean().item() for name, v in loss_dict.items()}, True

    def _d_step(self, gt: torch.Tensor, output: torch.Tensor) -> dict:
        for p in self.net_d.parameters():
            p.requires_grad = True
        self.optimizer_d.zero_grad()
        real_d_pred = self.net_d(gt)
        l_d_real = _gan_loss(real_d_pred, True)
        l_d_real.backward()
        fake_d_pred = self.net_d(output.detach().clone())
        l_d_fake = _gan_loss(fake_d_pred, False)
        l_d_fake.backward()
        self.optimizer_d.step()
        return {"l_d_real": l_d_real, "out_d_real": torch.mean(real_d_pred.detach()),
                "l_d_fake": l_d_fake, "out_d_fake": torch.mean(fake_d_pred.detach())}

    def _model_ema(self) -> None:
        # BasicSR's model_ema: two kernels per parameter, launched from a Python loop
        params = dict(self.net_g.named_parameters())
        for name, ema_param in self.net_g_ema.named_parameters():
            ema_param.data.mul_(self.ema_decay).add_(params[name].data,
                                                     alpha=1 - self.ema_decay)
