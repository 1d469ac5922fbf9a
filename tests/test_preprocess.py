"""The eval transform's resize is torch's antialiased bilinear, computed with numpy or with torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctsearch.config import ModelConfig
from ctsearch.hu import NARROW, WIDE, Window, apply_window
from ctsearch.preprocess import eval_pixels, eval_transform, resize_short_side, resize_weights


def torch_resize_short_side(x: np.ndarray, size: int) -> np.ndarray:
    """What the transform did before it had its own weights: F.interpolate, then the centre crop."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    t = F.interpolate(
        torch.from_numpy(x).double()[:, None],
        size=(nh, nw),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    top, left = (nh - size) // 2, (nw - size) // 2
    return t[:, 0, top : top + size, left : left + size].float().numpy()


@pytest.mark.parametrize(
    "h,w,size",
    [
        (512, 512, 224),  # a CT slice for the paper's model
        (512, 400, 224),  # not square: the long side is cropped
        (400, 512, 224),
        (513, 511, 224),  # odd sizes
        (100, 100, 99),  # barely shrinking
        (64, 64, 224),  # growing: no antialiasing
        (30, 50, 224),
        (7, 300, 5),
        (96, 96, 64),
    ],
)
def test_resize_equals_torch_antialiased_bilinear(h, w, size):
    x = np.random.default_rng(h * w + size).random((3, h, w), dtype=np.float32)
    got = resize_short_side(x, size)
    assert got.shape == (3, size, size) and got.dtype == np.float32
    # against torch in float64: ours is within float32 rounding (torch's own float32 path is not:
    # it differs from its float64 result by up to ~1e-5)
    np.testing.assert_allclose(got, torch_resize_short_side(x, size), atol=1e-6)


def test_weights_rows_sum_to_one_and_the_crop_keeps_the_centre_rows():
    full = resize_weights(300, 260)
    np.testing.assert_allclose(full.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(resize_weights(300, 260, 224), full[18:242])
    same = np.ones((1, 224, 224), np.float32)
    assert resize_short_side(same, 224) is same  # already the size: nothing resampled


def test_a_tensor_is_transformed_where_it_lies_with_the_same_weights():
    cfg = ModelConfig(image_size=64)
    hu = np.random.default_rng(0).integers(-1000, 1500, size=(4, 120, 100)).astype(np.int16)
    as_numpy = eval_transform(hu, cfg, channels=1)
    as_tensor = eval_transform(torch.from_numpy(hu), cfg, channels=1)
    assert as_numpy.shape == as_tensor.shape == (4, 1, 64, 64)
    torch.testing.assert_close(as_tensor, as_numpy, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(eval_pixels(hu, cfg), as_numpy.numpy())
    rgb = eval_transform(hu, cfg)
    assert rgb.shape == (4, 3, 64, 64) and torch.equal(rgb[:, 2], as_numpy[:, 0])


@pytest.mark.parametrize("window", [WIDE, NARROW, Window(-0.5, 10.25)])
@pytest.mark.parametrize("rescale", ["reference", "own"])
def test_window_of_integers_equals_the_window_of_their_float_values(window, rescale):
    hu = np.random.default_rng(1).integers(-1200, 1500, size=(5, 33)).astype(np.int16)
    got = apply_window(hu, window, rescale)
    want = apply_window(hu.astype(np.float64), window, rescale)
    assert got.dtype == np.float32 and got.shape == hu.shape
    np.testing.assert_array_equal(got, want.astype(np.float32))
    np.testing.assert_array_equal(got, apply_window(torch.from_numpy(hu), window, rescale).numpy())
