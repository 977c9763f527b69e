"""srtrain export --format safetensors|onnx, and the note on what spandrel cannot load."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from srtrain.cli import main
from srtrain.exports import FORMATS, resolve_format, spandrel_note, spandrel_reason
from srtrain.models import build_model
from conftest import one_error_line

TINY = {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}


def make_ckpt(path, model_name, scale, sizes=None, ema=True, seed=0):
    """A checkpoint of an untrained model, with EMA weights unlike the raw ones when
    ``ema``."""
    torch.manual_seed(seed)
    model = build_model(model_name, scale, **(sizes or {}))
    raw = model.state_dict()
    averaged = None
    if ema:
        averaged = {f"module.{k}": v + 0.01 * torch.randn_like(v) for k, v in raw.items()}
        averaged["n_averaged"] = torch.tensor(5)
    torch.save({"model": raw, "ema": averaged,
                "config": {"db": "x", "model": model_name, "scale": scale, **(sizes or {})}},
               path)
    return path


def ema_model(ckpt):
    """The model the checkpoint's EMA weights make, as srtrain upscale runs it."""
    from srtrain.checkpoint import load_model
    return load_model(ckpt, ema=True)


def export(ckpt, *args):
    return CliRunner().invoke(main, ["export", "--ckpt", str(ckpt), *map(str, args)])


def test_format_comes_from_the_flag_else_the_extension():
    assert resolve_format(None, "net.safetensors") == "safetensors"
    assert resolve_format(None, "net.ONNX") == "onnx"
    assert resolve_format(None, "net.pth") == resolve_format(None, "net.bin") == "pth"
    assert resolve_format("pth", "net.onnx") == "pth"  # the flag wins
    assert FORMATS == ("pth", "safetensors", "onnx")
    with pytest.raises(ValueError, match="got --format bin, expected one of pth, "):
        resolve_format("bin", "net.pth")


def test_an_unknown_format_is_refused(tmp_path):
    ckpt = make_ckpt(tmp_path / "last.pt", "srcnn", 2)
    r = export(ckpt, tmp_path / "net.bin", "--format", "bin")
    assert r.exit_code == 2 and "Invalid value for '--format'" in r.output
    assert not (tmp_path / "net.bin").exists()


@pytest.mark.parametrize("ema", [True, False])
def test_safetensors_is_the_flat_ema_state_dict(tmp_path, ema):
    from safetensors.torch import load_file
    ckpt = make_ckpt(tmp_path / "last.pt", "rrdbnet", 4, TINY, ema=ema)
    out = tmp_path / "net_g.safetensors"
    r = export(ckpt, out)
    assert r.exit_code == 0, r.output
    assert f"as safetensors to {out}" in r.output
    flat = load_file(out)
    state = torch.load(ckpt, weights_only=True)
    want = ({k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
            if ema else state["model"])
    assert sorted(flat) == sorted(want)
    assert all(torch.equal(flat[k], want[k]) for k in want)
    model = build_model("rrdbnet", 4, **TINY)
    model.load_state_dict(flat, strict=True)
    # num_grow_ch 4: spandrel would build it with 32 and fail
    assert "(spandrel) cannot load this model's shape (num_grow_ch 4; it assumes 32)" in r.output


@pytest.mark.parametrize("name,scale,sizes", [("rrdbnet", 4, TINY), ("rrdbnet", 2, TINY),
                                              ("srcnn", 3, None)])
def test_onnx_runs_in_onnxruntime_at_any_size(tmp_path, name, scale, sizes):
    ort = pytest.importorskip("onnxruntime")
    ckpt = make_ckpt(tmp_path / "last.pt", name, scale, sizes)
    out = tmp_path / "net_g.onnx"
    r = export(ckpt, out, "--format", "onnx")
    assert r.exit_code == 0, r.output
    assert "with its params_ema weights as ONNX" in r.output and "(spandrel)" not in r.output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["output"]
    model = ema_model(ckpt)
    for shape in ((1, 3, 12, 20), (2, 3, 18, 10)):  # neither is the traced 32x32
        x = torch.rand(shape, generator=torch.Generator().manual_seed(shape[2]))
        with torch.no_grad():
            want = model(x).numpy()
        got = session.run(["output"], {"input": x.numpy()})[0]
        assert got.shape == want.shape == (shape[0], 3, shape[2] * scale, shape[3] * scale)
        assert abs(got - want).max() < 1e-4


def test_onnx_keeps_the_safety_checks(tmp_path):
    ckpt = make_ckpt(tmp_path / "last.pt", "srcnn", 2)
    kept = ckpt.read_bytes()
    line = one_error_line(export(ckpt, ckpt, "--format", "onnx", "--overwrite"))
    assert f"the output {ckpt} is the checkpoint {ckpt} itself" in line
    other = make_ckpt(tmp_path / "best.onnx", "srcnn", 2)  # a checkpoint by any name
    line = one_error_line(export(ckpt, other, "--overwrite"))
    assert "is an srtrain checkpoint, which export never replaces" in line
    earlier = tmp_path / "net.onnx"
    earlier.write_bytes(b"an earlier export")
    line = one_error_line(export(ckpt, earlier))
    assert line == f"Error: {earlier} already exists; pass --overwrite to replace it"
    assert earlier.read_bytes() == b"an earlier export" and ckpt.read_bytes() == kept
    line = one_error_line(export(ckpt, tmp_path, "--format", "onnx"))
    assert f"give a file name such as {tmp_path / 'net_g.onnx'}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.onnx", "last.pt", "net.onnx"]


def test_safetensors_refuses_nan_weights(tmp_path):
    ckpt = make_ckpt(tmp_path / "last.pt", "srcnn", 2)
    state = torch.load(ckpt, weights_only=True)
    state["ema"]["module.conv1.weight"][0] = float("nan")
    torch.save(state, ckpt)
    line = one_error_line(export(ckpt, tmp_path / "net.safetensors"))
    assert "non-finite EMA weights" in line and "conv1.weight" in line
    assert not (tmp_path / "net.safetensors").exists()


def test_a_missing_onnx_package_is_one_line(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    ckpt = make_ckpt(tmp_path / "last.pt", "srcnn", 2)
    line = one_error_line(export(ckpt, tmp_path / "net.onnx"))
    assert line == 'Error: --format onnx needs the onnx package: pip install -e ".[onnx]"'
    assert not (tmp_path / "net.onnx").exists()


def test_a_full_disk_under_a_safetensors_export_is_one_line(tmp_path, monkeypatch):
    import errno
    import os
    ckpt = make_ckpt(tmp_path / "last.pt", "srcnn", 2)
    dst = tmp_path / "net.safetensors"
    dst.write_bytes(b"an earlier export")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    line = one_error_line(export(ckpt, dst, "--overwrite"))
    assert line == f"Error: no space left on the device to write {dst}; free some space"
    assert dst.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "net.safetensors"]


@pytest.mark.parametrize("model,scale,grow,loads", [
    ("esrgan", 4, 32, True), ("esrgan", 2, 32, True), ("rrdbnet", 4, 32, True),
    ("fast", 4, 16, False), ("light", 2, 16, False), ("rrdbnet", 4, 16, False),  # the demo's
    ("esrgan", 3, 32, False), ("srcnn", 4, None, False)])
def test_the_spandrel_rule(model, scale, grow, loads):
    assert (spandrel_reason(model, scale, grow) is None) == loads
    note = spandrel_note(model, scale, grow)
    assert (note is None) == loads
    if not loads:
        assert note.startswith("chaiNNer/ComfyUI (spandrel) cannot load this model's shape (")
        assert note.endswith("for chaiNNer, ncnn and ONNX tools export --format onnx")
    if grow == 16:
        assert "(num_grow_ch 16; it assumes 32); BasicSR and srtrain upscale can;" in note


def test_pth_export_notes_spandrel_only_when_it_cannot_load(tmp_path):
    fast = make_ckpt(tmp_path / "fast.pt", "rrdbnet", 4, {**TINY, "num_grow_ch": 16})
    r = export(fast, tmp_path / "fast.pth")
    assert r.exit_code == 0 and "num_grow_ch 16; it assumes 32" in r.output
    wide = make_ckpt(tmp_path / "wide.pt", "rrdbnet", 4, {**TINY, "num_grow_ch": 32})
    r = export(wide, tmp_path / "wide.pth")
    assert r.exit_code == 0 and "(spandrel)" not in r.output
    assert "wrote params and params_ema (" in r.output
    w = torch.load(tmp_path / "wide.pth", weights_only=True)
    assert sorted(w) == ["params", "params_ema"]
