"""RELAX: reference equivalence, reproducibility, and a synthetic encoder with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ctsearch.model import ModelConfig, build_encoder
from ctsearch.relax import MaskSampler, make_masks, relax, relax_per_mask, u_relax

S = 32


class RegionEncoder(nn.Module):
    """Looks only at rows/cols [8, 16): its representation is the region's 2x2-pooled pixels plus a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = nn.functional.avg_pool2d(x[:, :, 8:16, 8:16], 2).flatten(1)
        return torch.cat([region, torch.ones(len(x), 4)], dim=1)


def tiny_encoder(seed: int) -> nn.Module:
    """The tiny backbone at S px in eval mode, seeded, with non-trivial BN statistics so masked
    representations differ enough to give structured maps."""
    torch.manual_seed(seed)
    enc = build_encoder(ModelConfig(backbone="tiny", image_size=S)).eval()
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_mean.uniform_(-0.1, 0.1)
    return enc


@pytest.fixture(scope="module")
def tiny():
    return tiny_encoder(0)


def test_masks_follow_the_reference_recipe():
    m = make_masks(400, S, grid=7, p=0.5, seed=0)
    assert m.shape == (400, S, S) and m.dtype == torch.float32
    assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    assert abs(float(m.mean()) - 0.5) < 0.03
    assert torch.equal(m, make_masks(400, S, seed=0))
    assert not torch.equal(m, make_masks(400, S, seed=1))
    s = MaskSampler(400, S, seed=0)
    assert int(s.shifts.min()) == 0 and int(s.shifts.max()) == 6
    # Drawing in pieces gives the same masks as all at once.
    assert torch.equal(torch.cat([s.sample(0, 150), s.sample(150, 400)]), m)
    assert abs(float(make_masks(400, S, p=0.2).mean()) - 0.2) < 0.03


def test_synthetic_encoder_importance_is_highest_in_its_region():
    torch.manual_seed(1)
    x = torch.rand(3, S, S)
    res = relax(RegionEncoder(), x, num_masks=600, batch_size=100, seed=0)
    inside = np.zeros((S, S), bool)
    inside[8:16, 8:16] = True
    r = res.importance
    assert r[inside].mean() > r[~inside].mean() + 0.02
    # The most important pixel lies inside the region.
    assert np.unravel_index(np.argmax(r), r.shape) in set(zip(*np.nonzero(inside)))
    assert res.uncertainty.shape == (S, S) and np.all(res.uncertainty >= 0)


def test_matches_reference_per_mask_loop(tiny):
    torch.manual_seed(2)
    x = torch.rand(3, S, S)
    m = make_masks(250, S, seed=4)
    ours = relax(tiny, x, masks=m, batch_size=64)
    ref = relax_per_mask(tiny, x, m, batch_size=100)
    assert np.abs(ours.importance - ref.importance).max() <= 1e-5
    assert np.abs(ours.uncertainty - ref.uncertainty).max() <= 1e-6
    assert ref.importance.std() > 1e-4  # the comparison is not between two flat maps


def test_explicit_masks_reproducible_across_runs_batch_sizes_and_stacks(tiny):
    torch.manual_seed(3)
    x = torch.rand(2, 3, S, S)
    m = make_masks(120, S, seed=5)
    a = relax(tiny, x[0], masks=m, batch_size=40)
    b = relax(tiny, x[0], masks=m, batch_size=40)
    assert np.array_equal(a.importance, b.importance) and np.array_equal(a.uncertainty, b.uncertainty)
    for bs in (7, 120):
        c = relax(tiny, x[0], masks=m, batch_size=bs)
        np.testing.assert_allclose(c.importance, a.importance, atol=1e-6)
        np.testing.assert_allclose(c.uncertainty, a.uncertainty, atol=1e-7)
    both = relax(tiny, x, masks=m, batch_size=50)
    assert both.importance.shape == (2, S, S)
    np.testing.assert_allclose(both.importance[0], a.importance, atol=1e-6)
    np.testing.assert_allclose(both.importance[1], relax(tiny, x[1], masks=m).importance, atol=1e-6)
    # Seeded masks do not depend on the batch size either.
    s1 = relax(tiny, x[0], num_masks=90, batch_size=13, seed=9)
    s2 = relax(tiny, x[0], num_masks=90, batch_size=90, seed=9)
    np.testing.assert_allclose(s1.importance, s2.importance, atol=1e-6)


def test_pair_target(tiny):
    torch.manual_seed(4)
    x, y = torch.rand(3, S, S), torch.rand(3, S, S)
    m = make_masks(60, S, seed=6)
    own = relax(tiny, x, masks=m)
    with torch.no_grad():
        hx, hy = tiny(x[None])[0], tiny(y[None])[0]
    same = relax(tiny, x, masks=m, target=hx)
    np.testing.assert_allclose(same.importance, own.importance, atol=1e-6)
    pair = relax(tiny, x, masks=m, target=hy)
    assert np.abs(pair.importance - own.importance).max() > 1e-4
    # Importance of the pair is, per pixel, the mask-weighted mean cosine between y and the masked x.
    with torch.no_grad():
        cos = nn.functional.cosine_similarity(hy[None], tiny(x[None] * m[:, None]), dim=1)  # [60]
    expected = (cos[:, None, None] * m).sum(0) / m.sum(0)
    np.testing.assert_allclose(pair.importance, expected.numpy(), atol=1e-5)


def test_tolerance_stops_early_and_reports(tiny):
    x = torch.rand(3, S, S)
    early = relax(tiny, x, num_masks=1200, batch_size=100, tolerance=0.5, check_every=100)
    assert early.masks_used < 1200 and early.masks_used % 100 == 0
    full = relax(tiny, x, num_masks=400, batch_size=100, tolerance=1e-9, check_every=100)
    assert full.masks_used == 400


def test_u_relax_keeps_low_uncertainty_pixels():
    imp = np.ones((2, 4, 4))
    unc = np.zeros((2, 4, 4))
    unc[:, 0, :] = 10.0
    out = u_relax(imp, unc, gamma=1.0)
    assert np.all(out[:, 0, :] == 0) and np.all(out[:, 1:, :] == 1)
    out = u_relax(imp, unc, average="median")
    assert np.all(out[:, 0, :] == 0) and np.all(out[:, 1:, :] == 0)  # median 0: nothing is below it
    with pytest.raises(ValueError):
        u_relax(imp, unc, average="mode")


def test_bad_shapes(tiny):
    with pytest.raises(ValueError):
        relax(tiny, torch.rand(1, S, S), num_masks=4)
    with pytest.raises(ValueError):
        relax(tiny, torch.rand(3, S, S), masks=torch.rand(4, S + 1, S + 1))


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no bf16 instructions"
)
def test_bf16_on_the_cpu_agrees_with_float32(tiny):
    """The opt-in CPU bf16 path: the same maps to within what bf16 arithmetic allows (corr >= 0.99)."""
    x = torch.rand(2, 3, S, S)
    f32 = relax(tiny, x, num_masks=400, batch_size=100, seed=0, precision="float32")
    bf16 = relax(tiny, x, num_masks=400, batch_size=100, seed=0, precision="bf16")
    assert not np.array_equal(f32.importance, bf16.importance)  # bf16 was really used
    for a, b in zip(f32.importance, bf16.importance):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.99
    auto = relax(tiny, x, num_masks=400, batch_size=100, seed=0)
    np.testing.assert_array_equal(auto.importance, f32.importance)  # auto is float32 on a CPU


def test_unknown_precision_is_refused(tiny):
    with pytest.raises(ValueError, match="precision"):
        relax(tiny, torch.rand(3, S, S), num_masks=8, precision="fp8")


def test_folded_encoder_gives_the_reference_maps_and_follows_changed_weights():
    """relax() runs the encoder with BatchNorm folded, kept between calls: the maps stay the
    reference loop's (run on the encoder as given), also after its weights change."""
    from ctsearch.relax import _FAST

    enc = tiny_encoder(5)
    x = torch.rand(3, S, S)
    masks = make_masks(120, S, seed=7)
    made = []
    for _ in range(2):
        ours = relax(enc, x, masks=masks, batch_size=40)
        ref = relax_per_mask(enc, x, masks, batch_size=100)
        assert np.abs(ours.importance - ref.importance).max() <= 1e-5
        assert np.abs(ours.uncertainty - ref.uncertainty).max() <= 1e-6
        assert ref.importance.std() > 1e-4
        fast = _FAST[enc][1]
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
        assert relax(enc, x, masks=masks[:10]).masks_used == 10 and _FAST[enc][1] is fast  # kept
        made.append(fast)
        with torch.no_grad():
            enc.conv1.weight.mul_(-1.5)  # what a training step does between two explanations
    assert made[0] is not made[1]  # rebuilt for the changed weights (whose maps matched above)
