"""Render a results folder (the JSON lines the benchmarks wrote) into results.md and plots.

    python benchmarks/render_results.py benchmarks/results/<gpu>-<date>

Reads whichever of these exist: headline.jsonl, fetch_host.md, loader_throughput.{md,png},
train_esrgan.jsonl, train_throughput.jsonl, kernels.jsonl, compile.jsonl, gan_step.jsonl,
batch_sizes.jsonl, codec_compare.jsonl, codec_loaders.jsonl, loader_degradation.md,
model_quality.md, suite.jsonl, environment.json, and notes.md (how the run went, by hand: shown under the
title). Writes results.md, train_throughput.png, batch_sizes.png and codecs.png next to them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from _common import read_lines
from train_throughput import _table as train_table
from gan_rows import gan_table


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt
    return plt


def _save_bars(plt, fig, ax, labels: list[str], ylabel: str, title: str, path: Path) -> None:
    """Label a bar chart with one group per label, and write it."""
    ax.set_xticks(range(len(labels)), labels)
    _save(plt, fig, ax, ylabel, title, path)


def _save(plt, fig, ax, ylabel: str, title: str, path: Path) -> None:
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_section(out: Path) -> list[str]:
    rows = read_lines(out / "train_esrgan.jsonl") + read_lines(out / "train_throughput.jsonl")
    rows = [r for r in rows if r.get("stage", "l1") == "l1"]  # GAN rows: gan_section
    if not rows:
        return []
    md = train_table(rows)
    plt = _plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    loaders = list(dict.fromkeys(r["loader"] for r in rows))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.8 / (len(loaders) + 1)
    for k, name in enumerate(["synthetic", *loaders]):
        vals = []
        for m in models:
            mine = [r for r in rows if r["model"] == m]
            if name == "synthetic":
                vals.append(max(r["synthetic_img_per_s"] for r in mine))
            else:
                vals.append(next((r["loader_img_per_s"] for r in mine if r["loader"] == name), 0))
        ax.bar([i + (k - len(loaders) / 2) * width for i in range(len(models))], vals, width,
               label=name)
    ax.set_yscale("log")
    # plain numbers (0.5, 20, 300; not 5×10⁻¹), minor ticks labelled at 2 and 5 only
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(plt.FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    _save_bars(plt, fig, ax, models, "images / s (log)",
               "training throughput: synthetic data vs fed by each loader",
               out / "train_throughput.png")
    return ["## Training throughput", "", md, "![train](train_throughput.png)", ""]


def gan_section(out: Path) -> list[str]:
    """The GAN stage's step (``gan`` part): srtrain's against Real-ESRGAN's step written
    the way BasicSR runs it, timed side by side, and peak memory by batch size."""
    rows = read_lines(out / "gan_step.jsonl")
    if not rows:
        return []
    return ["## GAN stage step", "", "Real-ESRGAN's second stage, one iteration per batch "
            "(generator step with L1, perceptual and GAN losses against a frozen "
            "discriminator, discriminator step on the real and the generated batch, EMA), "
            "timed alone on one random batch: srtrain's step (`srtrain --stage gan`; "
            "`defaults`: as srtrain runs it without switches, the other rows each with a "
            "switch off) against the same iteration written the way BasicSR runs it, in "
            "the same process. `× reference`: img/s over the reference's at that batch "
            "size. VGG19 on random weights: timing does not depend on them.", "",
            gan_table(rows)]


def _graphs(r: dict) -> str:
    """The compile cell's CUDA graphs note: none, or whether torch.compile skipped some."""
    if not r.get("cuda_graphs"):
        return ""
    skips = r.get("cudagraph_skips")
    return " + CUDA graphs" + (f" ({skips} graphs skipped)" if skips else "")


def kernels_section(out: Path) -> list[str]:
    """The training step alone with each kernel switch on and off, against the uncompiled
    step at the same precision with cudnn.benchmark and TF32 on (srtrain's defaults but for
    --compile)."""
    rows = read_lines(out / "kernels.jsonl") + read_lines(out / "compile.jsonl")
    if not rows:
        return []
    on = lambda b: "on" if b else "off"  # noqa: E731
    # compile was a flag before its modes (off, model, blocks)
    how = lambda r: {False: "off", True: "model"}.get(r["compile"], r["compile"])  # noqa: E731
    base = {r["amp"]: r["synthetic_img_per_s"] for r in rows
            if r["cudnn_benchmark"] and r["tf32"] and how(r) == "off"}
    lines = ["## Kernel switches", "", "The training step alone on one pre-made batch: what "
             "each switch is worth, against the uncompiled step at the same precision with "
             "cudnn.benchmark and TF32 on (srtrain's defaults but for `--compile`, whose "
             "`auto` compiles the blocks with CUDA graphs on one GPU). `first step`: with "
             "compile, mostly the compile's cost (and the graphs' recording, with CUDA "
             "graphs). `fed`: the "
             "same step fed by a loader, and its loader efficiency.", "",
             "| model | batch | amp | cudnn.benchmark | TF32 | compile | img/s | × uncompiled "
             "| first step | fed | peak GiB |",
             "|---|---:|---|---|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        rate, ref = r["synthetic_img_per_s"], base.get(r["amp"])
        mem = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else "-"
        first = f"{r['first_step_s']:.1f} s" if r.get("first_step_s") is not None else "-"
        fed = (f"{r['loader']}: {_rate(r['loader_img_per_s'])} "
               f"({100 * r['loader_efficiency']:.0f}%)" if r.get("loader_img_per_s") else "-")
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['amp']} | "
                     f"{on(r['cudnn_benchmark'])} | {on(r['tf32'])} | {how(r)}"
                     f"{_graphs(r)} | "
                     f"{_rate(rate)} | {f'{rate / ref:.2f}' if ref else '-'} | {first} | {fed} | "
                     f"{mem} |")
    if not rows[0]["env"].get("gpu"):
        lines += ["", "No GPU: cudnn.benchmark, TF32 and CUDA graphs change nothing on the "
                  "CPU."]
    return lines + [""]


def batch_section(out: Path) -> list[str]:
    rows = read_lines(out / "batch_sizes.jsonl")
    if not rows:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    sizes = [r["batch_size"] for r in rows]
    ax.plot(sizes, [r["synthetic_img_per_s"] for r in rows], "o-", label="synthetic")
    ax.plot(sizes, [r["loader_img_per_s"] for r in rows], "s--",
            label=f"fed by {rows[0]['loader']}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size")
    _save(plt, fig, ax, "images / s",
          f"{rows[0]['model']}: throughput by batch size (patch {rows[0]['patch']})",
          out / "batch_sizes.png")
    md = (out / "batch_sizes.md").read_text() if (out / "batch_sizes.md").exists() else ""
    return ["## Batch size", "", md, "![batch sizes](batch_sizes.png)", ""]


def codec_section(out: Path) -> list[str]:
    sizes = read_lines(out / "codec_compare.jsonl")
    speeds = read_lines(out / "codec_loaders.jsonl")
    if not sizes and not speeds:
        return []
    key = lambda r: (r["codec"], r.get("quality") if r["codec"] == "jpeg" else None)  # noqa
    rate = {(key(r), r["loader"]): r["images_per_s"] for r in speeds}
    lines = ["## Codecs", "", "| codec | bytes / image | PSNR dB | CPU decode ms | "
             "dali img/s | torch img/s |", "|---|---:|---:|---:|---:|---:|"]
    for r in sizes:
        if r["codec"] == "jpeg" and r["subsampling"] != "444":
            continue
        k = key(r)
        name = f"{r['codec']} q{r['quality']}" if r["codec"] == "jpeg" else r["codec"]
        psnr = "lossless" if r["psnr_mean_db"] is None else f"{r['psnr_mean_db']:.1f}"
        dali, torch_ = rate.get((k, "dali")), rate.get((k, "torch"))
        lines.append(f"| {name} | {r['bytes_per_image'] / 1e3:,.0f} KB | {psnr} | "
                     f"{r['decode_us_per_image'] / 1e3:.1f} | "
                     f"{f'{dali:,.0f}' if dali else '-'} | {f'{torch_:,.0f}' if torch_ else '-'} |")
    if speeds:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6.5, 3.4))
        names = list(dict.fromkeys(key(r) for r in speeds))
        labels = [f"{c} q{q}" if q else c for c, q in names]
        for k, loader in enumerate(["dali", "torch"]):
            ax.bar([i + (k - 0.5) * 0.4 for i in range(len(names))],
                   [rate.get((n, loader), 0) for n in names], 0.4, label=loader)
        _save_bars(plt, fig, ax, labels, "images / s", "loader throughput by codec",
                   out / "codecs.png")
        lines += ["", "![codecs](codecs.png)"]
    return lines + [""]


def _rate(img_per_s: float) -> str:
    return f"{img_per_s:,.1f}" if img_per_s >= 10 else f"{img_per_s:.2f}"  # 0.48, not 0.5


def _duration(seconds: float) -> str:
    if seconds < 120:  # the goal is an epoch in 30 s: "0.8 min" hides how far off it is
        return f"{seconds:.0f} s"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m:02d} min" if h else f"{seconds / 60:.1f} min"


def _file_section(out: Path, name: str, title: str, intro: str | None = None,
                  image: str | None = None) -> list[str]:
    """A section holding a part's own NAME.md (and its NAME.png), [] when the part did not
    run."""
    if not (out / f"{name}.md").exists():
        return []
    return (["## " + title, ""] + ([intro, ""] if intro else [])
            + [(out / f"{name}.md").read_text()]
            + ([f"![{image}]({name}.png)"] if image else []) + [""])


def render(out: Path) -> Path:
    env = json.loads((out / "environment.json").read_text()) \
        if (out / "environment.json").exists() else {}
    preset = env.get("preset", "full")
    quick = preset == "quick"
    gpu = (f"{env['gpu']} (driver {env.get('gpu_driver')}, CUDA {env.get('cuda')})"
           if env.get("gpu") else "no GPU")
    md = [f"# srpipe benchmark results: {env.get('gpu') or 'no GPU'}", "",
          f"{gpu}, {env.get('cpus')} CPUs ({env.get('cpu_model')}), torch {env.get('torch')}, "
          f"DALI {env.get('dali')}, {str(env.get('date'))[:10]}"
          + (", **quick mode: tiny sizes, not a measurement**" if quick else ""),
          "", "Produced by `python benchmarks/gpu_suite.py"
          + (f" --preset {preset}" if preset != "full" else "") + "`.", ""]
    if (out / "notes.md").exists():  # how the run went, written by whoever committed it
        md += [(out / "notes.md").read_text().strip(), ""]
    heads = read_lines(out / "headline.jsonl")
    if heads:
        md += ["## Headline", "", f"One epoch of the users' {heads[0]['images']:,} images "
               f"({heads[0]['patch']}² patches) with the full esrgan model, against their "
               f"starting point: {_duration(heads[0]['baseline_seconds_per_epoch'])} per epoch.",
               "", "| model | loader | batch | img/s | one epoch | × the starting point |",
               "|---|---|---:|---:|---:|---:|"]
        md += [f"| {h['model']} | {h['loader']} | {h['batch_size']} | {_rate(h['img_per_s'])} | "
               f"{_duration(h['seconds_per_epoch'])} | {h['speedup']:.2f}× |" for h in heads]
        md.append("")
        if any(h["loader"] == "synthetic" for h in heads):
            md += ["`synthetic`: the step alone on a pre-made batch, what a loader that costs "
                   "nothing would give.", ""]
    md += _file_section(
        out, "real_epoch", "One real epoch", "`srtrain --epochs 1` with its defaults on a "
        "freshly packed database, timed from the command's start (imports, loader start, "
        "compile and CUDA graphs included) to the epoch's last step; validation apart. The "
        "last column is how the headline computes an epoch: 10,000 ÷ the steady steps' "
        "img/s.")
    md += _file_section(
        out, "fetch_host", "Host time per fetch", "The main thread's own time in one "
        "`next()` of a loader that is ahead of the step (`fetch_host.py`: a pause before each "
        "fetch lets the workers and the pipeline finish): under a CUDA-graph step the GPU "
        "waits about this long for every batch.")
    md += _file_section(out, "loader_throughput", "Loader throughput", image="loaders")
    md += _file_section(
        out, "loader_tuning", "DALI tuning", "`dali` at all cores with DALI's knobs: its CPU "
        "threads, the share of JPEGs the hardware decoder takes (`hw_decoder_load`, DALI's "
        "default 0.65) and preallocation hints sized to the images (make_loader's "
        "`dali_threads`, `hw_decoder_load`, `decoder_hints`).")
    md += train_section(out) + kernels_section(out)
    if (out / "op_table.txt").exists():
        md += ["Where the step's time goes: [op_table.txt](op_table.txt), torch.profiler's "
               "ops by their own device time.", ""]
    md += gan_section(out) + batch_section(out)
    fed = read_lines(out / "train_degradation.jsonl")
    if fed:
        md += ["## esrgan fed with each LR degradation", "", "The step fed by each loader "
               "making the LR by nearest neighbour, MATLAB bicubic or Real-ESRGAN's "
               "degradation (`srtrain --degradation`).", "", train_table(fed)]
    md += _file_section(
        out, "loader_degradation", "LR degradations", "Loader img/s making the LR by nearest "
        "neighbour, MATLAB bicubic or Real-ESRGAN's degradation (torch: on the device after "
        "the batch arrives; dali: in its graph).")
    md += _file_section(out, "time_to_quality", "Time to quality", image="time to quality")
    md += codec_section(out)
    md += _file_section(out, "model_quality", "Model presets: quality")
    steps = read_lines(out / "suite.jsonl")
    skipped = [r for r in steps if r.get("skipped")]
    if skipped:
        md += ["## Skipped steps", ""] + [f"- `{r['part']}`: `{r['command']}` ({r['skipped']})"
                                          for r in skipped] + [""]
    failed = [r for r in steps if not r["ok"]]
    if failed:
        md += ["## Failed steps", ""] + [f"- `{r['part']}`: `{r['command']}` "
                                         f"(exit {r['returncode']}); see logs/{r['part']}.log"
                                         for r in failed]
    path = out / "results.md"
    path.write_text("\n".join(md) + "\n")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: render_results.py RESULTS_DIR")
    print(render(Path(sys.argv[1])))
