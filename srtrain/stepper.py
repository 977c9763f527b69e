"""The L1 step: one batch in, the optimizer, LR schedule, gradient scaler and EMA moved on.

``Stepper`` is what the trainer calls per batch (autocast, channels_last, fused AdamW,
accumulation, CUDA graphs' step marks); the schedules and the EMA's warm-up are here too, as
the GAN stage's step (``srtrain.gan``) shares them.
"""
from __future__ import annotations

import math
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from .config import AMP_DTYPES, TrainConfig


class WeightEMA:
    """The generator's exponential moving average, for both stages' steppers: ``ema`` (an
    AveragedModel, None at decay 0). From random weights its decay is warmed up
    (``ema_decay``) by a count kept on the host; from loaded weights (``--init-weights``)
    it is the plain decay from the first update, as BasicSR's, since the EMA then starts
    from weights worth keeping (the GAN stage starts from RealESRNet's)."""

    def init_ema(self, model, decay: float, warmup: bool = True) -> None:
        self.model, self.ema_max, self.ema_updates = model, decay, 0
        self.ema_warmup = warmup
        self.ema = AveragedModel(model, multi_avg_fn=self._ema_update) if decay else None

    def _ema_update(self, ema_params, params, _n_averaged) -> None:
        # the decay counted on the host: reading n_averaged would sync with the GPU
        decay = (ema_decay(self.ema_max, self.ema_updates) if self.ema_warmup
                 else self.ema_max)
        torch._foreach_lerp_(ema_params, params, 1 - decay)

    def step_ema(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)
            self.ema_updates += 1

    def ema_state(self) -> dict:
        """The EMA's keys in a stepper's state. The warm-up is saved, not derived again: a
        resumed run may drop --init-weights."""
        return {"ema": self.ema.state_dict() if self.ema is not None else None,
                "ema_warmup": self.ema_warmup}

    def load_ema(self, state: dict) -> None:
        self.ema_warmup = bool(state.get("ema_warmup", True))  # older checkpoints: warmed up
        saved = state.get("ema")
        if self.ema is not None and saved is not None:
            self.ema.load_state_dict(saved)
            self.ema_updates = int(self.ema.n_averaged)


class Stepper(WeightEMA):
    """Forward, backward and (every ``accum`` micro-batches) the optimizer step.

    AMP in one code path: autocast and the GradScaler are switched by ``enabled``."""

    def __init__(self, cfg: TrainConfig, model, net, device, amp: str, total_steps: int):
        self.model, self.net, self.accum = model, net, cfg.accum
        self.graphs = cfg.cuda_graphs  # with --compile: check_cuda_graphs refuses it without
        self.dtype, self.device = AMP_DTYPES[amp], device
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                     weight_decay=cfg.weight_decay,
                                     fused=device.type == "cuda")
        self.schedule, self.lr = cfg.schedule, cfg.lr
        self.sched = make_scheduler(self.opt, cfg.schedule, cfg.lr, total_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.init_ema(model, cfg.ema, warmup=not cfg.init_weights)
        self.micro = 0

    def replan(self, total_steps: int, done: int) -> None:
        """Re-plan the LR schedule over ``total_steps`` as if the run had been started with
        them, and continue it at step ``done``: the LR becomes the new plan's LR there."""
        for group in self.opt.param_groups:
            group["lr"] = self.lr  # fresh schedulers start from the initial LR
        self.sched = make_scheduler(self.opt, self.schedule, self.lr, total_steps)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(done):  # 1M steps take ~2 s; closed forms differ per scheduler
                self.sched.step()

    def __call__(self, lr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Train on one batch; (its loss, still on the device; whether a step was taken)."""
        if self.graphs:  # this step's outputs may overwrite the last step's
            torch.compiler.cudagraph_mark_step_begin()
        last = (self.micro + 1) % self.accum == 0
        sync = self.net.no_sync() if hasattr(self.net, "no_sync") and not last else nullcontext()
        with sync:
            with torch.autocast(self.device.type, dtype=self.dtype,
                                enabled=self.dtype != torch.float32):
                sr = self.net(lr)
            loss = F.l1_loss(sr.float(), hr.float())
            self.scaler.scale(loss / self.accum).backward()
        self.micro += 1
        if not last:
            return loss.detach(), False
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.step_ema()
        return loss.detach(), True

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(), **self.ema_state()}

    def load_state_dict(self, s: dict) -> None:
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        self.scaler.load_state_dict(s["scaler"])
        self.load_ema(s)


def ema_decay(decay: float, updates: int) -> float:
    """The EMA decay for the update after ``updates`` earlier ones: ``decay`` once
    (1 + n) / (10 + n) exceeds it (n ~ 9000 for 0.999), less before, so a short run's EMA
    is not mostly its random initial weights (TensorFlow's ExponentialMovingAverage rule)."""
    return min(decay, (1 + updates) / (10 + updates))


# BasicSR's train_RRDBNet_PSNR_x4: CosineAnnealingRestartLR, periods [250k] * 4 of its 1M
# iterations, restart weights 1, eta_min 1e-7
RESTARTS, ETA_MIN = 4, 1e-7


def cosine_restarts(step: int, total_steps: int, lr: float) -> float:
    """LR factor at ``step``: RESTARTS equal cosine periods from lr down to ETA_MIN, each
    starting again at lr (a period's last step reaches ETA_MIN, as in BasicSR)."""
    period = total_steps / RESTARTS
    i = min(RESTARTS - 1, max(0, math.ceil(step / period) - 1))
    floor = min(ETA_MIN / lr, 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - i * period) / period))


def total_steps(epochs: int, accum: int, batches_in) -> int:
    """Optimizer steps of epochs 0 to ``epochs - 1``: the span of the OneCycle and cosine
    schedules. ``batches_in(epoch)``: the loader's batches that epoch. With a patch schedule
    and ``--batch-schedule pixels`` an epoch's steps change per stage; the LR schedule spans
    their sum, so it warms up and anneals once over the whole run, not once per stage."""
    return sum(batches_in(e) // accum for e in range(epochs))


def make_scheduler(opt, schedule: str, lr: float, total_steps: int):
    if schedule == "onecycle":
        # cycle_momentum off: Adam's betas stay 0.9/0.99 as in the reference recipes
        # (OneCycleLR would otherwise swing beta1 between 0.85 and 0.95)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps,
                                                   cycle_momentum=False)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    if schedule == "cosine_restarts":
        # a closed form of the step: the scheduler's saved state is just its step count
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: cosine_restarts(step, total_steps, lr))
    raise ValueError(f"got schedule={schedule!r}, expected onecycle, cosine, constant or "
                     "cosine_restarts")
