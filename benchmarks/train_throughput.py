"""Training throughput: img/s of the real training step per model preset, on synthetic data
and fed by each loader, and loader efficiency = fed img/s / synthetic img/s (in the table,
the fastest synthetic rate of the same step in the run: ``step_alone``).

    python benchmarks/train_throughput.py [--db DB | --count 2048] \
        [--models esrgan,fast,srcnn] [--loaders dali,torch] [--batch-sizes 32] [--patch 256] \
        [--amp auto,off] [--channels-last on,off] [--compile off,model,blocks] \
        [--cuda-graphs on,off] [--cudnn-benchmark on,off] [--tf32 on,off] \
        [--dali-outputs host,stream] [--dali-per-run 0,1] \
        [--degradations nn,bicubic,realesrgan] \
        [--stages l1,gan] [--reference] [--ablate] [--d-num-feat 64] [--out F.jsonl] [--md F.md]

The step is srtrain's own (``srtrain.stepper.Stepper``: autocast, channels_last, fused AdamW,
L1), on a fresh model per configuration: ``--warmup`` untimed steps, then ``--steps`` timed,
synchronised on the GPU. Synthetic data is one loader batch repeated, so the two numbers
differ only by the loader. One JSON line per model x loader x batch size, with peak GPU
memory (``--batch-sizes 8,16,32,64``: how throughput and memory grow with the batch).
Fed rows also give, per timed step, how long the GPU sat idle for data and the host's
median time fetching a batch (ms): a loader that makes the host wait for the GPU fetches
for as long as a step takes. ``--dali-outputs host,stream`` measures both ways DALI can
hand over a batch (``srdata.DaliTuning``'s ``outputs``), ``--dali-per-run 0,1`` DALI's
default batches per pipeline run against one (``batches_per_run``). ``--degradations`` makes the
LR of fed rows as srtrain's ``--degradation`` does, each kind a row: what making Real-ESRGAN's
LR in the loader costs the step.

``--stages gan`` (``l1`` by default, ``l1,gan`` both) times the GAN stage's step alone
(``srtrain.gan``: generator, discriminator, perceptual loss, EMA; Real-ESRGAN's weights and
USM-sharpened targets; VGG19 on random weights, as timing does not depend on them) on one
random batch whatever ``--loaders`` says, a row per model x batch size x switches, and
``--d-num-feat`` the discriminator's width; ``--reference`` adds, per model and
batch size, the same iteration written the way BasicSR runs it (``gan_reference.py``: fp32,
eager, NCHW) and each srtrain row's speedup over it, measured in the same process.
``--ablate``: instead of every combination of ``--compile``, ``--cuda-graphs``, ``--amp`` and
``--channels-last``, the first of each and then that with each switch off alone. Every row
says its ``stage`` and its peak GPU memory (``--batch-sizes 8,16,32``: where each step runs
out of it; a GAN row that ran out stays, its img/s none).

``--loaders synthetic`` times the step alone on one random batch (no database, no loader):
what the kernel switches (``--cudnn-benchmark``, ``--tf32``; CUDA only) are measured with,
each given as ``on``, ``off`` or ``on,off`` (one configuration each), and ``--compile``'s
modes (srtrain's: ``off``, ``model``, ``blocks``; a comma list, one configuration each),
with ``--cuda-graphs`` (compiled rows only; CUDA only).
"""
from __future__ import annotations

import itertools
import tempfile
import warnings
from pathlib import Path

import click

import _common
from gan_rows import gan_rows, gan_table


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _unlike(r: dict, first: dict) -> str:
    """The switches where row ``r`` differs from the first row (the one the note under
    the table describes), as a suffix of its loader cell."""
    notes = []
    if r["amp"] != first["amp"]:
        notes.append(f"amp {r['amp']}")
    if r.get("channels_last", True) != first.get("channels_last", True):
        notes.append("channels_last" if r["channels_last"] else "NCHW")
    if (r["compile"], r.get("cuda_graphs")) != (first["compile"], first.get("cuda_graphs")):
        notes.append(f"compile {r['compile']}" + (" + CUDA graphs" if r.get("cuda_graphs")
                                                  else ""))
    return "".join(", " + n for n in notes)


def _step_key(r: dict) -> tuple:
    """What the step alone depends on: not the loader, its hand-over or the LR it makes."""
    return (r["model"], r["batch_size"], r["patch"], r["amp"], r.get("channels_last", True),
            r["compile"], r.get("cuda_graphs"), r.get("cudnn_benchmark"), r.get("tf32"))


def step_alone(records: list[dict]) -> dict:
    """The fastest step-alone rate of each step (``_step_key``) among the rows.

    Every fed row times the step alone too, on a fresh model; between rows of one run the
    same step measured up to 16% apart (srcnn on an H200: 3,892 and 3,343 img/s), which put
    the gap between two loaders in the noise. One rate per step, the least disturbed, is
    the denominator each row's loader efficiency shares."""
    best = {}
    for r in records:
        k = _step_key(r)
        best[k] = max(best.get(k, 0.0), r["synthetic_img_per_s"])
    return best


def _table(records: list[dict]) -> str:
    # the fed step's waits, where the rows measured them (not before 2026-11-28)
    waits = any(r.get("fed_fetch_ms") is not None for r in records)
    alone = step_alone(records)
    lines = ["| model | loader | batch | img/s synthetic | img/s fed | loader efficiency "
             + ("| GPU wait ms / step | fetch ms / step " if waits else "") + "| peak GiB |",
             "|---|---|---:|---:|---:|---:|" + ("---:|---:|" if waits else "") + "---:|"]
    for r in records:
        mem = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else "-"
        fed = r["loader_img_per_s"]
        loader = r["loader"] + (", stream outputs" if r.get("dali_outputs") == "stream" else "")
        if (r.get("dali_per_run") or 1) > 1:
            loader += f", {r['dali_per_run']} batches a run"
        if r.get("degradation", "nn") != "nn":
            loader += f", {r['degradation']} LR"
        loader += _unlike(r, records[0])
        synthetic = alone[_step_key(r)]
        lines.append(f"| {r['model']} | {loader} | {r['batch_size']} | "
                     f"{synthetic:,.1f} | "
                     + (f"{fed:,.1f} | {100 * fed / synthetic:.0f}% | " if fed else
                        "- | - | ")
                     + (f"{_ms(r.get('fed_data_wait_ms'))} | {_ms(r.get('fed_fetch_ms'))} | "
                        if waits else "") + f"{mem} |")
    env = records[0]["env"]
    r = records[0]
    lines.append(f"\n{env.get('gpu') or 'no GPU'}, {env['cpus']} CPUs, torch {env['torch']}, "
                 f"DALI {env.get('dali')}, {env['date'][:10]}; patch "
                 f"{r['patch']}, scale {r['scale']}, amp {r['amp']}, compile {r['compile']}"
                 + (", CUDA graphs" if r.get("cuda_graphs") else "")
                 + (f", cudnn.benchmark {r['cudnn_benchmark']}, tf32 {r['tf32']}"
                    if "tf32" in r else "") + ". "
                 "img/s synthetic: the step alone, the fastest of the rows that timed the "
                 "same step; each row's loader efficiency is its fed img/s over that.")
    return "\n".join(lines) + "\n"


def synthetic_rate(cfg, model, dev, steps: int, warmup: int,
                   trace: Path | None = None) -> dict:
    """The training step alone, on one random batch of the loader's dtype and layout.

    ``trace``: then also profile a few more steps and append the ops that took the most
    device time (CPU time without a GPU) to this file: where the step's time goes."""
    import torch

    from srdata.sampler import nn_downscale
    from srtrain.config import AMP_DTYPES
    from srtrain.kernels import set_kernels
    from srtrain.timing import timing_stepper
    set_kernels(cfg, dev)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    hr = torch.rand(cfg.batch_size, 3, cfg.patch, cfg.patch, device=dev,
                    dtype=AMP_DTYPES[cfg.amp]).contiguous(memory_format=fmt)
    lr = nn_downscale(hr, cfg.scale).contiguous(memory_format=fmt)  # the loaders' nn LR
    stepper = timing_stepper(cfg, model, dev, cfg.amp)
    first, rate = _common.first_and_rate(stepper, lr, hr, dev, steps, warmup)
    if trace is not None and not cfg.cuda_graphs:  # a graph is one op to the profiler
        title = (f"{cfg.model}, batch {cfg.batch_size}, patch {cfg.patch}, amp {cfg.amp}, "
                 f"compile {cfg.compile}, cudnn.benchmark {cfg.cudnn_benchmark}, tf32 "
                 f"{cfg.tf32}: {rate:.1f} img/s")
        write_op_table(stepper, lr, hr, dev, trace, title)
    return {"synthetic_img_per_s": rate, "loader_img_per_s": None, "loader_efficiency": None,
            "first_step_s": first}


def write_op_table(stepper, lr, hr, dev, path: Path, title: str, steps: int = 5) -> None:
    """torch.profiler's table of ``steps`` steps, the ops by their own device time."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            stepper(lr, hr)
        if cuda:
            torch.cuda.synchronize(dev)
    table = prof.key_averages().table(
        sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"## {title}; {steps} steps\n\n{table}\n\n")


def measure(cfg, dev, steps: int, warmup: int, trace: Path | None = None,
            dali=None) -> dict | None:
    """One configuration's img/s (synthetic and fed) and peak GPU memory; None on OOM.
    ``trace``: see synthetic_rate (synthetic data only). With CUDA graphs, also how many
    compiled graphs torch.compile ran without them (``cudagraph_skips``; all on a CPU).
    Fed rows also give the fed step's waits (``srtrain.timing.loader_efficiency``);
    ``dali``: their DALI loader's ``srdata.DaliTuning``."""
    import torch
    from torch._dynamo.utils import counters

    from srtrain.models import build_model
    from srtrain.timing import loader_efficiency
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    counters["inductor"]["cudagraph_skips"] = 0
    try:
        model = build_model(cfg.model, cfg.scale).to(
            dev, memory_format=torch.channels_last if cfg.channels_last
            else torch.preserve_format)
        if cfg.loader == "synthetic":
            r = synthetic_rate(cfg, model, dev, steps, warmup, trace)
        else:
            r = loader_efficiency(cfg, model, dev, cfg.amp, steps, warmup, dali=dali)
    except torch.cuda.OutOfMemoryError:
        return None
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    skips = counters["inductor"]["cudagraph_skips"] if cfg.cuda_graphs else None
    return {**{k: None if v is None else round(v, 3) for k, v in r.items()},
            "peak_gpu_gib": round(peak, 2) if peak is not None else None,
            "cudagraph_skips": skips}


def switch_sets(compiles: list, graphs: list, amps: list, layouts: list,
                ablate: bool = False) -> list[tuple]:
    """(compile, cuda_graphs, amp, channels_last) of each configuration: every combination
    of the options' lists; with ``ablate``, the first of each, then that one with each
    switch off alone (the same configuration twice, once made concrete for the device, is
    timed once: see ``main``)."""
    if not ablate:
        return list(itertools.product(compiles, graphs, amps, layouts))
    how, graph, amp, cl = compiles[0], graphs[0], amps[0], layouts[0]
    return [(how, graph, amp, cl), (how, False, amp, cl), ("off", False, amp, cl),
            (how, graph, "off", cl), (how, graph, amp, False)]


def _switch(ctx, param, value: str) -> list[bool]:
    return [n == "on" for n in _common.switches(ctx, param, value)]


def _graphs(ctx, param, value: str) -> list[bool | None]:
    names = _common.some_of(value, ("on", "off", "auto"))
    return [None if n == "auto" else n == "on" for n in names]


def _compiles(ctx, param, value: str) -> list[str]:
    from srtrain.config import COMPILES
    return _common.some_of(value, COMPILES)


def _outputs(ctx, param, value: str) -> list[str]:
    from srdata.loader_base import DALI_OUTPUTS
    return _common.some_of(value, DALI_OUTPUTS)


def _models(ctx, param, value: str) -> list[str]:
    from srtrain.models import MODELS
    return _common.some_of(value, MODELS)


def _amps(ctx, param, value: str) -> list[str]:
    from srtrain.config import AMPS
    return _common.some_of(value, AMPS)


def _stages(ctx, param, value: str) -> list[str]:
    from srtrain.config import STAGES
    return _common.some_of(value, STAGES)


def _loaders(ctx, param, value: str) -> list[str]:
    from srdata.loader import LOADERS
    return _common.some_of(value, (*LOADERS, "synthetic"))


@click.command()
@click.option("--db", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--count", default=2048, show_default=True,
              help="Images in the database built when --db is not given.")
@click.option("--size", default=512, show_default=True)
@click.option("--models", default="esrgan,fast,srcnn", show_default=True, callback=_models)
@click.option("--loaders", default="dali,torch", show_default=True, callback=_loaders,
              help="Some of dali, torch, synthetic (the step alone). L1 rows only: GAN rows "
                   "time the step alone.")
@click.option("--stages", default="l1", show_default=True, callback=_stages,
              help="l1, gan or l1,gan: srtrain's --stage; gan rows time Real-ESRGAN's GAN "
                   "step alone on one random batch.")
@click.option("--reference", is_flag=True,
              help="GAN rows: also time the same iteration written the way BasicSR runs it "
                   "(fp32, eager, NCHW), and each row's speedup over it.")
@click.option("--ablate", is_flag=True,
              help="Instead of every combination of --compile, --cuda-graphs, --amp and "
                   "--channels-last: the first of each, then that with each switch off alone.")
@click.option("--d-num-feat", default=64, show_default=True, type=click.IntRange(min=1),
              help="GAN rows: the discriminator's width (Real-ESRGAN's is 64).")
@click.option("--batch-sizes", default="32", show_default=True, callback=_common.batch_sizes,
              help="Comma-separated; each one is its own configuration.")
@click.option("--patch", default=256, show_default=True)
@click.option("--scale", default=4, show_default=True)
@click.option("--amp", "amps", default="auto", show_default=True, callback=_amps,
              help="auto, bf16, fp16, off or a comma list: srtrain's --amp, one "
                   "configuration each.")
@click.option("--channels-last", "layouts", default="on", show_default=True, callback=_switch,
              help="on, off or on,off: srtrain's --channels-last.")
@click.option("--no-channels-last", "nchw", is_flag=True, help="Short for --channels-last off.")
@click.option("--compile", "compile_", default="auto", show_default=True, callback=_compiles,
              help="auto, off, model, blocks or a comma list: srtrain's --compile modes "
                   "(auto: blocks on one GPU, off on the CPU; rows say what ran).")
@click.option("--cuda-graphs", "graphs", default="auto", show_default=True, callback=_graphs,
              help="on, off, auto or a comma list: srtrain's --cuda-graphs, for compiled rows "
                   "(CUDA; auto: on with compiled blocks).")
@click.option("--cudnn-benchmark", "cudnn", default="on", show_default=True, callback=_switch,
              help="on, off or on,off: torch.backends.cudnn.benchmark (CUDA).")
@click.option("--tf32", default="on", show_default=True, callback=_switch,
              help="on, off or on,off: TF32 for fp32 convolutions and matmuls (CUDA).")
@click.option("--dali-outputs", default="host", show_default=True, callback=_outputs,
              help="host, stream or host,stream: how dali rows take each batch (DaliTuning's "
                   "outputs; one configuration each).")
@click.option("--dali-per-run", default="0", show_default=True,
              callback=lambda c, p, v: _common.numbers(v),
              help="Training batches per DALI pipeline run for dali rows (DaliTuning's "
                   "batches_per_run; 0: its default; a comma list, one configuration each).")
@click.option("--degradations", default="nn", show_default=True, callback=_common.degradations,
              help="How fed rows make the LR (srtrain's --degradation; a comma list, one "
                   "configuration each): nn, bicubic, realesrgan.")
@click.option("--workers", type=int, help="Loader CPU workers  [default: all cores but one]")
@click.option("--device", default=None)
@click.option("--steps", default=30, show_default=True)
@click.option("--warmup", default=10, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--md", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--op-table", type=click.Path(dir_okay=False, path_type=Path),
              help="Synthetic rows: append the profiler's ops by device time to this file.")
def main(db, count, size, models, loaders, stages, reference, ablate, d_num_feat, batch_sizes,
         patch, scale, amps, layouts, nchw, compile_, graphs, cudnn, tf32, dali_outputs,
         dali_per_run, degradations, workers, device, steps, warmup, out, md, op_table):
    from srdata.loader import resolve_device
    from srtrain.config import resolve_amp
    env = _common.environment() | _common.accelerator_environment()
    dev = resolve_device(device)
    amps = list(dict.fromkeys(resolve_amp(a, dev) for a in amps))
    sets = switch_sets(compile_, graphs, amps, [False] if nchw else layouts, ablate)
    records = []
    with tempfile.TemporaryDirectory(prefix="srpipe-bench-") as tmp:
        # the step alone needs no database
        alone = loaders == ["synthetic"] or "l1" not in stages
        source = str(db) if db else ("one random batch" if alone else
                                     f"synthetic {size}x{size} jpeg q95")
        if not alone:
            db = db or _common.build_jpeg_db(tmp, count, size, min_size=patch)
        if "l1" in stages:
            records += l1_rows(db, source, models, loaders, batch_sizes, patch, scale, sets,
                               cudnn, tf32, dali_outputs, dali_per_run, degradations,
                               workers, dev, steps, warmup, op_table, env, out)
        if "gan" in stages:
            row = {"benchmark": "train_throughput", "source": "one random batch",
                   "loader": "synthetic", "patch": patch, "scale": scale, "steps": steps,
                   "warmup": warmup}
            for name, bs in itertools.product(models, batch_sizes):
                base = {"db": "unused", "model": name, "scale": scale, "batch_size": bs,
                        "patch": patch, "schedule": "constant", "stage": "gan", "usm": True,
                        "d_num_feat": d_num_feat}
                records += gan_rows(base, [(*s, b, t) for s, b, t in itertools.product(
                    sets, cudnn, tf32)], dev, steps, warmup, reference, row, env, out)
    if md:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(tables(records))


def tables(records: list[dict]) -> str:
    """The .md of a run: the L1 rows' table, then the GAN rows' (when there are any)."""
    l1 = [r for r in records if r.get("stage", "l1") == "l1"]
    gan = [r for r in records if r.get("stage") == "gan"]
    return "\n".join(t for t in (_table(l1) if l1 else "", gan_table(gan) if gan else "") if t)


def l1_rows(db, source, models, loaders, batch_sizes, patch, scale, sets, cudnn, tf32,
            dali_outputs, dali_per_run, degradations, workers, dev, steps, warmup, op_table,
            env, out) -> list[dict]:
    """The L1 stage's rows: model x loader x batch size x each configuration."""
    from srdata import DaliTuning
    from srtrain.config import TrainConfig
    from srtrain.kernels import resolve_compile
    records, seen = [], set()
    for name, loader, bs, (how, graph, amp, cl), bench, tf, outputs, runs, deg in \
            itertools.product(models, loaders, batch_sizes, sets, cudnn, tf32, dali_outputs,
                              dali_per_run, degradations):
        if loader != "dali" and (outputs, runs) != (dali_outputs[0], dali_per_run[0]):
            continue  # one row: the switches are DALI's
        if loader == "synthetic" and deg != degradations[0]:
            continue  # one row: the step alone makes no LR
        tuning = DaliTuning(outputs=outputs, batches_per_run=runs or None) \
            if loader == "dali" else None
        # the batches a run it resolves to: 0 (the default) may be one of the numbers given
        outputs, runs = (outputs, tuning.per_run(bs, dev.type == "cuda")) if tuning \
            else (None, None)
        cfg, _ = resolve_compile(TrainConfig(
            db=str(db), loader=loader, model=name, scale=scale, batch_size=bs, patch=patch,
            amp=amp, channels_last=cl, compile=how, cuda_graphs=graph,
            workers=workers, schedule="constant", cudnn_benchmark=bench, tf32=tf,
            degradation=deg), dev)
        if cfg.cuda_graphs and cfg.compile == "off":
            continue  # the graphs replay compiled code (srtrain refuses the pair)
        key = (name, loader, bs, cfg.compile, cfg.cuda_graphs, amp, cl, bench, tf, outputs,
               runs, deg)
        if key in seen:
            continue  # --ablate's switch that was off already, or the default batches a
            # run given again by number: one row
        seen.add(key)
        r = measure(cfg, dev, steps, warmup, op_table if loader == "synthetic" else None,
                    dali=tuning)
        if r is None:
            warnings.warn(f"{name} at batch {bs} ran out of GPU memory; skipped")
            continue
        records.append({
            "benchmark": "train_throughput", "stage": "l1", "source": source, "model": name,
            "loader": loader, "batch_size": bs, "patch": patch, "scale": scale,
            "amp": amp, "channels_last": cl, "compile": cfg.compile,
            "cuda_graphs": cfg.cuda_graphs, "cudnn_benchmark": bench, "tf32": tf,
            **({"dali_outputs": outputs} if outputs else {}),
            **({"degradation": deg} if loader != "synthetic" else {}),
            "steps": steps, "warmup": warmup, **r, "env": env})
        _common.emit(records[-1], out)
    return records


if __name__ == "__main__":  # spawned loader workers import this module as __mp_main__
    main()
