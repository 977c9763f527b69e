"""How the training step's kernels run: cuDNN autotuning, TF32, torch.compile and CUDA
graphs, each as the config says; ``auto`` made concrete for this machine."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import sysconfig
from pathlib import Path

import torch

from .config import TrainConfig
from .models import repeated_blocks


def set_kernels(cfg: TrainConfig, device: torch.device) -> None:
    """cuDNN autotuning and TF32 as ``cfg`` says (process-wide torch switches; CUDA only).

    Training shapes are fixed (one batch size, one patch), so cudnn.benchmark's one-off
    search per shape pays on every later step (BasicSR sets it too). TF32 matters for fp32
    runs (``--amp off``); bf16/fp16 autocast convolutions do not use it. Set through the
    APIs torch has kept since 1.12: mixing the legacy flags with torch 2.9's
    ``fp32_precision`` makes later reads of either raise."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")


def compiler_missing(device: torch.device) -> str | None:
    """Why torch.compile cannot build this GPU's kernels here, in words; None when it can.

    Triton writes them, and at the first call builds a small C launcher with the system's
    C compiler (``CC``, else gcc or clang) against Python's headers: a slim container
    without them fails there, inside the first training step."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return "no C compiler for Triton (install gcc, or set CC)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "no Python headers for Triton (install python3-dev)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return f"Triton needs compute capability 7.0, the GPU has {major}.{minor}"
    return None


def resolve_compile(cfg: TrainConfig, device: torch.device,
                    world_size: int = 1) -> tuple[TrainConfig, str | None]:
    """``cfg`` with ``--compile auto`` and ``--cuda-graphs``' default made concrete, and
    why auto compiles nothing on a GPU (None where it compiles, or off the GPU).

    auto: the repeated blocks compiled, replayed as CUDA graphs, on one GPU. On an H100
    that made esrgan's step 353 img/s against 234 uncompiled, fed by DALI 332 against 188,
    for a first step of 8-16 s (benchmarks/results/h100-2026-11-28). Off on the CPU, where
    compiling costs more than it saves in a test or demo, and under torchrun, where no
    GPU run has tried it. The graphs need ``--accum 1`` (check_cuda_graphs)."""
    one_gpu = device.type == "cuda" and world_size == 1
    how, why = cfg.compile, None
    if how == "auto":
        why = compiler_missing(device) if one_gpu else None
        how = "blocks" if one_gpu and why is None else "off"
    graphs = cfg.cuda_graphs
    if graphs is None:
        graphs = how == "blocks" and one_gpu and cfg.accum == 1
    return dataclasses.replace(cfg, compile=how, cuda_graphs=graphs), why


def compile_net(model: torch.nn.Module, net: torch.nn.Module, how: str,
                graphs: bool = False) -> torch.nn.Module:
    """``net`` (``model``, or DDP around it) compiled as --compile says: ``model``, all of it
    by torch.compile; ``blocks``, each block ``model`` repeats, in place (regional
    compilation). RRDBNet's 23 RRDBs then share one compiled graph: esrgan's first step took
    12 s instead of 42 s on 2 CPU cores (benchmarks/results/cpu2-amd-2026-11-27). A model
    without repeated blocks (srcnn) is compiled whole. In-place compilation keeps the state
    dict's keys; copies (the EMA) run eager.

    ``graphs``: torch.compile's ``reduce-overhead`` mode, which records the compiled code's
    kernels once per shape as CUDA graphs and then launches each graph with one call (CUDA
    only; on the CPU the code is compiled as without it)."""
    assert how in ("off", "model", "blocks"), f"resolve_compile first, got {how!r}"
    if how == "off":
        return net
    mode = "reduce-overhead" if graphs else None
    blocks = repeated_blocks(model) if how == "blocks" else []
    if not blocks:
        return torch.compile(net, mode=mode)
    for block in blocks:
        block.compile(mode=mode)
    return net


def check_cuda_graphs(cfg: TrainConfig, world_size: int = 1) -> None:
    """Refuse --cuda-graphs where no GPU run has tried it. A graph's replay writes its
    outputs where the last replay's were, so gradients that outlive a step (kept across
    micro-batches by --accum, or handed to DDP's buckets) are not known to be safe."""
    if not cfg.cuda_graphs:
        return
    if cfg.compile == "off":
        raise ValueError("--cuda-graphs replays the compiled step: add --compile blocks "
                         "(or --compile model)")
    if cfg.accum != 1:
        raise ValueError(f"--cuda-graphs takes --accum 1, got --accum {cfg.accum}; drop one "
                         "of them")
    if world_size != 1:
        raise ValueError(f"--cuda-graphs runs on one GPU, got {world_size} processes; drop "
                         "--cuda-graphs under torchrun")
