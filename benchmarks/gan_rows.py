"""The GAN stage's rows of ``train_throughput.py --stages gan``: srtrain's step as its
trainer builds it, and beside it (``--reference``) Real-ESRGAN's step written the way BasicSR
runs it (``gan_reference.py``), timed in the same process on one random batch, with img/s,
the first step and peak GPU memory, and the markdown table of them.
"""
from __future__ import annotations

from pathlib import Path

import _common


def _img_s(v) -> str:
    return f"{v:,.1f}" if v >= 10 else f"{v:.2f}"  # a CPU's 0.48, not 0.5


def _gan_step(r: dict) -> str:
    if r["step"] == "reference":
        return "reference (BasicSR's way)"
    return "srtrain" + (" (defaults)" if r.get("srtrain_defaults") else "")


def _gan_rate(r: dict) -> str:
    return "out of memory" if r.get("out_of_memory") else _img_s(r["img_per_s"])


def _gib(r: dict) -> str:
    return "-" if r.get("peak_gpu_gib") is None else f"{r['peak_gpu_gib']:.1f}"


def gan_table(records: list[dict]) -> str:
    """The GAN rows: each step's img/s, its speedup over the BasicSR-style reference timed
    in the same run, first step and peak GPU memory; then, where the rows span several
    batch sizes, srtrain's defaults beside the reference at each."""
    lines = ["| model | step | batch | amp | channels_last | compile | img/s | × reference "
             "| first step | peak GiB |", "|---|---|---:|---|---|---|---:|---:|---:|---:|"]
    for r in records:
        how = (r["compile"] + (" + CUDA graphs" if r.get("cuda_graphs") else "")
               + ("" if r["cudnn_benchmark"] else ", cudnn.benchmark off")
               + ("" if r["tf32"] else ", TF32 off"))
        speedup = r.get("speedup_vs_reference")
        times = ("1×" if r["step"] == "reference" and not r.get("out_of_memory") else
                 f"{speedup:.2f}×" if speedup else "-")
        first = "-" if r.get("first_step_s") is None else f"{r['first_step_s']:.1f} s"
        lines.append(f"| {r['model']} | {_gan_step(r)} | {r['batch_size']} | {r['amp']} | "
                     f"{'on' if r['channels_last'] else 'off'} | {how} | {_gan_rate(r)} | "
                     f"{times} | {first} | {_gib(r)} |")
    if len({r["batch_size"] for r in records}) > 1:
        lines += ["", "| model | batch | srtrain img/s | srtrain peak GiB | reference img/s "
                  "| reference peak GiB |", "|---|---:|---:|---:|---:|---:|"]
        for model, bs in dict.fromkeys((r["model"], r["batch_size"]) for r in records):
            mine = [r for r in records if (r["model"], r["batch_size"]) == (model, bs)]
            ours = next((r for r in mine if r.get("srtrain_defaults")), None)
            ref = next((r for r in mine if r["step"] == "reference"), None)
            cells = [f"{_gan_rate(x)} | {_gib(x)}" if x else "- | -" for x in (ours, ref)]
            lines.append(f"| {model} | {bs} | {cells[0]} | {cells[1]} |")
    env, r = records[0]["env"], records[0]
    lines.append(f"\n{env.get('gpu') or 'no GPU'}, {env['cpus']} CPUs, torch {env['torch']}, "
                 f"{env['date'][:10]}; the GAN stage's step alone on one random batch: patch "
                 f"{r['patch']}, scale {r['scale']}, discriminator width {r['d_num_feat']}, "
                 f"VGG19 {r['vgg']}; {r['steps']} steps timed after {r['warmup']}. Reference: "
                 "Real-ESRGAN's step as BasicSR's RealESRGANModel.optimize_parameters runs it "
                 "(fp32, eager, NCHW, Adam, separate discriminator passes, per-parameter EMA, "
                 "losses read back each step), timed in the same process.")
    return "\n".join(lines) + "\n"


# -- the GAN stage ------------------------------------------------------------------------
def gan_batch(cfg, dev, dtype, channels_last: bool):
    """The GAN rows' one random batch, the same values in every row: (LR by nearest
    neighbour, as the loaders make it by default; HR), in the dtype and layout asked."""
    import torch

    from srdata.sampler import nn_downscale
    g = torch.Generator().manual_seed(cfg.seed)
    hr = torch.rand(cfg.batch_size, 3, cfg.patch, cfg.patch, generator=g).to(dev, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return (nn_downscale(hr, cfg.scale).contiguous(memory_format=fmt),
            hr.contiguous(memory_format=fmt))


def our_gan_step(cfg, dev):
    """srtrain's GAN-stage step as its trainer builds it (``gan.build_gan_stepper``) on
    fresh networks, the perceptual loss on random VGG19 weights; (stepper, lr, hr)."""
    import torch

    from gan_reference import random_perceptual
    from srtrain import ddp, gan
    from srtrain.config import AMP_DTYPES
    from srtrain.discriminator import UNetDiscriminatorSN
    from srtrain.kernels import check_cuda_graphs, compile_net, set_kernels
    from srtrain.models import build_model
    set_kernels(cfg, dev)
    check_cuda_graphs(cfg)
    torch.manual_seed(cfg.seed)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(cfg.model, cfg.scale).to(dev, memory_format=fmt)
    disc = UNetDiscriminatorSN(3, cfg.d_num_feat) if cfg.gan_weight else None
    percep = random_perceptual(cfg.perceptual_weight) if cfg.perceptual_weight else None
    for part in (disc, percep):
        if part is not None:
            part.to(dev, memory_format=fmt)
    net = compile_net(model, model, cfg.compile, cfg.cuda_graphs)
    stepper = gan.build_gan_stepper(cfg, (disc, percep), model, net, dev, cfg.amp, 10**6,
                                    ddp.Dist())
    return (stepper, *gan_batch(cfg, dev, AMP_DTYPES[cfg.amp], cfg.channels_last))


def basicsr_kernels(dev) -> None:
    """The kernel settings a BasicSR run trains with: cudnn.benchmark on (its train.py sets
    it), TF32 as torch leaves it (on for convolutions, off for matmuls)."""
    import torch
    if dev.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("highest")


def reference_step(cfg, dev):
    """gan_reference.ReferenceStep on fresh networks of ``cfg``'s sizes, with BasicSR's
    kernel settings; (stepper, lr, hr), the batch fp32 NCHW as BasicSR's loader gives it."""
    import torch

    from gan_reference import ReferenceStep, random_perceptual
    from srtrain import gan
    from srtrain.discriminator import UNetDiscriminatorSN
    from srtrain.models import build_model
    basicsr_kernels(dev)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.scale).to(dev)
    disc = UNetDiscriminatorSN(3, cfg.d_num_feat).to(dev) if cfg.gan_weight else None
    vgg = random_perceptual().vgg.to(dev) if cfg.perceptual_weight else None
    step = ReferenceStep(model, disc, vgg, gan.stage_config(cfg), cfg.lr, cfg.ema)
    return (step, *gan_batch(cfg, dev, torch.float32, False))


def gan_measure(cfg, dev, steps: int, warmup: int, reference: bool = False) -> dict:
    """One GAN-stage row: img/s, first step and peak GPU memory of srtrain's step, or with
    ``reference`` the BasicSR-style one; img/s None and ``out_of_memory`` where it ran out
    of GPU memory (the row stays: where a batch size stops fitting is a result)."""
    import gc

    import torch
    from torch._dynamo.utils import counters
    if dev.type == "cuda":
        # the last row's compiled code and its CUDA graphs' memory pool would count in this
        # row's peak
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    counters["inductor"]["cudagraph_skips"] = 0
    try:
        step, lr, hr = (reference_step if reference else our_gan_step)(cfg, dev)
        first, rate = _common.first_and_rate(step, lr, hr, dev, steps, warmup)
    except torch.cuda.OutOfMemoryError:
        return {"img_per_s": None, "first_step_s": None, "out_of_memory": True,
                "peak_gpu_gib": None, "cudagraph_skips": None}
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return {"img_per_s": round(rate, 3), "first_step_s": round(first, 3),
            "out_of_memory": False, "peak_gpu_gib": round(peak, 2) if peak is not None else None,
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"] if cfg.cuda_graphs
            else None}


def gan_rows(base: dict, sets: list[tuple], dev, steps: int, warmup: int, reference: bool,
             row: dict, env: dict, out: Path | None) -> list[dict]:
    """The GAN-stage rows of one model and batch size (``base``: TrainConfig's fields;
    ``row``: the fields every row shares): the reference first when asked (so its speedup
    goes on each srtrain row as it is written), then srtrain's step per configuration of
    ``sets`` (switch_sets x cudnn.benchmark x TF32)."""
    from gan_reference import REFERENCE, VGG_NOTE
    from srtrain.config import TrainConfig, resolve_amp
    from srtrain.kernels import resolve_compile
    defaults, _ = resolve_compile(TrainConfig(**base), dev)
    default_key = (defaults.compile, defaults.cuda_graphs, resolve_amp("auto", dev), True,
                   True, True)
    common = {"stage": "gan", **row, "model": base["model"], "batch_size": base["batch_size"],
              "d_num_feat": base["d_num_feat"], "usm": True, "ema": TrainConfig.ema,
              "vgg": VGG_NOTE}
    rows, ref, seen = [], None, set()
    if reference:
        cfg = TrainConfig(**base, amp="off", channels_last=False, compile="off",
                          cuda_graphs=False)
        r = gan_measure(cfg, dev, steps, warmup, reference=True)
        ref = r["img_per_s"]
        rows.append(common | {"step": "reference", "reference": REFERENCE, "amp": "off",
                              "channels_last": False, "compile": "off", "cuda_graphs": False,
                              "cudnn_benchmark": True, "tf32": True, **r,
                              "srtrain_defaults": False, "speedup_vs_reference": None,
                              "env": env})
        _common.emit(rows[-1], out)
    for how, graph, amp, cl, bench, tf in sets:
        cfg, _ = resolve_compile(TrainConfig(**base, amp=amp, channels_last=cl, compile=how,
                                             cuda_graphs=graph, cudnn_benchmark=bench,
                                             tf32=tf), dev)
        key = (cfg.compile, cfg.cuda_graphs, amp, cl, bench, tf)
        if (cfg.cuda_graphs and cfg.compile == "off") or key in seen:
            continue  # graphs replay compiled code; a configuration is timed once
        seen.add(key)
        r = gan_measure(cfg, dev, steps, warmup)
        rate = r["img_per_s"]
        rows.append(common | {"step": "srtrain", "amp": amp, "channels_last": cl,
                              "compile": cfg.compile, "cuda_graphs": cfg.cuda_graphs,
                              "cudnn_benchmark": bench, "tf32": tf, **r,
                              "srtrain_defaults": key == default_key,
                              "speedup_vs_reference": round(rate / ref, 3) if rate and ref
                              else None, "env": env})
        _common.emit(rows[-1], out)
    return rows
