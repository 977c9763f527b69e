"""cuDNN autotuning and TF32: the switches reach the config and torch (on CUDA only)."""
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
