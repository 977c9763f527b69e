"""The one training configuration: built by the CLI, passed down, saved in every checkpoint."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

AMPS = ("auto", "bf16", "fp16", "off")
# torch.compile: auto (srtrain.kernels.resolve_compile: blocks on one GPU, else off), none,
# the whole model, or each repeated block (srtrain.kernels.compile_net)
COMPILES = ("auto", "off", "model", "blocks")
SCHEDULES = ("onecycle", "cosine", "constant", "cosine_restarts")
# l1: the generator alone against L1 (Real-ESRNet); gan: Real-ESRGAN's second stage
STAGES = ("l1", "gan")

# What a resumed run may change: where and how fast it runs, never what it computes.
RESUMABLE_CHANGES = {"resume", "device", "workers", "log_every", "progress", "profile_loader",
                     "cudnn_benchmark", "tf32", "compile", "cuda_graphs",
                     # a run folder may move; init weights only matter before the first step
                     "out", "init_weights", "tensorboard",
                     # compared by database identity, not path text (Trainer._check_data)
                     "db", "val_db", "lr_db",
                     # the validation set's LR: it changes the scores, never the weights
                     "val_lr_db",
                     # the same VGG19 weights may live elsewhere on another machine
                     "vgg_weights",
                     # more (or fewer, not below the epochs done) re-plans the LR schedule
                     "epochs"}


@dataclass(frozen=True)
class TrainConfig:
    db: str
    out: str = "runs/sr"
    loader: str = "dali"
    model: str = "esrgan"
    num_feat: int | None = None
    num_block: int | None = None
    num_grow_ch: int | None = None
    scale: int = 4
    batch_size: int = 32
    patch: int = 256
    epochs: int = 30
    sample_ratio: float = 1.0
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "onecycle"
    accum: int = 1
    amp: str = "auto"
    channels_last: bool = True
    compile: str = "auto"
    ema: float = 0.999
    val_db: str | None = None
    val_split: float = 0.02
    val_images: int = 32
    val_every: int = 1
    early_stop: int | None = None
    save_every: int = 0
    seed: int = 0
    init_weights: str | None = None
    device: str | None = None
    workers: int | None = None
    log_every: int = 50
    resume: bool = False
    profile_loader: bool = False
    progress: bool = True
    lr_db: str | None = None
    val_lr_db: str | None = None
    # CUDA only (srtrain.kernels.set_kernels): cuDNN autotuning and TF32 for fp32 math
    cudnn_benchmark: bool = True
    tf32: bool = True
    # the compiled code's kernels replayed as CUDA graphs (torch.compile's reduce-overhead);
    # None: with compiled blocks on one GPU and --accum 1 (srtrain.kernels.resolve_compile)
    cuda_graphs: bool | None = None
    tensorboard: bool = False
    # progressive patches (srdata.schedule): "PATCH:EPOCH,..."; patch is then its final
    # patch, the validation size. batch_schedule: keep the images or the pixels per step.
    patch_schedule: str | None = None
    batch_schedule: str = "keep"
    # LR made by the loaders (srdata.degrade): nn, bicubic or realesrgan; validation LR
    # (None: the same), with parameters fixed per image; USM-sharpened training targets
    degradation: str = "nn"
    val_degradation: str | None = None
    usm: bool = False
    # the flips drawn per training patch (srdata.sampler.AUGMENTS): "all" 8 symmetries,
    # "hflip" left-right only (Real-ESRGAN's x4plus), "none"; checkpoints from before: "all"
    augment: str = "all"
    # the training stage (srtrain.gan for "gan"): each loss term's weight, 0 turning it
    # off; VGG19's weights for the perceptual loss (None: looked for where torchvision and
    # BasicSR keep them); the discriminator's width. Checkpoints from before: "l1"
    stage: str = "l1"
    pixel_weight: float = 1.0
    perceptual_weight: float = 1.0
    gan_weight: float = 0.1
    vgg_weights: str | None = None
    d_num_feat: int = 64

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "ema" in d and d["ema"] is None:
            d["ema"] = 0.0  # checkpoints from before EMA was on by default: no EMA
        if isinstance(d.get("compile"), bool):  # from before the block mode: a flag
            d["compile"] = "model" if d["compile"] else "off"
        return cls(**d)

    def resume_conflicts(self, saved: "TrainConfig") -> list[str]:
        """Settings that differ from the checkpoint's and would change the computation."""
        return [f"--{f.name.replace('_', '-')}: checkpoint {getattr(saved, f.name)!r}, "
                f"now {getattr(self, f.name)!r}"
                for f in dataclasses.fields(self)
                if f.name not in RESUMABLE_CHANGES
                and getattr(self, f.name) != getattr(saved, f.name)]


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto``: bf16 where the GPU has it, else fp16 with a GradScaler; fp32 on the CPU,
    where training is for tests and demos and autocast mostly slows convolutions down."""
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": torch.float32}


def loader_workers(asked: int | None) -> int:
    """The loader's CPU workers: as asked, or this process's share of the cores (torchrun
    starts one process per GPU on the same machine) less one for the training loop."""
    if asked is not None:
        return asked
    cores = len(os.sched_getaffinity(0))
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)
