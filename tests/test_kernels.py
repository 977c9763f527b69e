"""cuDNN autotuning and TF32 (the switches reach the config and torch, on CUDA only), and
torch.compile's modes."""
import pytest
import torch
from click.testing import CliRunner

import srtrain.train
from srtrain.cli import main
from srtrain.config import TrainConfig
from srtrain.train import set_kernels


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
    assert [c.compile for c in seen] == ["off", "model", "model", "blocks"]
    assert seen[3].resume_conflicts(seen[0]) == []  # how fast it runs, not what it computes
    r = CliRunner().invoke(main, ["--db", db, "--compile", "all"])
    assert r.exit_code == 2 and "'all' is not one of 'off', 'model', 'blocks'" in r.output
    # checkpoints from when --compile was a flag
    assert TrainConfig.from_dict({"db": db, "compile": True}).compile == "model"
    assert TrainConfig.from_dict({"db": db, "compile": False}).compile == "off"


def test_compile_blocks_compiles_each_repeated_block_in_place():
    """Regional compilation: the model object, its state dict's keys and its outputs stay
    those of the plain model; a model with no repeated block is compiled whole."""
    from srtrain.checkpoint import unwrap
    from srtrain.models import build_model, repeated_blocks
    from srtrain.train import compile_net
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
