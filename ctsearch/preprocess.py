"""The one evaluation transform: HU slices -> network input, for index, search, explain and evaluate.

Wide window, pseudo-RGB, short side resized to the model's image size (centre crop if not
square). The window, rescale rule and size come from the model's config, so index and query
are always preprocessed alike.

Example:
    >>> import numpy as np
    >>> from ctsearch.config import ModelConfig
    >>> x = eval_transform(np.zeros((2, 96, 96), np.int16), ModelConfig(image_size=64))
    >>> tuple(x.shape), x.dtype
    ((2, 3, 64, 64), torch.float32)
    >>> tuple(eval_transform_each([np.zeros((96, 96)), np.zeros((80, 64))], ModelConfig(image_size=32)).shape)
    (2, 3, 32, 32)
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from ctsearch.config import ModelConfig
from ctsearch.hu import Window, apply_window


def resize_short_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """[n, c, h, w] -> [n, c, size, size]: bilinear resize of the short side, then centre crop."""
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top : top + size, left : left + size]
    return x


def eval_transform(hu, config: ModelConfig, channels: int = 3) -> torch.Tensor:
    """HU slices [n, y, x] (numpy or tensor) -> float32 tensor [n, channels, S, S] in [0, 1].

    The three pseudo-RGB channels are copies of one grey image: ``channels=1`` returns it alone,
    a third of the bytes, for moving slices between processes (``to_rgb`` restores the input).
    """
    t = torch.as_tensor(np.asarray(hu) if not isinstance(hu, torch.Tensor) else hu)
    if t.ndim == 2:
        t = t[None]
    x = apply_window(t, Window(*config.wide), config.rescale)[:, None]
    x = resize_short_side(x, config.image_size)
    return x.contiguous() if channels == 1 else to_rgb(x)


def eval_transform_each(slices: list[np.ndarray], config: ModelConfig, channels: int = 3) -> torch.Tensor:
    """HU slices [y, x] that may differ in size -> [n, channels, S, S], in the given order.

    Slices of one size are transformed as one stack (the resize runs once per size).
    """
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
