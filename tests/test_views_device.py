"""Batched training views (ctsearch.device_views) against torchvision's pipeline (ctsearch.views), on CPU.

(a) For given parameters the batched code equals torchvision's functional ops image by image:
    crop boxes, flip, grayscale and brightness exactly; resize within 2e-6 and the jitter ops
    within 5e-6 (float32 rounding: matmul instead of the resize kernel's loop, per-image factor
    tensors instead of Python floats); the whole pipeline from HU within 1e-5.
(b) Drawn parameters follow torchvision's distributions: crop scale, log aspect ratio and
    position against torchvision's own RandomResizedCrop draws (two-sample KS tests, which the
    last test shows can fail), the centre-crop fallback, jitter ranges and the p of each random op.
(c) ``ctsearch train`` runs end to end with ``--views-device cpu`` and with the batched views.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from ctsearch.config import ModelConfig
from ctsearch.device_views import (
    BatchedTwoViews,
    ViewParams,
    augment,
    color_jitter,
    crop_resize_flip,
    jitter_ranges,
    resolve_views_device,
    sample_crops,
    sample_params,
    stack_hu,
)
from ctsearch.errors import CTSearchInputError
from ctsearch.hu import apply_window
from ctsearch.jobs.train import TrainOptions, check_options, decode_hu, hu_tensor, read_metrics, train
from ctsearch.views import view_windows

JITTER_FNS = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
RESIZE_ATOL, JITTER_ATOL, PIPELINE_ATOL = 2e-6, 5e-6, 1e-5
N_DRAWS = 10_000


def _params(n: int, h: int, w: int, seed: int = 0, **kw) -> ViewParams:
    torch.manual_seed(seed)
    p = sample_params(torch.full((n,), h), torch.full((n,), w), **kw)
    p.jitter[:] = True  # (a) tests every op on every image
    return p


def _torchvision_view(img: torch.Tensor, p: ViewParams, i: int, size: int) -> torch.Tensor:
    """Image i through torchvision's functional ops with the parameters of row i (the reference)."""
    box = [int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i])]
    x = F.resized_crop(img, *box, [size, size], antialias=True)
    if p.jitter[i]:
        for op in p.order[i].tolist():
            x = JITTER_FNS[op](x, float(p.factors[i, op]))
    if p.grayscale[i]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    return F.horizontal_flip(x) if p.flip[i] else x


# ----------------------------------------------------------------------------------- (a) fixed parameters


@pytest.mark.parametrize("size", [24, 64, 150])  # upscaling, mixed, downscaling (antialiased)
def test_crop_resize_flip_matches_torchvision(size):
    img = torch.rand(16, 3, 100, 120, generator=torch.Generator().manual_seed(1))
    p = _params(16, 100, 120)
    out = crop_resize_flip(img, p, size)
    for i in range(16):
        ref = F.resized_crop(
            img[i], int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i]), [size] * 2
        )
        ref = F.horizontal_flip(ref) if p.flip[i] else ref
        torch.testing.assert_close(out[i], ref, atol=RESIZE_ATOL, rtol=0)
    # The flip is folded into the resize weights: exactly the mirrored unflipped result.
    flipped = p.flip.clone()
    p.flip[:] = False
    plain = crop_resize_flip(img, p, size)
    assert torch.equal(out[flipped], plain[flipped].flip(-1)) and torch.equal(out[~flipped], plain[~flipped])


def test_padded_slices_of_other_sizes_are_cropped_inside_their_own_pixels():
    rng = np.random.default_rng(0)
    slices = [rng.random((h, w), np.float32) for h, w in [(40, 70), (64, 64), (90, 33)]]
    padded, sizes = stack_hu([(s * 1000).astype(np.int16) for s in slices])
    assert padded.shape == (3, 90, 70) and sizes.tolist() == [[40, 70], [64, 64], [90, 33]]
    torch.manual_seed(0)
    p = sample_params(sizes[:, 0], sizes[:, 1])
    assert ((p.top + p.height <= sizes[:, 0]) & (p.left + p.width <= sizes[:, 1])).all()
    out = crop_resize_flip(padded[:, None].float(), p, 32)
    for i in range(3):
        ref = F.resized_crop(padded[i, None, : sizes[i, 0], : sizes[i, 1]].float(), *_box(p, i), [32, 32])
        torch.testing.assert_close(out[i], F.horizontal_flip(ref) if p.flip[i] else ref, atol=1e-3, rtol=1e-6)


def test_a_ray_batch_decodes_into_one_padded_tensor_like_the_cpu_path():
    rng = np.random.default_rng(1)
    slices = [rng.integers(-1000, 2000, shape).astype("<i2") for shape in [(5, 7), (6, 4), (5, 7)]]
    batch = {
        "hu": np.array([s.tobytes() for s in slices], dtype=object),
        "height": np.array([s.shape[0] for s in slices]),
        "width": np.array([s.shape[1] for s in slices]),
    }
    got, sizes = hu_tensor(batch)
    want, want_sizes = stack_hu(decode_hu(batch))
    assert torch.equal(got, want) and torch.equal(sizes, want_sizes)
    batch["hu"][1] = batch["hu"][1][:-2]
    with pytest.raises(ValueError, match="holds 46 bytes, expected 48"):
        hu_tensor(batch)


def _box(p: ViewParams, i: int) -> list[int]:
    return [int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i])]


def test_color_jitter_and_grayscale_match_torchvision_on_colour_images():
    x = torch.rand(48, 3, 20, 24, generator=torch.Generator().manual_seed(2))
    p = _params(48, 20, 24, seed=3)
    p.jitter[::5] = False  # some images skip the jitter, as with p = 0.8
    out = color_jitter(x.clone(), p)
    for i in range(48):
        ref = x[i]
        if p.jitter[i]:
            for op in p.order[i].tolist():
                ref = JITTER_FNS[op](ref, float(p.factors[i, op]))
        torch.testing.assert_close(out[i], ref, atol=JITTER_ATOL, rtol=0)
    assert torch.equal(out[~p.jitter], x[~p.jitter])
    # Brightness alone is the same float op as torchvision's: exact (grey images, where hue is the
    # identity; contrast and saturation factors 1 add exactly 0).
    grey = x[:, :1].contiguous()
    p.order[:] = torch.tensor([0, 1, 2, 3])
    p.factors[:, 1:] = torch.tensor([1.0, 1.0, 0.05])
    only = color_jitter(grey.clone(), p)
    for i in range(48):
        assert torch.equal(
            only[i], F.adjust_brightness(grey[i], float(p.factors[i, 0])) if p.jitter[i] else grey[i]
        )
    # Grayscale (here after crop and flip): torchvision's 3-channel grey, three exactly equal channels.
    p = _params(48, 20, 24, seed=4)
    p.jitter[:] = False
    full = augment(x, p, 20)
    for i in range(48):
        ref = _torchvision_view(x[i], p, i, 20)
        torch.testing.assert_close(full[i], ref, atol=RESIZE_ATOL, rtol=0)
        if p.grayscale[i]:
            assert torch.equal(full[i][0], full[i][1]) and torch.equal(full[i][1], full[i][2])


def test_pseudo_rgb_on_one_channel_equals_three_equal_channels_and_torchvision():
    grey = torch.rand(16, 1, 50, 60, generator=torch.Generator().manual_seed(5))
    p = _params(16, 50, 60, seed=6, jitter="paper")
    p.grayscale[::3] = True
    one = augment(grey, p, 40)
    three = augment(grey.expand(-1, 3, -1, -1), p, 40)
    torch.testing.assert_close(one, three, atol=1e-6, rtol=0)
    for i in range(16):
        torch.testing.assert_close(
            one[i], _torchvision_view(grey[i].expand(3, -1, -1), p, i, 40), atol=JITTER_ATOL, rtol=0
        )


def test_the_whole_pipeline_from_hu_matches_torchvision_for_the_same_parameters():
    """BatchedTwoViews' steps (window, then augment the pseudo-RGB slice) against TwoViews' torchvision ops."""
    cfg = ModelConfig(image_size=48, views="clinical")
    hu = torch.from_numpy(np.random.default_rng(7).integers(-400, 500, (12, 80, 80)).astype(np.int16))
    for window in view_windows(cfg):
        x = apply_window(hu, window, cfg.rescale)[:, None]
        p = _params(12, 80, 80, seed=8)
        p.jitter[::4] = False
        out = augment(x, p, 48)
        for i in range(12):
            ref = _torchvision_view(x[i].expand(3, -1, -1), p, i, 48)
            torch.testing.assert_close(out[i], ref, atol=PIPELINE_ATOL, rtol=0)


def test_batched_two_views_shapes_devices_and_seeding():
    views = BatchedTwoViews(ModelConfig(image_size=32, views="clinical"))
    hu = torch.from_numpy(np.random.default_rng(0).integers(-300, 400, (6, 40, 50)).astype(np.int16))
    torch.manual_seed(0)
    a1, a2 = views(hu)
    torch.manual_seed(0)
    b1, b2 = views([h.numpy() for h in hu])  # a list of slices: stacked here
    assert a1.shape == a2.shape == (6, 3, 32, 32) and a1.dtype == torch.float32
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert 0.0 <= float(a1.min()) and float(a1.max()) <= 1.0
    # the narrow view lives inside the wide scale's [0.5, 0.7] (rescale "reference"), up to the jitter
    assert not torch.equal(a1, a2)


def test_views_device_choice():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 1)
    assert resolve_views_device("auto", cpu) is None and resolve_views_device("cpu", gpu) is None
    assert resolve_views_device("auto", gpu) == "cuda:1" == resolve_views_device("cuda", gpu)
    assert resolve_views_device("cpu-batched", gpu) == "cpu"
    with pytest.raises(RuntimeError, match="needs a GPU worker"):
        resolve_views_device("cuda", cpu)
    with pytest.raises(CTSearchInputError, match="--views-device cuda needs GPU workers"):
        check_options(TrainOptions(views_device="cuda"))
    with pytest.raises(CTSearchInputError, match="--views-device must be one of"):
        check_options(TrainOptions(views_device="gpu"))


# ----------------------------------------------------------------------------------- (b) distributions


def _torchvision_crops(h: int, w: int, scale: tuple[float, float], n: int) -> np.ndarray:
    rrc = T.RandomResizedCrop(8, scale=scale)
    img = torch.empty(1, h, w)
    rows = [rrc.make_params([img]) for _ in range(n)]
    return np.array([[r["top"], r["left"], r["height"], r["width"]] for r in rows], dtype=np.float64)


def _ours(h: int, w: int, scale: tuple[float, float], n: int) -> np.ndarray:
    top, left, hh, ww = sample_crops(torch.full((n,), h), torch.full((n,), w), scale)
    return torch.stack([top, left, hh, ww], 1).double().numpy()


def _stats(c: np.ndarray, h: int, w: int) -> dict[str, np.ndarray]:
    top, left, hh, ww = c.T
    return {
        "scale": hh * ww / (h * w),
        "log_ratio": np.log(ww / hh),
        "top": np.where(hh < h, top / np.maximum(h - hh, 1), 0.5),
        "left": np.where(ww < w, left / np.maximum(w - ww, 1), 0.5),
    }


@pytest.mark.parametrize("h,w,scale", [(512, 512, (0.2, 1.0)), (120, 300, (0.2, 1.0)), (64, 64, (0.5, 1.0))])
def test_crop_boxes_follow_torchvision_get_params(h, w, scale):
    torch.manual_seed(11)
    ref = _stats(_torchvision_crops(h, w, scale, N_DRAWS), h, w)
    torch.manual_seed(12)
    ours = _stats(_ours(h, w, scale, N_DRAWS), h, w)
    for name in ref:
        assert ks_2samp(ref[name], ours[name]).pvalue > 1e-3, name
        assert abs(ref[name].mean() - ours[name].mean()) < 0.02 * max(1.0, abs(ref[name].mean())), name


def test_crop_fallback_is_torchvision_centre_crop():
    # A 20 x 400 strip: no crop of area >= 0.2 with aspect in [3/4, 4/3] fits, every draw falls back.
    torch.manual_seed(0)
    ref = _torchvision_crops(20, 400, (0.2, 1.0), 50)
    ours = _ours(20, 400, (0.2, 1.0), 50)
    assert (ref == ref[0]).all() and (ours == ref[0]).all(), (ref[0], ours[0])
    torch.manual_seed(0)
    tall = _ours(400, 20, (0.2, 1.0), 5)
    assert (tall == _torchvision_crops(400, 20, (0.2, 1.0), 1)[0]).all()


def test_the_crop_test_detects_another_distribution():
    """The KS test above has power: a smallest crop of 0.3 instead of 0.2 fails it."""
    torch.manual_seed(11)
    ref = _stats(_torchvision_crops(256, 256, (0.2, 1.0), N_DRAWS), 256, 256)
    torch.manual_seed(12)
    other = _stats(_ours(256, 256, (0.3, 1.0), N_DRAWS), 256, 256)
    assert ks_2samp(ref["scale"], other["scale"]).pvalue < 1e-6


@pytest.mark.parametrize("jitter", ["paper", "reference"])
def test_jitter_grayscale_flip_probabilities_and_ranges(jitter):
    torch.manual_seed(21)
    p = sample_params(torch.full((N_DRAWS,), 64), torch.full((N_DRAWS,), 64), jitter=jitter)

    def within(hits: torch.Tensor, prob: float) -> bool:  # 5 binomial standard deviations
        return abs(float(hits.float().sum()) - N_DRAWS * prob) < 5 * math.sqrt(N_DRAWS * prob * (1 - prob))

    assert within(p.jitter, 0.8) and within(p.grayscale, 0.2) and within(p.flip, 0.5)
    # torchvision's ColorJitter(0.4, 0.4, s, 0.1) ranges, and uniform factors inside them.
    cj = T.ColorJitter(0.4, 0.4, {"paper": 0.4, "reference": 0.2}[jitter], 0.1)
    ranges = jitter_ranges(jitter)
    for op, name in enumerate(["brightness", "contrast", "saturation", "hue"]):
        lo, hi = getattr(cj, name)
        assert ranges[op].tolist() == pytest.approx([lo, hi])
        f = p.factors[:, op].numpy()
        assert lo <= f.min() and f.max() <= hi
        assert ks_2samp((f - lo) / (hi - lo), np.random.default_rng(op).random(N_DRAWS)).pvalue > 1e-3
    # Orders: permutations of the four ops, each of the 24 about equally often.
    assert (p.order.sort(1).values == torch.arange(4)).all()
    _, counts = torch.unique(p.order, dim=0, return_counts=True)
    assert len(counts) == 24 and all(within(torch.ones(int(c)), 1 / 24) for c in counts)


# ----------------------------------------------------------------------------------- (c) training end to end


@pytest.mark.ray
def test_train_end_to_end_with_batched_views_then_resumed_with_torchvisions(
    ray_session, slice_dataset, tmp_path
):
    """The batched views train a run end to end; the torchvision path (``cpu``, what ``auto``
    is on a CPU worker, so every other training test runs it) continues it."""
    opts = TrainOptions(
        backbone="tiny",
        image_size=32,
        init="random",
        epochs=2,
        batch_size=8,
        eval_every=2,
        max_failures=0,
        views_device="cpu-batched",
    )
    s = train(slice_dataset, tmp_path / "run", opts)
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert s["epochs"] == 2 and len(rows) == 2
    assert all(math.isfinite(r["loss"]) and -1.0 <= r["loss"] <= 1.0 for r in rows)
    assert "map_at_5" in rows[-1] and (tmp_path / "run" / "encoder.safetensors").is_file()
    # The views device is how, not what, is trained: a rerun may change it and continues the run.
    more = TrainOptions(**{**opts.__dict__, "epochs": 3, "views_device": "cpu"})
    again = train(slice_dataset, tmp_path / "run", more)
    assert again["resumed_after_epoch"] == 2 and again["epochs"] == 3
    last = [r for r in read_metrics(tmp_path / "run") if "loss" in r][-1]
    assert last["epoch"] == 3 and math.isfinite(last["loss"])
