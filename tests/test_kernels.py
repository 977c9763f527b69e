"""cuDNN autotuning and TF32 (the switches reach the config and torch, on CUDA only), and
torch.compile's modes: what auto picks, and CUDA graphs."""
import dataclasses
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import srtrain.kernels
import srtrain.train
from srtrain.cli import main
from srtrain.config import TrainConfig
from srtrain.kernels import compiler_missing, resolve_compile, set_kernels


def switches():
    return (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


def test_cli_switches_reach_the_config_and_a_resume_may_change_them(packed, monkeypatch):
    seen = []
    monkeypatch.setattr(srtrain.train, "train", lambda cfg: seen.append(cfg) or {})
    db = str(packed("jpeg"))
    for args in ([], ["--no-cudnn-benchmark", "--no-tf32"]):
        r = CliRunner().invoke(main, ["--db", db, "--patch", "48", "-q", *args])
        assert r.exit_code == 0, r.output
    assert [(c.cudnn_benchmark, c.tf32) for c in seen] == [(True, True), (False, False)]
    assert seen[1].resume_conflicts(seen[0]) == []


def test_the_cpu_keeps_torch_defaults():
    before = switches()
    set_kernels(TrainConfig(db="db", cudnn_benchmark=False, tf32=False), torch.device("cpu"))
    assert switches() == before


@pytest.mark.gpu
def test_cuda_switches_follow_the_config():
    before = switches()
    try:
        set_kernels(TrainConfig(db="db"), torch.device("cuda"))
        assert switches() == (True, True, "high")
        set_kernels(TrainConfig(db="db", cudnn_benchmark=False, tf32=False),
                    torch.device("cuda"))
        assert switches() == (False, False, "highest")
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = before[:2]
        torch.set_float32_matmul_precision(before[2])


def test_cli_compile_modes_reach_the_config_and_a_resume_may_change_them(packed, monkeypatch):
    seen = []
    monkeypatch.setattr(srtrain.train, "train", lambda cfg: seen.append(cfg) or {})
    db = str(packed("jpeg"))
    for args in ([], ["--compile"], ["--compile", "-q"], ["--compile", "blocks"]):
        r = CliRunner().invoke(main, ["--db", db, "--patch", "48", *args, "-q"])
        assert r.exit_code == 0, r.output
    assert [c.compile for c in seen] == ["auto", "model", "model", "blocks"]
    assert seen[3].resume_conflicts(seen[0]) == []  # how fast it runs, not what it computes
    r = CliRunner().invoke(main, ["--db", db, "--compile", "all"])
    assert r.exit_code == 2 and "'all' is not one of 'auto', 'off', 'model', 'blocks'" in r.output
    # checkpoints from when --compile was a flag
    assert TrainConfig.from_dict({"db": db, "compile": True}).compile == "model"
    assert TrainConfig.from_dict({"db": db, "compile": False}).compile == "off"


def test_compile_auto_is_blocks_with_graphs_on_one_gpu_and_off_elsewhere(monkeypatch):
    """What the H100 runs measured fastest where it is known to run; what was asked stays."""
    monkeypatch.setattr(srtrain.kernels, "compiler_missing", lambda device: None)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")

    def picked(device, world_size=1, **kw):
        cfg, why = resolve_compile(TrainConfig(db="db", **kw), device, world_size)
        return cfg.compile, cfg.cuda_graphs, why

    assert picked(gpu) == ("blocks", True, None)
    assert picked(gpu, accum=2) == ("blocks", False, None)  # graphs need --accum 1
    assert picked(gpu, world_size=2) == ("off", False, None)  # torchrun: untried there
    assert picked(cpu) == ("off", False, None)
    assert picked(cpu, compile="blocks") == ("blocks", False, None)
    assert picked(gpu, compile="off") == ("off", False, None)
    assert picked(gpu, compile="model") == ("model", False, None)  # graphs measured on blocks
    assert picked(gpu, cuda_graphs=False) == ("blocks", False, None)
    assert picked(gpu, compile="model", cuda_graphs=True) == ("model", True, None)
    monkeypatch.setattr(srtrain.kernels, "compiler_missing", lambda device: "no C compiler")
    assert picked(gpu) == ("off", False, "no C compiler")
    assert picked(gpu, compile="blocks") == ("blocks", True, None)  # asked: torch says why


def test_compiler_missing_names_what_triton_lacks(monkeypatch):
    """A slim container fails inside the first compiled step; auto checks first."""
    import importlib.util
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.delenv("CC", raising=False)
    if compiler_missing(gpu) is not None:  # this machine lacks Python's headers
        assert compiler_missing(gpu) == "no Python headers for Triton (install python3-dev)"
        return
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    assert compiler_missing(gpu) == "Triton needs compute capability 7.0, the GPU has 6.1"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert compiler_missing(gpu) == "no C compiler for Triton (install gcc, or set CC)"
    monkeypatch.setenv("CC", "/opt/cc")
    assert compiler_missing(gpu) == "Triton needs compute capability 7.0, the GPU has 6.1"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert compiler_missing(gpu) == "Triton is not installed"


def test_a_run_records_what_auto_picked_and_says_when_a_gpu_goes_uncompiled(packed,
                                                                            monkeypatch,
                                                                            tmp_path):
    """config.json holds the compile the run used; where auto compiles nothing on a GPU,
    one warning says why and how to silence it."""
    db = str(packed("jpeg"))
    args = ["--db", db, "--patch", "48", "--model", "fast", "--loader", "torch",
            "--batch-size", "2", "--epochs", "1", "--val-images", "1", "-q"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "cpu")])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "cpu" / "config.json").read_text())
    assert (saved["compile"], saved["cuda_graphs"]) == ("off", False)
    real = srtrain.train.resolve_compile

    def no_compiler(cfg, device, world_size=1):
        cfg, _ = real(dataclasses.replace(cfg, compile="off"), device, world_size)
        return cfg, "no C compiler for Triton (install gcc, or set CC)"

    monkeypatch.setattr(srtrain.train, "resolve_compile", no_compiler)
    with pytest.warns(UserWarning, match=r"--compile auto compiles nothing: no C compiler for "
                                         r"Triton \(install gcc, or set CC\)\. The step runs "
                                         r"uncompiled"):
        r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "gpu")])
    assert r.exit_code == 0, r.output


def test_compile_blocks_compiles_each_repeated_block_in_place():
    """Regional compilation: the model object, its state dict's keys and its outputs stay
    those of the plain model; a model with no repeated block is compiled whole."""
    from srtrain.checkpoint import unwrap
    from srtrain.models import build_model, repeated_blocks
    from srtrain.kernels import compile_net
    torch.manual_seed(0)
    model = build_model("fast", 4)
    keys = list(model.state_dict())
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        want = model(x)
    assert compile_net(model, model, "blocks") is model
    blocks = repeated_blocks(model)
    assert len(blocks) > 1 and all(b._compiled_call_impl is not None for b in blocks)
    got = model(x)
    got.mean().backward()  # the backward compiles and runs too
    assert list(model.state_dict()) == keys
    assert torch.allclose(got.detach(), want, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters())
    srcnn = build_model("srcnn", 4)
    whole = compile_net(srcnn, srcnn, "blocks")
    assert whole is not srcnn and unwrap(whole) is srcnn
    assert compile_net(srcnn, srcnn, "off") is srcnn


def test_the_ema_copy_of_compiled_blocks_runs_its_own_weights():
    """The Stepper's AveragedModel deep-copies the model after its blocks were compiled in
    place: the copy must run eager on its own weights, not call the live blocks (torch
    leaves the compiled call out of a module's copied state; this holds it to that)."""
    from srtrain.kernels import compile_net
    from srtrain.models import build_model
    from srtrain.stepper import Stepper
    torch.manual_seed(0)
    model = build_model("rrdbnet", 4, 8, 2, 4)
    compile_net(model, model, "blocks")
    step = Stepper(TrainConfig(db="db", amp="off"), model, model, torch.device("cpu"), "off",
                   10)
    eager = build_model("rrdbnet", 4, 8, 2, 4)
    eager.load_state_dict(step.ema.module.state_dict())
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)  # the live weights move on; the copy's do not
        got = step.ema.module(x)
        assert torch.allclose(got, eager(x), atol=1e-6)
        assert not torch.allclose(got, model(x), atol=1e-3)


def test_cuda_graphs_reach_the_config_and_are_refused_where_untried(packed, monkeypatch,
                                                                     tmp_path):
    seen = []
    monkeypatch.setattr(srtrain.train, "train", lambda cfg: seen.append(cfg) or {})
    db = str(packed("jpeg"))
    r = CliRunner().invoke(main, ["--db", db, "--patch", "48", "--compile", "blocks",
                                  "--cuda-graphs", "-q"])
    assert r.exit_code == 0, r.output
    assert seen[0].cuda_graphs and TrainConfig(db=db).cuda_graphs is None
    assert seen[0].resume_conflicts(TrainConfig(db=db, patch=48)) == []
    monkeypatch.undo()
    base = ["--db", db, "--out", str(tmp_path / "run"), "--patch", "48", "--model", "fast",
            "--loader", "torch", "--epochs", "1", "-q", "--cuda-graphs"]
    refused = {(): "--cuda-graphs replays the compiled step: add --compile blocks (or "
                   "--compile model)",
               ("--compile", "blocks", "--accum", "2"): "--cuda-graphs takes --accum 1, got "
                                                        "--accum 2; drop one of them"}
    for extra, said in refused.items():
        r = CliRunner().invoke(main, [*base, *extra])
        assert r.exit_code == 1 and r.output.strip() == f"Error: {said}", r.output
    assert not (tmp_path / "run").exists()  # refused before any work
    with pytest.raises(ValueError, match="runs on one GPU, got 2 processes"):
        srtrain.kernels.check_cuda_graphs(TrainConfig(db=db, compile="model", cuda_graphs=True),
                                        world_size=2)


@pytest.mark.parametrize("how", ["model", "blocks"])
def test_cuda_graphs_compile_in_reduce_overhead_mode_and_mark_each_step(how, monkeypatch):
    """Each step begins a new CUDA graph iteration; on the CPU the compiled code runs as
    without graphs."""
    from srtrain.models import build_model
    from srtrain.timing import timing_stepper
    modes, marks = [], []
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda *a, **kw: modes.append(kw.get("mode")) or compile_(*a, **kw))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    torch.manual_seed(0)
    model = build_model("rrdbnet", 4, 8, 2, 4)
    cfg = TrainConfig(db="db", model="rrdbnet", compile=how, cuda_graphs=True, amp="off",
                      schedule="constant")
    step = timing_stepper(cfg, model, torch.device("cpu"), "off")
    losses = [float(step(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32))[0])
              for _ in range(2)]
    assert modes == ["reduce-overhead"] * (1 if how == "model" else 2)
    assert len(marks) == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.gpu
def test_cuda_graphs_train_as_the_eager_step_does():
    """The compiled blocks replayed as CUDA graphs, against the eager step from the same
    weights on the same batches (the last one smaller, as an epoch's last): the same losses,
    kept on the device and read at the end as the trainer does. A replay that wrote over a
    tensor still in use would change them; and no graph may be skipped, or this test
    would not test graphs."""
    import copy

    from torch._dynamo.utils import counters

    from srtrain.models import build_model
    from srtrain.timing import timing_stepper
    dev = torch.device("cuda")
    before = switches()
    torch.manual_seed(0)
    cl = torch.channels_last
    base = build_model("fast", 4).to(dev, memory_format=cl)
    batches = [(torch.rand(n, 3, 16, 16, device=dev).contiguous(memory_format=cl),
                torch.rand(n, 3, 64, 64, device=dev).contiguous(memory_format=cl))
               for n in (4, 4, 4, 4, 2)]
    losses = {}
    try:
        for graphs in (False, True):
            cfg = TrainConfig(db="db", model="fast", amp="off", tf32=False, lr=1e-3,
                              schedule="constant", compile="blocks" if graphs else "off",
                              cuda_graphs=graphs)
            set_kernels(cfg, dev)
            counters["inductor"]["cudagraph_skips"] = 0
            step = timing_stepper(cfg, copy.deepcopy(base), dev, "off")
            kept = [step(lr, hr)[0] for lr, hr in batches]
            losses[graphs] = torch.stack(kept).tolist()
        assert counters["inductor"]["cudagraph_skips"] == 0
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = before[:2]
        torch.set_float32_matmul_precision(before[2])
    assert losses[True] == pytest.approx(losses[False], rel=1e-3), losses


@pytest.mark.parametrize("ema", ["0.999", "0"])
def test_compiled_blocks_train_validate_and_resume_as_the_eager_run_does(packed, tmp_path,
                                                                          ema):
    """--compile blocks through the whole trainer, as auto runs it on a GPU (here without
    graphs): across a patch switch, validating with the eager EMA copy or (--ema 0) the
    compiled model in eval mode, saving and resuming. Its weights and scores stay the eager
    run's: an EMA copy that still called the live blocks would score differently."""
    from srtrain import checkpoint
    from test_progressive import train
    from test_train import events
    db, runs = packed("jpeg"), {}
    for how in ("off", "blocks"):
        out = tmp_path / how
        args = ("--patch-schedule", "32:0,48:1", "--ema", ema, "--compile", how)
        for epochs, more in ((2, ()), (3, ("--resume",))):
            r = train(db, out, "--epochs", epochs, *more, *args)
            assert r.exit_code == 0, r.output
        state = checkpoint.load(out / "last.pt")
        runs[how] = (state["model"], state["ema"], [e["psnr"] for e in events(out, "val")])
    (eager, eager_ema, eager_psnr), (built, built_ema, built_psnr) = runs["off"], runs["blocks"]
    assert list(built) == list(eager) and len(eager_psnr) == 3
    assert all(torch.allclose(built[k], eager[k], rtol=1e-3, atol=1e-5) for k in eager)
    assert (built_ema is None) == (eager_ema is None) == (ema == "0")
    assert built_psnr == pytest.approx(eager_psnr, abs=0.01)
