"""The GAN stage: discriminator, perceptual loss, GAN losses and the GAN step (CPU, tiny)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from srdata.degrade import usm_sharpen
from srtrain import checkpoint
from srtrain.config import TrainConfig
from srtrain.discriminator import UNetDiscriminatorSN
from srtrain.gan import GANConfig, GANStepper, build_parts, gan_loss, nonfinite_weights
from srtrain.models import build_model, load_weights
from srtrain.perceptual import (VGG_FILE, VGGWeightsMissing, find_vgg_weights, load_vgg19)

CPU = torch.device("cpu")
NF = 8  # the discriminator's width in these tests (Real-ESRGAN's is 64)

# torchvision's vgg19().features: index of each convolution -> (out, in) channels
TORCHVISION_VGG19 = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128),
                     12: (256, 256), 14: (256, 256), 16: (256, 256), 19: (512, 256),
                     21: (512, 512), 23: (512, 512), 25: (512, 512), 28: (512, 512),
                     30: (512, 512), 32: (512, 512), 34: (512, 512)}
# BasicSR's basicsr/archs/discriminator_arch.py UNetDiscriminatorSN(3, nf): its state dict
SN = ("weight_orig", "weight_u", "weight_v")


def basicsr_d_shapes(nf: int) -> dict:
    convs = {1: (2 * nf, nf, 4), 2: (4 * nf, 2 * nf, 4), 3: (8 * nf, 4 * nf, 4),
             4: (4 * nf, 8 * nf, 3), 5: (2 * nf, 4 * nf, 3), 6: (nf, 2 * nf, 3),
             7: (nf, nf, 3), 8: (nf, nf, 3)}
    shapes = {"conv0.weight": (nf, 3, 3, 3), "conv0.bias": (nf,)}
    for i, (out, inp, k) in convs.items():
        shapes |= {f"conv{i}.weight_orig": (out, inp, k, k), f"conv{i}.weight_u": (out,),
                   f"conv{i}.weight_v": (inp * k * k,)}
    return shapes | {"conv9.weight": (1, nf, 3, 3), "conv9.bias": (1,)}


def random_vgg19(seed: int = 0) -> dict:
    """A VGG19 features state dict with torchvision's keys, He-scaled so activations keep
    their size through 16 layers (no pretrained weights on test machines)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (out, inp) in TORCHVISION_VGG19.items():
        he = (2 / (9 * inp)) ** 0.5
        sd[f"features.{i}.weight"] = torch.randn(out, inp, 3, 3, generator=g) * he
        sd[f"features.{i}.bias"] = torch.randn(out, generator=g) * 0.01
    return sd


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / VGG_FILE
    torch.save(random_vgg19(), path)
    return path


def config(**kw) -> TrainConfig:
    return TrainConfig(**({"db": "unused", "lr": 1e-4, "schedule": "constant", "amp": "off",
                           "ema": 0.999, "compile": "off", "cuda_graphs": False} | kw))


def stepper(vgg_file, seed=0, amp="off", channels_last=False, **weights):
    torch.manual_seed(seed)
    gan = GANConfig(vgg_weights=str(vgg_file), d_num_feat=NF, **weights)
    model = build_model("rrdbnet", 4, 8, 1, 4)
    disc, percep = build_parts(gan, CPU, channels_last)
    cfg = config(amp=amp, channels_last=channels_last)
    return GANStepper(cfg, gan, model, model, CPU, amp, 100, disc, percep)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 32, 32, generator=g))
            for _ in range(n)]


# -- discriminator ----------------------------------------------------------------------
def test_discriminator_scores_every_pixel():
    d = UNetDiscriminatorSN(3, NF)
    assert d(torch.rand(2, 3, 32, 32)).shape == (2, 1, 32, 32)
    assert d(torch.rand(1, 3, 48, 24)).shape == (1, 1, 48, 24)
    with pytest.raises(ValueError, match="30x32 patch, expected sides divisible by 8"):
        d(torch.rand(1, 3, 30, 32))


def test_discriminator_state_dict_is_basicsrs():
    d = UNetDiscriminatorSN(3, NF)
    want = basicsr_d_shapes(NF)
    assert {k: tuple(v.shape) for k, v in d.state_dict().items()} == want
    # a BasicSR/Real-ESRGAN netD file ({"params": ...}, no torch metadata) loads strictly
    g = torch.Generator().manual_seed(3)
    theirs = {k: torch.randn(s, generator=g) for k, s in want.items()}
    assert load_weights(d, {"params": theirs}) == "params"
    assert all(torch.equal(d.state_dict()[k], v) for k, v in theirs.items())
    fresh = UNetDiscriminatorSN(3, NF)
    fresh.load_state_dict(theirs, strict=True)
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(fresh.eval()(x), d.eval()(x))


def test_spectral_norm_iterates_in_float32_under_autocast(monkeypatch):
    d = UNetDiscriminatorSN(3, NF).train()
    u0 = d.conv1.weight_u.clone()
    seen, mv = [], torch.mv
    monkeypatch.setattr(torch, "mv", lambda *a: seen.append(
        torch.is_autocast_enabled("cpu")) or mv(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d(torch.rand(1, 3, 16, 16))
    assert out.dtype == torch.bfloat16 and seen and not any(seen)
    assert d.conv1.weight_u.dtype == torch.float32
    assert not torch.equal(d.conv1.weight_u, u0)  # the power iteration updated the buffer


# -- perceptual loss --------------------------------------------------------------------
def test_missing_vgg_weights_say_which_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VGGWeightsMissing) as e:
        find_vgg_weights(None)
    msg = str(e.value)
    assert "\n" not in msg and VGG_FILE in msg and "https://download.pytorch.org" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg and "--vgg-weights" in msg
    assert "--perceptual-weight 0" in msg
    with pytest.raises(VGGWeightsMissing, match="--vgg-weights nowhere.pth: no such file"):
        find_vgg_weights("nowhere.pth")
    with pytest.raises(VGGWeightsMissing):  # a --perceptual-weight run fails before training
        build_parts(GANConfig(), CPU)

    basicsr = tmp_path / "experiments" / "pretrained_models" / VGG_FILE
    basicsr.parent.mkdir(parents=True)
    basicsr.write_bytes(b"x")
    assert find_vgg_weights(None) == basicsr
    cached = tmp_path / "hub" / "checkpoints" / VGG_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_vgg_weights(None) == cached  # torchvision's cache first
    assert build_parts(GANConfig(perceptual_weight=0), CPU)[1] is None  # no VGG needed


@pytest.mark.parametrize("form", ["features", "full", "unprefixed"])
def test_torchvision_vgg19_state_dicts_load(tmp_path, form):
    sd = want = random_vgg19(seed=5)
    if form == "full":
        # torchvision's classifier keys; their tensors are not read, so small ones stand
        # in for the 4096 x 25088 matrix
        sd |= {f"classifier.{i}.{p}": torch.zeros(2) for i in (0, 3, 6)
               for p in ("weight", "bias")}
    if form == "unprefixed":  # vgg19().features.state_dict()
        sd = {k[len("features."):]: v for k, v in sd.items()}
    path = tmp_path / "vgg.pth"
    torch.save(sd, path)
    vgg = load_vgg19(path)
    got = vgg.features.state_dict()
    assert len(got) == 32 and all(torch.equal(v, want[f"features.{k}"])
                                  for k, v in got.items())
    assert not any(p.requires_grad for p in vgg.parameters())


def test_wrong_vgg_files_are_refused(tmp_path):
    path = tmp_path / "d.pth"
    torch.save(UNetDiscriminatorSN(3, NF).state_dict(), path)
    with pytest.raises(ValueError, match="is not torchvision's VGG19.*features.0.weight is "
                                         "missing, expected shape"):
        load_vgg19(path)
    sd = random_vgg19()
    sd["features.34.weight"] = sd["features.34.weight"][:, :256]
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"features.34.weight is shape \(512, 256, 3, 3\)"):
        load_vgg19(path)
    path.write_text("not weights")
    with pytest.raises(ValueError, match="cannot read VGG19 weights"):
        load_vgg19(path)


# -- losses -----------------------------------------------------------------------------
def vgg_by_hand(sd: dict, x: torch.Tensor) -> dict:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x, convs, feats = (x - mean) / std, iter(TORCHVISION_VGG19), {}
    for block, n in enumerate((2, 2, 4, 4, 4), 1):
        for j in range(1, n + 1):
            i = next(convs)
            x = F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1)
            feats[f"conv{block}_{j}"] = x
            x = F.relu(x)
        x = F.max_pool2d(x, 2)
    return feats


def test_gan_loss_labels():
    logits = torch.tensor([[-2.0, 0.0], [1.0, 3.0]])
    # real: label 1, -log(sigmoid(x)); fake: label 0, -log(1 - sigmoid(x))
    torch.testing.assert_close(gan_loss(logits, real=True),
                               -torch.log(torch.sigmoid(logits)).mean())
    torch.testing.assert_close(gan_loss(logits, real=False),
                               -torch.log(1 - torch.sigmoid(logits)).mean())


def test_each_term_equals_a_hand_computation(vgg_file):
    s = stepper(vgg_file, pixel_weight=0.7, perceptual_weight=0.3, gan_weight=0.1)
    g, d = copy.deepcopy(s.model), copy.deepcopy(s.disc)
    (lr, hr), = batches(1)
    terms, stepped = s(lr, hr)
    assert stepped and set(terms) == {"l_g_pix", "l_g_percep", "l_g_gan", "l_d_real",
                                      "l_d_fake", "out_d_real", "out_d_fake", "loss"}

    with torch.no_grad():
        sr, gt_usm = g(lr), usm_sharpen(hr)
        vgg = random_vgg19()
        f_sr, f_gt = vgg_by_hand(vgg, sr), vgg_by_hand(vgg, gt_usm)
        layer_w = {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1, "conv4_4": 1, "conv5_4": 1}
        # the copy runs the same spectral-norm power iterations, in the same order
        fake_g = d(sr)
        real_usm = copy.deepcopy(d)(gt_usm)  # what a real pass on the sharpened HR gives
        real, fake = d(hr), d(sr)
    want = {"l_g_pix": 0.7 * (sr - gt_usm).abs().mean(),
            "l_g_percep": 0.3 * sum(w * (f_sr[n] - f_gt[n]).abs().mean()
                                    for n, w in layer_w.items()),
            "l_g_gan": 0.1 * F.softplus(-fake_g).mean(),  # -log sigmoid: label 1
            "l_d_real": F.softplus(-real).mean(), "l_d_fake": F.softplus(fake).mean(),
            "out_d_real": real.mean(), "out_d_fake": fake.mean()}
    want["loss"] = want["l_g_pix"] + want["l_g_percep"] + want["l_g_gan"]
    for name, value in want.items():
        torch.testing.assert_close(terms[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # the plain target fails the same comparison: the sharpened one was used
    assert (gt_usm - hr).abs().mean() > 0.01
    for name, plain in (("l_g_pix", 0.7 * (sr - hr).abs().mean()),
                        ("l_d_real", F.softplus(-real_usm).mean())):
        assert not torch.allclose(terms[name], plain, rtol=1e-5, atol=1e-6), name


def test_g_step_leaves_d_alone_and_d_step_sees_a_detached_output(vgg_file):
    # without VGG where it only costs time: it is frozen and holds no state
    s = stepper(vgg_file, perceptual_weight=0)
    (lr, hr), = batches(1)
    d_before = {k: v.clone() for k, v in s.disc.named_parameters()}
    g_before = {k: v.clone() for k, v in s.model.named_parameters()}
    sr, terms = s.g_step(lr, hr)
    assert "l_g_gan" in terms and not sr.requires_grad
    assert all(torch.equal(p, d_before[k]) and p.grad is None
               for k, p in s.disc.named_parameters())
    g_after = {k: v.clone() for k, v in s.model.named_parameters()}
    assert any(not torch.equal(g_after[k], g_before[k]) for k in g_before)

    live = s.net(lr)  # an output still tied to the generator: d_step must cut it off
    s.d_step(live, hr)
    assert all(p.grad is None and torch.equal(p, g_after[k])
               for k, p in s.model.named_parameters())
    assert any(not torch.equal(p, d_before[k]) for k, p in s.disc.named_parameters())


def test_resume_continues_as_the_uninterrupted_run(vgg_file, tmp_path):
    data = batches(3)
    a = stepper(vgg_file, seed=0, perceptual_weight=0)
    a(*data[0])
    checkpoint.save(tmp_path / "last.pt", {"model": a.model.state_dict(), **a.state_dict(),
                                           "config": {}})
    a_terms = [a(*b)[0] for b in data[1:]]

    # other initial weights: everything must come from the file
    b = stepper(vgg_file, seed=7, perceptual_weight=0)
    state = checkpoint.load(tmp_path / "last.pt")
    b.model.load_state_dict(state["model"])
    b.load_state_dict(state)
    b_terms = [b(*batch)[0] for batch in data[1:]]
    for ta, tb in zip(a_terms, b_terms):
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], msg=k)
    for part in ("model", "disc"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        for k in sa:  # the discriminator's include spectral norm's u and v
            torch.testing.assert_close(sa[k], sb[k], msg=f"{part}.{k}")
    for k, v in a.ema.state_dict().items():
        torch.testing.assert_close(v, b.ema.state_dict()[k], msg=f"ema.{k}")
    assert b.ema_updates == a.ema_updates == 3


def test_nonfinite_weights_are_named(vgg_file):
    s = stepper(vgg_file, perceptual_weight=0)
    s(*batches(1)[0])
    state = {"model": s.model.state_dict(), **s.state_dict()}
    assert nonfinite_weights(state) == []
    with torch.no_grad():
        s.disc.conv3.weight_orig[0, 0, 0, 0] = float("nan")
    state = {"model": s.model.state_dict(), **s.state_dict()}
    assert nonfinite_weights(state) == ["net_d.conv3.weight_orig"]


def test_bf16_channels_last_step(vgg_file):
    s = stepper(vgg_file, amp="bf16", channels_last=True)
    assert s.disc.conv0.weight.is_contiguous(memory_format=torch.channels_last)
    terms, _ = s(*batches(1)[0])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    assert s.disc.conv1.weight_u.dtype == torch.float32


def test_terms_turned_off(vgg_file):
    s = stepper(vgg_file, gan_weight=0, perceptual_weight=0)
    assert s.disc is None and s.percep is None
    terms, _ = s(*batches(1)[0])
    assert set(terms) == {"l_g_pix", "loss"}
    assert s.state_dict()["net_d"] is None
    with pytest.raises(ValueError, match="holds no discriminator"):
        stepper(vgg_file).load_state_dict(s.state_dict())


@pytest.mark.parametrize("kw, msg", [
    ({"pixel_weight": 0, "perceptual_weight": 0, "gan_weight": 0}, "are all 0"),
    ({"gan_weight": -0.1}, "--gan-weight -0.1: expected a weight >= 0"),
    ({"pixel_weight": float("nan")}, "--pixel-weight nan"),
])
def test_bad_weights(kw, msg):
    with pytest.raises(ValueError, match=msg):
        GANConfig(**kw).check()


def test_accumulation_is_refused():
    model = build_model("rrdbnet", 4, 8, 1, 4)
    gan = GANConfig(perceptual_weight=0, gan_weight=0)
    with pytest.raises(ValueError, match="give --accum 1, got --accum 2"):
        GANStepper(config(accum=2), gan, model, model, CPU, "off", 10)
