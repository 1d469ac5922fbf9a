"""Model heads, initial weights (never downloaded), training views and the SimSiam step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctsearch.errors import CTSearchInputError
from ctsearch.hu import NARROW, WIDE
from ctsearch.model import (
    IMAGENET_FILES,
    ModelConfig,
    SimSiam,
    build_encoder,
    embed,
    initial_encoder_state,
    load_encoder,
    save_encoder,
    simsiam_dims,
)
from ctsearch.ssl import OptimConfig, build_optimizer, lr_at, set_lr, simsiam_loss, train_step
from ctsearch.views import TwoViews, view_windows

TINY = ModelConfig(backbone="tiny", image_size=64)


def test_simsiam_heads_follow_reference_dims():
    assert simsiam_dims("resnet50") == (2048, 512)
    assert simsiam_dims("resnet18") == (512, 128)
    m = SimSiam(ModelConfig(backbone="resnet50"))
    linears = [lin for lin in m.projector if isinstance(lin, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features, lin.bias is not None) for lin in linears] == [
        (2048, 2048, False),
        (2048, 2048, False),
        (2048, 2048, True),
    ]
    assert m.projector[-1].affine is False
    pred = [lin for lin in m.predictor if isinstance(lin, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features, lin.bias is not None) for lin in pred] == [
        (2048, 512, False),
        (512, 2048, True),
    ]


def test_simsiam_forward_stops_gradient_on_targets():
    m = SimSiam(TINY)
    p1, p2, z1, z2 = m(torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64))
    assert p1.shape == z1.shape == (4, 128)
    assert p1.requires_grad and not z1.requires_grad and not z2.requires_grad


def test_loss_is_minus_one_for_aligned_and_zero_for_orthogonal():
    a = torch.randn(8, 16)
    assert simsiam_loss(a, a, a, a).item() == pytest.approx(-1.0, abs=1e-6)
    e = torch.eye(2)
    assert simsiam_loss(e[:1], e[:1], e[1:], e[1:]).item() == pytest.approx(0.0, abs=1e-6)


def test_one_step_changes_weights_and_loss_is_finite():
    torch.manual_seed(0)
    m = SimSiam(TINY)
    opt = build_optimizer(m, batch_size=8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    views = TwoViews(TINY)
    x1, x2 = views(np.random.default_rng(0).integers(-300, 400, (8, 80, 80)).astype(np.int16))
    loss = train_step(m, opt, x1, x2)
    assert np.isfinite(loss) and -1.0 <= loss <= 1.0
    after = m.state_dict()
    changed = [
        k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])
    ]
    assert any(k.startswith("encoder.conv1") for k in changed)
    assert any(k.startswith("predictor.") for k in changed)
    assert torch.equal(before["projector.6.bias"], after["projector.6.bias"])  # frozen, as in SimSiam


def test_lr_schedules_and_fixed_predictor_lr():
    const = OptimConfig(batch_size=32, epochs=10)
    assert lr_at(0, const) == lr_at(9, const) == pytest.approx(0.05 * 32 / 256)
    cos = OptimConfig(batch_size=256, epochs=10, schedule="cosine", fix_pred_lr=True)
    assert lr_at(0, cos) == pytest.approx(0.05)
    assert lr_at(5, cos) == pytest.approx(0.025)
    m = SimSiam(TINY)
    opt = build_optimizer(m, config=cos)
    set_lr(opt, 5, cos)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.025), pytest.approx(0.05)]
    assert sum(p.numel() for p in opt.param_groups[1]["params"]) == sum(
        p.numel() for p in m.predictor.parameters()
    )


def test_view_windows_and_rescale():
    clinical, standard = ModelConfig(views="clinical"), ModelConfig(views="standard")
    assert view_windows(clinical) == (WIDE, NARROW)
    assert view_windows(standard) == (WIDE, WIDE)
    hu = np.random.default_rng(1).integers(-1000, 1000, (3, 64, 64)).astype(np.int16)
    # Without augmentation randomness the narrow view of the reference rescale lies in [0.5, 0.7].
    views = TwoViews(ModelConfig(image_size=64, views="clinical"))
    views.augment = lambda img: img
    x1, x2 = views(hu)
    assert x1.min() == 0.0 and x1.max() == 1.0
    assert x2.min() == pytest.approx(0.5) and x2.max() == pytest.approx(0.7)
    own = TwoViews(ModelConfig(image_size=64, views="clinical", rescale="own"))
    own.augment = lambda img: img
    assert own(hu)[1].max() == 1.0
    std = TwoViews(ModelConfig(image_size=64, views="standard"))
    std.augment = lambda img: img
    a, b = std(hu)
    assert torch.equal(a, b)


def test_views_are_augmented_pseudo_rgb_and_seeded():
    hu = np.random.default_rng(2).integers(-300, 400, (4, 96, 96)).astype(np.int16)
    views = TwoViews(ModelConfig(image_size=64), jitter="reference")
    torch.manual_seed(0)
    x1, x2 = views(hu)
    torch.manual_seed(0)
    y1, _ = views(hu)
    assert x1.shape == (4, 3, 64, 64) and x1.dtype == torch.float32
    assert torch.equal(x1, y1)
    assert 0.0 <= float(x1.min()) and float(x1.max()) <= 1.0
    assert torch.equal(x1[:, 0], x1[:, 1])  # grey stays grey through jitter and grayscale
    x3, _ = views(hu)
    assert not torch.equal(x1, x3)
    with pytest.raises(ValueError):
        TwoViews(ModelConfig(), jitter="strong")


def test_imagenet_weights_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(CTSearchInputError) as e:
        initial_encoder_state("imagenet", ModelConfig(backbone="resnet18"))
    msg = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / IMAGENET_FILES["resnet18"]) in msg
    assert "never downloads" in msg and "\n" not in msg
    with pytest.raises(CTSearchInputError, match="resnet50 or resnet18"):
        initial_encoder_state("imagenet", TINY)


def test_imagenet_weights_from_torch_cache_and_file(tmp_path, monkeypatch):
    from torchvision.models import resnet18

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.manual_seed(3)
    tv = resnet18()  # stands in for the ImageNet file: same layout, keys and fc included
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(tv.state_dict(), cache / IMAGENET_FILES["resnet18"])
    cfg = ModelConfig(backbone="resnet18")
    state = initial_encoder_state("imagenet", cfg)
    assert "fc.weight" not in state
    assert torch.equal(state["conv1.weight"], tv.conv1.weight)
    enc = build_encoder(cfg)
    enc.load_state_dict(state)  # strict: every key fits
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {f"module.encoder.{k}": v for k, v in tv.state_dict().items()}}, other)
    assert torch.equal(
        initial_encoder_state("imagenet", cfg, weights=other)["layer4.1.bn2.weight"], tv.layer4[1].bn2.weight
    )
    assert initial_encoder_state("random", cfg) is None


def test_init_from_run_dir_and_mismatch(tmp_path):
    torch.manual_seed(4)
    enc = build_encoder(TINY)
    save_encoder(enc, TINY, tmp_path / "run")
    state = initial_encoder_state(str(tmp_path / "run"), TINY)
    assert all(torch.equal(state[k], v) for k, v in enc.state_dict().items())
    with pytest.raises(CTSearchInputError, match="holds a tiny encoder"):
        initial_encoder_state(str(tmp_path / "run"), ModelConfig(backbone="resnet18"))
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(CTSearchInputError, match="do not fit a tiny encoder"):
        initial_encoder_state(str(bad), TINY)
    with pytest.raises(CTSearchInputError, match="no such run directory"):
        initial_encoder_state(str(tmp_path / "missing"), TINY)


def test_saved_encoder_gives_identical_embeddings(tmp_path):
    torch.manual_seed(5)
    enc = build_encoder(TINY)
    # Non-trivial BN statistics, so the test would catch buffers that are not saved.
    enc.train()
    enc(torch.rand(8, 3, 64, 64))
    hu = np.random.default_rng(5).integers(-300, 400, (6, 64, 64)).astype(np.int16)
    expected = embed(enc, hu, TINY)
    save_encoder(enc, TINY, tmp_path)
    loaded, cfg = load_encoder(tmp_path)
    assert cfg == TINY
    np.testing.assert_array_equal(embed(loaded, hu, cfg), expected)


@pytest.mark.parametrize("backbone", ["tiny", "resnet18"])
def test_grey_input_encoder_equals_the_encoder_on_the_pseudo_rgb_stack(backbone):
    """What the embedding actor runs (no 3x copy of each slice) embeds as the encoder does on to_rgb."""
    from ctsearch.model import ModelConfig, build_encoder, grey_input, set_residual_bn
    from ctsearch.preprocess import to_rgb

    torch.manual_seed(0)
    enc = set_residual_bn(build_encoder(ModelConfig(backbone=backbone, image_size=64)), 1.0).eval()
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        want, got = enc(to_rgb(x)), grey_input(enc)(x)
    assert got.shape == want.shape and want.abs().max() > 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert next(enc.parameters()).shape[1] == 3  # the encoder itself is left as it was
    assert grey_input(grey_input(enc)) is None  # its first convolution already takes one channel


def test_grey_input_of_encoders_without_a_pseudo_rgb_convolution():
    from ctsearch.model import ModelConfig, build_encoder, grey_input
    from ctsearch.preprocess import to_rgb

    null = build_encoder(ModelConfig(backbone="null", image_size=32))
    x = torch.rand(2, 1, 32, 32)
    assert grey_input(null) is null and torch.equal(null(x), null(to_rgb(x)))
    # An encoder that does not say it reads grey input is not given it.
    assert grey_input(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))) is None


@pytest.mark.parametrize("backbone", ["tiny", "resnet18"])
def test_folded_batchnorm_encoder_equals_the_encoder(backbone):
    from ctsearch.model import ModelConfig, build_encoder, fold_batchnorm, set_residual_bn

    torch.manual_seed(0)
    enc = set_residual_bn(build_encoder(ModelConfig(backbone=backbone, image_size=64)), 1.0)
    for m in enc.modules():  # running statistics as after training, so folding them matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    enc.eval()
    folded = fold_batchnorm(enc)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), enc(x), atol=1e-5, rtol=1e-4)
    assert fold_batchnorm(enc.train()) is enc  # training mode: batch statistics, nothing to fold

    class Branchy(torch.nn.Module):  # control flow on a value: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else self.conv(x)

    branchy = Branchy().eval()
    assert fold_batchnorm(branchy) is branchy
