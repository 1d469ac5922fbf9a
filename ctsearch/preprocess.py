"""The one evaluation transform: HU slices -> network input, for index, search, explain and evaluate.

Wide window, pseudo-RGB, short side resized to the model's image size (centre crop if not
square). The window, rescale rule and size come from the model's config, so index and query
are always preprocessed alike.

The resize is torch's antialiased bilinear (``F.interpolate(..., antialias=True)``, PIL's
triangle filter) written as two matrices, one per axis, each applied as a few banded matrix
products. numpy input is transformed with numpy: an indexing task that reads volumes on a CPU
never imports torch (seconds and ~450 MB per worker process). A tensor is transformed with torch
where it lies, with the same matrices: on a GPU, the embedding actor preprocesses whole batches.

Example:
    >>> import numpy as np
    >>> from ctsearch.config import ModelConfig
    >>> eval_pixels(np.zeros((2, 96, 80), np.int16), ModelConfig(image_size=64)).shape
    (2, 1, 64, 64)
    >>> x = eval_transform(np.zeros((2, 96, 96), np.int16), ModelConfig(image_size=64))
    >>> tuple(x.shape), x.dtype
    ((2, 3, 64, 64), torch.float32)
    >>> tuple(eval_transform_each([np.zeros((96, 96)), np.zeros((80, 64))], ModelConfig(image_size=32)).shape)
    (2, 3, 32, 32)
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from ctsearch.config import ModelConfig
from ctsearch.hu import Window, apply_window

if TYPE_CHECKING:
    import torch

BAND_OUTPUTS = 28  # outputs per banded product: a band of a 512 -> 224 resize reads ~70 inputs


@lru_cache(maxsize=64)
def resize_weights(n_in: int, n_out: int, keep: int | None = None) -> np.ndarray:
    """[keep, n_in] float32: row i resamples an axis of ``n_in`` pixels to output pixel i of ``n_out``.

    torch's antialiased bilinear weights (upsample_bilinear2d_aa, align_corners=False): a triangle
    filter stretched by the scale when shrinking, rows normalised to sum 1. ``keep``: only the
    centred ``keep`` outputs (the centre crop), whose rows are all that is computed.

    >>> resize_weights(2, 4)  # growing: plain bilinear, edges clamped
    array([[1.  , 0.  ],
           [0.75, 0.25],
           [0.25, 0.75],
           [0.  , 1.  ]], dtype=float32)
    """
    scale = n_in / n_out
    support = max(scale, 1.0)  # the triangle's half-width, in input pixels
    keep = n_out if keep is None else keep
    top = (n_out - keep) // 2
    w = np.zeros((keep, n_in), np.float64)
    for r, i in enumerate(range(top, top + keep)):
        centre = scale * (i + 0.5)
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        taps = np.maximum(0.0, 1.0 - np.abs((np.arange(lo, hi) - centre + 0.5) / support))
        w[r, lo:hi] = taps / taps.sum()
    return w.astype(np.float32)


@lru_cache(maxsize=64)
def _bands(n_in: int, n_out: int, keep: int) -> tuple[tuple[int, int, int, int, np.ndarray], ...]:
    """The weights cut into bands of outputs: (out from, out to, in from, in to, [in, out] block)."""
    w = resize_weights(n_in, n_out, keep)
    edges = np.linspace(0, keep, max(1, round(keep / BAND_OUTPUTS)) + 1).astype(int)
    bands = []
    for a, b in zip(edges[:-1], edges[1:]):
        used = np.flatnonzero(w[a:b].any(axis=0))
        lo, hi = int(used[0]), int(used[-1]) + 1
        bands.append((int(a), int(b), lo, hi, np.ascontiguousarray(w[a:b, lo:hi].T)))
    return tuple(bands)


def _resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    scale = size / min(h, w)
    return max(size, round(h * scale)), max(size, round(w * scale))


def resize_short_side(x: np.ndarray, size: int) -> np.ndarray:
    """[n, h, w] float32 -> [n, size, size]: antialiased bilinear resize of the short side to
    ``size``, then the centred square. Only the kept outputs are computed."""
    n, h, w = x.shape
    if (h, w) == (size, size):
        return x
    nh, nw = _resized_shape(h, w, size)
    y = np.empty((n, h, size), np.float32)
    rows_in, rows_out = x.reshape(n * h, w), y.reshape(n * h, size)
    for a, b, lo, hi, block in _bands(w, nw, size):  # along x: [n*h, in] @ [in, out]
        np.matmul(rows_in[:, lo:hi], block, out=rows_out[:, a:b])
    z = np.empty((n, size, size), np.float32)
    for a, b, lo, hi, block in _bands(h, nh, size):  # along y: [out, in] @ [n, in, size]
        np.matmul(block.T, y[:, lo:hi, :], out=z[:, a:b, :])
    return z


def eval_pixels(hu: np.ndarray, config: ModelConfig) -> np.ndarray:
    """HU slices [n, y, x] (or one [y, x]) -> float32 [n, 1, S, S] in [0, 1], with numpy only."""
    hu = np.asarray(hu)
    if hu.ndim == 2:
        hu = hu[None]
    x = apply_window(hu, Window(*config.wide), config.rescale)
    return resize_short_side(x, config.image_size)[:, None]


def eval_transform(hu, config: ModelConfig, channels: int = 3) -> torch.Tensor:
    """HU slices [n, y, x] (numpy, or a tensor on any device) -> float32 tensor [n, channels, S, S].

    The three pseudo-RGB channels are copies of one grey image: ``channels=1`` returns it alone,
    a third of the bytes, for moving slices between processes (``to_rgb`` restores the input).
    A tensor is transformed where it lies, with the weights ``eval_pixels`` uses.
    """
    import torch

    if isinstance(hu, torch.Tensor):
        t = hu[None] if hu.ndim == 2 else hu
        x = apply_window(t, Window(*config.wide), config.rescale)
        S = config.image_size
        h, w = x.shape[-2:]
        if (h, w) != (S, S):
            nh, nw = _resized_shape(h, w, S)
            wy = torch.from_numpy(resize_weights(h, nh, S)).to(x.device)
            wx = torch.from_numpy(resize_weights(w, nw, S)).to(x.device)
            x = wy @ (x @ wx.T)
        x = x[:, None]
    else:
        x = torch.from_numpy(eval_pixels(hu, config))
    return x.contiguous() if channels == 1 else to_rgb(x)


def eval_transform_each(slices: list[np.ndarray], config: ModelConfig, channels: int = 3) -> torch.Tensor:
    """HU slices [y, x] that may differ in size -> [n, channels, S, S], in the given order.

    Slices of one size are transformed as one stack (the resize runs once per size).
    """
    import torch

    S = config.image_size
    out = torch.zeros((len(slices), channels, S, S), dtype=torch.float32)
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, a in enumerate(slices):
        by_shape[tuple(np.shape(a))].append(i)
    for idx in by_shape.values():
        out[idx] = eval_transform(np.stack([slices[i] for i in idx]), config, channels)
    return out


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Grey [n, 1, S, S] -> pseudo-RGB [n, 3, S, S] (channels stacked, as the reference does)."""
    return x.expand(-1, 3, -1, -1).contiguous()
