"""The GAN stage of Real-ESRGAN (``train_realesrgan_x4plus.yml``): the generator trained
against a U-Net discriminator with pixel, perceptual and adversarial losses.

``GANStepper`` stands beside ``train.Stepper`` with the same interface: per batch one
generator step with the discriminator frozen, then one discriminator step on the real
target and on the detached output, in Real-ESRGAN's order. The L1 and perceptual losses
compare against the USM-sharpened target (their ``gt_usm``), the discriminator sees the
plain one. Each term is logged under Real-ESRGAN's name, weighted as it enters the loss.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from srdata.degrade import usm_sharpen
from srdata.schedule import PatchSchedule

from . import checkpoint
from .config import AMP_DTYPES, TrainConfig
from .discriminator import DOWNSAMPLING, UNetDiscriminatorSN
from .perceptual import PerceptualLoss, load_vgg19
from .stepper import WeightEMA, make_scheduler

# Adam's betas for both nets, as train_realesrgan_x4plus.yml
BETAS = (0.9, 0.99)


@dataclass(frozen=True)
class GANConfig:
    """The GAN stage's settings; a weight of 0 turns its term off (``gan_weight`` 0: no
    discriminator at all). ``usm``: L1 and perceptual losses against the sharpened target."""
    pixel_weight: float = 1.0
    perceptual_weight: float = 1.0
    gan_weight: float = 0.1
    vgg_weights: str | None = None
    d_num_feat: int = 64
    usm: bool = True

    def check(self) -> None:
        for name in ("pixel_weight", "perceptual_weight", "gan_weight"):
            w = getattr(self, name)
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"--{name.replace('_', '-')} {w}: expected a weight >= 0")
        if not (self.pixel_weight or self.perceptual_weight or self.gan_weight):
            raise ValueError("--pixel-weight, --perceptual-weight and --gan-weight are all "
                             "0: give at least one a weight above 0")
        if self.d_num_feat < 1:
            raise ValueError(f"--d-num-feat {self.d_num_feat}: expected 1 or more")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_parts(gan: GANConfig, device: torch.device, channels_last: bool = True
                ) -> tuple[UNetDiscriminatorSN | None, PerceptualLoss | None]:
    """The discriminator (fresh, as Real-ESRGAN trains it) and the perceptual loss (with
    VGG19's weights, found or refused by perceptual.find_vgg_weights) the weights ask for,
    on ``device`` in the memory layout asked for: ready to be wrapped in DDP."""
    gan.check()
    disc = UNetDiscriminatorSN(3, gan.d_num_feat) if gan.gan_weight else None
    percep = (PerceptualLoss(load_vgg19(gan.vgg_weights), gan.perceptual_weight)
              if gan.perceptual_weight else None)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for part in (disc, percep):
        if part is not None:
            part.to(device, memory_format=layout)
    return disc, percep


def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """BasicSR's vanilla GAN loss: BCE with logits against all-1 labels for ``real``, all-0
    for fake, averaged over every logit (the discriminator scores each pixel)."""
    logits = logits.float()
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def nonfinite_weights(state: dict) -> list[str]:
    """The non-finite tensors of a checkpoint's nets (generator, its EMA, discriminator),
    as ``part.tensor`` names: a state with any of them must not be saved or resumed."""
    bad = []
    for part in ("model", "ema", "net_d"):
        bad += [f"{part}.{name}" for name in checkpoint.nonfinite(state.get(part) or {})]
    return bad


class GANStepper(WeightEMA):
    """Generator step, discriminator step, EMA: one call per batch (no accumulation).

    ``model``/``net``: the generator and what runs it (compiled or DDP-wrapped, as for
    Stepper). ``disc``/``percep``: from build_parts; ``disc_net``: what runs ``disc`` in its
    own step (DDP-wrapped under torchrun; the generator step calls ``disc`` itself, whose
    frozen weights get no gradients to synchronise)."""

    def __init__(self, cfg: TrainConfig, gan: GANConfig, model, net, device, amp: str,
                 total_steps: int, disc=None, percep=None, disc_net=None):
        gan.check()
        if cfg.accum != 1:
            raise ValueError(f"the GAN stage steps both nets every batch: give --accum 1, "
                             f"got --accum {cfg.accum}")
        if (disc is None) != (gan.gan_weight == 0) or (percep is None) != (
                gan.perceptual_weight == 0):
            raise ValueError("a discriminator and a perceptual loss go with --gan-weight "
                             "and --perceptual-weight above 0 (build them with build_parts)")
        self.gan, self.model, self.net = gan, model, net
        self.disc, self.percep = disc, percep
        self.disc_net = disc_net if disc_net is not None else disc
        self.accum, self.graphs = 1, cfg.cuda_graphs
        self.dtype, self.device = AMP_DTYPES[amp], device
        self.lr, self.schedule = cfg.lr, cfg.schedule
        fused = device.type == "cuda"
        # AdamW at weight decay 0 (the default) is the Adam of train_realesrgan_x4plus.yml
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=BETAS,
                                     weight_decay=cfg.weight_decay, fused=fused)
        self.sched = make_scheduler(self.opt, cfg.schedule, cfg.lr, total_steps)
        self.opt_d = self.sched_d = None
        if disc is not None:
            disc.train()  # spectral norm's power iteration runs in training mode only
            self.opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=BETAS,
                                           weight_decay=0.0, fused=fused)
            self.sched_d = make_scheduler(self.opt_d, cfg.schedule, cfg.lr, total_steps)
        # one scaler for both nets (torch's multiple-optimizer recipe): updated once a step
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.init_ema(model, cfg.ema, warmup=not cfg.init_weights)
        self.micro = 0

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype,
                              enabled=self.dtype != torch.float32)

    def __call__(self, lr: torch.Tensor, hr: torch.Tensor) -> tuple[dict, bool]:
        """Train on one batch; ({term name: value, still on the device}, True)."""
        if self.graphs:  # this step's outputs may overwrite the last step's
            torch.compiler.cudagraph_mark_step_begin()
        sr, terms = self.g_step(lr, hr)
        if self.disc is not None:
            terms |= self.d_step(sr, hr)
        self.scaler.update()
        self.sched.step()
        if self.sched_d is not None:
            self.sched_d.step()
        self.step_ema()
        self.micro += 1
        return terms, True

    def targets(self, hr: torch.Tensor) -> torch.Tensor:
        """What the L1 and perceptual losses compare against: the sharpened HR, or HR."""
        return usm_sharpen(hr.float()) if self.gan.usm else hr

    def g_step(self, lr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The generator's step, the discriminator frozen; (the output, detached; terms)."""
        gan, terms = self.gan, {}
        if self.disc is not None:
            self.disc.requires_grad_(False)
        target = self.targets(hr) if gan.pixel_weight or gan.perceptual_weight else None
        with self._autocast():
            sr = self.net(lr)
            if gan.pixel_weight:
                terms["l_g_pix"] = gan.pixel_weight * F.l1_loss(sr.float(), target.float())
            if self.percep is not None:
                terms["l_g_percep"] = self.percep(sr, target)
            if self.disc is not None:
                terms["l_g_gan"] = gan.gan_weight * gan_loss(self.disc(sr), real=True)
        loss = sum(terms.values())
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.opt.zero_grad(set_to_none=True)
        terms = {k: v.detach() for k, v in terms.items()}
        terms["loss"] = loss.detach()
        return sr.detach(), terms

    def d_step(self, sr: torch.Tensor, hr: torch.Tensor) -> dict:
        """The discriminator's step: real on the plain HR, fake on the detached output."""
        self.disc.requires_grad_(True)
        terms = {}
        for name, batch, real in (("real", hr, True), ("fake", sr.detach(), False)):
            with self._autocast():
                logits = self.disc_net(batch)
                loss = gan_loss(logits, real)
            # one backward per pass, as Real-ESRGAN: the real pass's graph is freed first
            self.scaler.scale(loss).backward()
            terms[f"l_d_{name}"] = loss.detach()
            terms[f"out_d_{name}"] = logits.detach().float().mean()
        self.scaler.step(self.opt_d)
        self.opt_d.zero_grad(set_to_none=True)
        return terms

    def replan(self, total_steps: int, done: int) -> None:
        """As Stepper.replan, for both nets' schedules."""
        pairs = [(self.opt, "sched"), (self.opt_d, "sched_d")]
        for opt, attr in pairs:
            if opt is None:
                continue
            for group in opt.param_groups:
                group["lr"] = self.lr
            sched = make_scheduler(opt, self.schedule, self.lr, total_steps)
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(done):
                    sched.step()
            setattr(self, attr, sched)

    def state_dict(self) -> dict:
        """Stepper's keys (the generator's optimizer, schedule, scaler, EMA) and the
        discriminator's weights (spectral norm's u and v included), optimizer, schedule."""
        d = self.disc is not None
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(),
                **self.ema_state(),
                "net_d": self.disc.state_dict() if d else None,
                "optimizer_d": self.opt_d.state_dict() if d else None,
                "scheduler_d": self.sched_d.state_dict() if d else None}

    def load_state_dict(self, s: dict) -> None:
        if self.disc is not None and s.get("net_d") is None:
            raise ValueError("the checkpoint holds no discriminator (trained without "
                             "--gan-weight); resume it with --gan-weight 0, or start the GAN "
                             "stage from its weights with --init-weights")
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        self.scaler.load_state_dict(s["scaler"])
        self.load_ema(s)
        if self.disc is not None:
            self.disc.load_state_dict(s["net_d"])
            self.opt_d.load_state_dict(s["optimizer_d"])
            self.sched_d.load_state_dict(s["scheduler_d"])


# -- the trainer's GAN stage -------------------------------------------------------------
def stage_config(cfg: TrainConfig) -> GANConfig:
    """The GAN stage's settings as ``cfg`` (the run's config) holds them."""
    return GANConfig(cfg.pixel_weight, cfg.perceptual_weight, cfg.gan_weight, cfg.vgg_weights,
                     cfg.d_num_feat, cfg.usm)


def build_stage(cfg: TrainConfig, device: torch.device):
    """The discriminator and perceptual loss of a ``--stage gan`` run, built before the run
    reads data or writes a file, so a missing VGG19 or a bad weight is refused first."""
    if cfg.accum != 1:
        raise ValueError(f"--stage gan steps both nets every batch: give --accum 1, got "
                         f"--accum {cfg.accum}")
    patches = [cfg.patch] + ([p for _, p in PatchSchedule.parse(
        cfg.patch_schedule, cfg.batch_size).stages] if cfg.patch_schedule else [])
    odd = [p for p in patches if p % DOWNSAMPLING]
    if cfg.gan_weight and odd:
        raise ValueError(f"the discriminator takes patches whose side is divisible by "
                         f"{DOWNSAMPLING}, got {odd[0]} px; choose another --patch (or "
                         "--patch-schedule)")
    return build_parts(stage_config(cfg), device, cfg.channels_last)


def build_gan_stepper(cfg: TrainConfig, parts, model, net, device: torch.device, amp: str,
                      total_steps: int, d) -> GANStepper:
    """The trainer's GANStepper over ``parts`` (from build_stage); under torchrun
    (``d``: srtrain.ddp.Dist) the discriminator's own step runs it DDP-wrapped."""
    disc, percep = parts
    disc_net = disc
    if disc is not None and d.enabled:
        disc_net = torch.nn.parallel.DistributedDataParallel(
            disc, device_ids=[device.index] if device.type == "cuda" else None)
    return GANStepper(cfg, stage_config(cfg), model, net, device, amp, total_steps, disc,
                      percep, disc_net)
