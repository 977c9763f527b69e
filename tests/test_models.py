import math

import pytest
import torch
import torch.nn.functional as F

from srtrain.models import MODELS, RRDBNet, SRCNN, build_model, load_weights


@pytest.fixture(scope="module")
def esrgan():
    torch.manual_seed(0)
    return build_model("esrgan", 4)


def basicsr_keys(num_block=23):
    """The state_dict keys of BasicSR's RRDBNet, in its order."""
    keys = ["conv_first"]
    keys += [f"body.{b}.rdb{r}.conv{c}" for b in range(num_block) for r in (1, 2, 3)
             for c in range(1, 6)]
    keys += ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]
    return [f"{k}.{p}" for k in keys for p in ("weight", "bias")]


def test_esrgan_state_dict_matches_basicsr(esrgan):
    sd = esrgan.state_dict()
    assert list(sd) == basicsr_keys()
    assert sd["conv_first.weight"].shape == (64, 3, 3, 3)
    assert sd["body.0.rdb1.conv1.weight"].shape == (32, 64, 3, 3)
    assert sd["body.0.rdb1.conv5.weight"].shape == (64, 192, 3, 3)
    assert sd["body.22.rdb3.conv4.weight"].shape == (32, 160, 3, 3)
    assert sd["conv_last.weight"].shape == (3, 64, 3, 3)
    assert sum(p.numel() for p in esrgan.parameters()) == 16_697_987
    assert esrgan.scale == 4


def test_x2_and_x3_have_x4_layout_except_conv_first():
    x4 = RRDBNet(scale=4, num_feat=8, num_block=1, num_grow_ch=4).state_dict()
    x2 = RRDBNet(scale=2, num_feat=8, num_block=1, num_grow_ch=4).state_dict()
    x3 = RRDBNet(scale=3, num_feat=8, num_block=1, num_grow_ch=4).state_dict()
    assert x2["conv_first.weight"].shape == (8, 12, 3, 3)
    assert build_model("esrgan", 2).conv_first.in_channels == 12
    assert {k: v.shape for k, v in x3.items()} == {k: v.shape for k, v in x4.items()}
    assert list(x2) == list(x4)


def test_init_is_basicsr_default_init_weights():
    torch.manual_seed(0)
    m = build_model("fast", 4)
    conv5 = m.body[0].rdb1.conv5
    fan_in = conv5.in_channels * 9
    # kaiming normal (gain sqrt(2), fan_in) scaled by 0.1; ~55k samples pin the std to ~1%
    assert conv5.weight.std().item() == pytest.approx(0.1 * math.sqrt(2 / fan_in), rel=0.05)
    assert torch.count_nonzero(conv5.bias) == 0
    # the convs outside the dense blocks keep PyTorch's default init, as in BasicSR
    assert torch.count_nonzero(m.conv_first.bias) > 0


def basicsr_forward(sd, x, scale):
    """BasicSR's RRDBNet.forward, written out with F.conv2d on a state dict."""
    def conv(name, t):
        return F.conv2d(t, sd[name + ".weight"], sd[name + ".bias"], padding=1)
    lrelu = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
    if scale == 2:  # basicsr.archs.arch_util.pixel_unshuffle
        b, c, hh, hw = x.size()
        x = x.view(b, c, hh // 2, 2, hw // 2, 2).permute(0, 1, 3, 5, 2, 4)
        x = x.reshape(b, c * 4, hh // 2, hw // 2)
    feat = conv("conv_first", x)
    body = feat
    num_block = len({k.split(".")[1] for k in sd if k.startswith("body.")})
    for b in range(num_block):
        rrdb_in = body
        for r in (1, 2, 3):
            p = f"body.{b}.rdb{r}."
            xs = [body]
            for c in range(1, 5):
                xs.append(lrelu(conv(p + f"conv{c}", torch.cat(xs, 1))))
            body = conv(p + "conv5", torch.cat(xs, 1)) * 0.2 + body
        body = body * 0.2 + rrdb_in
    feat = feat + conv("conv_body", body)
    feat = lrelu(conv("conv_up1", F.interpolate(feat, scale_factor=2, mode="nearest")))
    feat = lrelu(conv("conv_up2", F.interpolate(feat, scale_factor=2, mode="nearest")))
    return conv("conv_last", lrelu(conv("conv_hr", feat)))


@pytest.mark.parametrize("scale", [2, 4])
def test_forward_matches_basicsr(scale):
    torch.manual_seed(0)
    m = RRDBNet(scale=scale, num_feat=8, num_block=2, num_grow_ch=4).eval()
    x = torch.rand(1, 3, 8, 12)
    with torch.no_grad():
        assert torch.allclose(m(x), basicsr_forward(m.state_dict(), x, scale), atol=1e-6)


@pytest.mark.parametrize("name", ["fast", "light"])
@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_rrdb_output_shapes(name, scale, channels_last):
    m = build_model(name, scale).eval()
    x = torch.rand(2, 3, 16, 16)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = m(x)
    assert m.scale == scale
    assert y.shape == (2, 3, 16 * scale, 16 * scale)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_srcnn_shapes(scale):
    m = build_model("srcnn", scale).eval()
    assert isinstance(m, SRCNN) and m.scale == scale
    assert [c.kernel_size for c in (m.conv1, m.conv2, m.conv3)] == [(9, 9), (5, 5), (5, 5)]
    with torch.no_grad():
        y = m(torch.rand(1, 3, 16, 16))
    assert y.shape == (1, 3, 16 * scale, 16 * scale) and torch.isfinite(y).all()


@pytest.mark.parametrize("wrap,expected", [
    (lambda sd: {"params_ema": sd}, "params_ema"),
    (lambda sd: {"params": sd}, "params"),
    (lambda sd: {"params": {k: v + 1 for k, v in sd.items()}, "params_ema": sd}, "params_ema"),
    (lambda sd: {"model": sd, "step": 10}, "model"),
    (lambda sd: {"module." + k: v for k, v in sd.items()}, None),
    (lambda sd: {"params_ema": {"module." + k: v for k, v in sd.items()}}, "params_ema"),
    # an srtrain checkpoint: its EMA (AveragedModel's keys), not its raw weights
    (lambda sd: {"config": {}, "model": {k: v + 1 for k, v in sd.items()},
                 "ema": {"n_averaged": torch.tensor(5),
                         **{"module." + k: v for k, v in sd.items()}}}, "ema"),
    (lambda sd: {"config": {}, "model": sd, "ema": None}, "model"),
])
def test_load_weights_round_trip(tmp_path, wrap, expected):
    torch.manual_seed(0)
    src = build_model("fast", 2).eval()
    torch.manual_seed(1)
    dst = build_model("fast", 2).eval()
    x = torch.rand(1, 3, 16, 16)
    path = tmp_path / "w.pth"
    torch.save(wrap(src.state_dict()), path)
    with torch.no_grad():
        assert not torch.equal(src(x), dst(x))
        assert load_weights(dst, path) == expected
        assert torch.equal(src(x), dst(x))


def test_load_weights_from_dict():
    src, dst = build_model("srcnn", 3), build_model("srcnn", 3)
    assert load_weights(dst, {"params_ema": src.state_dict()}) == "params_ema"
    assert torch.equal(dst.conv1.weight, src.conv1.weight)


def test_load_weights_mismatch(tmp_path, esrgan):
    path = tmp_path / "esrgan_x4.pth"
    torch.save({"params_ema": esrgan.state_dict()}, path)
    with pytest.raises(ValueError) as e:
        load_weights(build_model("fast", 4), path)
    msg = str(e.value)
    assert str(path) in msg and "--model" in msg and "--scale" in msg
    # 15 surplus blocks x 30 tensors; lists stay short however many keys differ
    assert "unexpected keys (450): body.8.rdb1.conv1.weight" in msg and "and 445 more" in msg
    assert "shape mismatches (251)" in msg and "missing keys" not in msg
    assert "conv_first.weight: file (64, 3, 3, 3), model (32, 3, 3, 3)" in msg


def test_load_weights_wrong_scale():
    sd = RRDBNet(scale=4, num_feat=8, num_block=1, num_grow_ch=4).state_dict()
    x2 = RRDBNet(scale=2, num_feat=8, num_block=1, num_grow_ch=4)
    with pytest.raises(ValueError, match=r"conv_first.weight: file \(8, 3, 3, 3\), "
                                         r"model \(8, 12, 3, 3\)"):
        load_weights(x2, sd)
    del sd["conv_last.bias"]
    with pytest.raises(ValueError, match="missing keys .1.: conv_last.bias"):
        load_weights(RRDBNet(scale=4, num_feat=8, num_block=1, num_grow_ch=4), sd)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""])
def test_load_weights_garbage_file(tmp_path, content):
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="garbage.pth") as e:
        load_weights(build_model("srcnn", 2), path)
    # one line, and not torch's advice to load the file with weights_only=False
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
    with pytest.raises(ValueError, match="absent.pth"):
        load_weights(build_model("srcnn", 2), tmp_path / "absent.pth")


def test_load_weights_non_dict_file(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="tensor.pth.*not a state dict"):
        load_weights(build_model("srcnn", 2), path)


def test_build_model_errors():
    assert set(MODELS) == {"esrgan", "light", "fast", "rrdbnet", "srcnn"}
    with pytest.raises(ValueError, match="esrgan, light, fast, rrdbnet, srcnn"):
        build_model("edsr", 4)
    with pytest.raises(ValueError, match="--num-feat, --num-block and --num-grow-ch"):
        build_model("rrdbnet", 4, num_feat=16)
    with pytest.raises(ValueError, match="only apply to --model rrdbnet"):
        build_model("fast", 4, num_block=4)
    with pytest.raises(ValueError, match="only apply to --model rrdbnet"):
        build_model("srcnn", 4, num_feat=4, num_block=4, num_grow_ch=4)
    with pytest.raises(ValueError, match="got scale=5, expected 2, 3 or 4"):
        build_model("fast", 5)
    with pytest.raises(ValueError, match="got scale=5, expected 2, 3 or 4"):
        RRDBNet(scale=5)


def test_build_model_sizes():
    m = build_model("rrdbnet", 3, num_feat=16, num_block=2, num_grow_ch=8)
    assert isinstance(m, RRDBNet) and m.scale == 3 and len(m.body) == 2
    assert m.body[1].rdb3.conv5.weight.shape == (16, 16 + 4 * 8, 3, 3)
    light = build_model("light", 4)
    assert (light.conv_first.out_channels, len(light.body), light.body[0].rdb1.conv1.out_channels) \
        == (32, 12, 16)
    fast = build_model("fast", 4)
    assert (fast.conv_first.out_channels, len(fast.body), fast.body[0].rdb1.conv1.out_channels) \
        == (32, 8, 16)
