"""Image pipelines from HU slices to network input.

``eval_transform`` is the one preprocessing used by evaluation, indexing, search and RELAX:
wide window, pseudo-RGB, short side resized to the model's image size (centre crop if not square).

Example:
    >>> import numpy as np
    >>> from ctsearch.model import ModelConfig
    >>> x = eval_transform(np.zeros((2, 96, 96), np.int16), ModelConfig(image_size=64))
    >>> tuple(x.shape), x.dtype
    ((2, 3, 64, 64), torch.float32)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ctsearch.hu import Window, apply_window
from ctsearch.model import ModelConfig


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


def eval_transform(hu, config: ModelConfig) -> torch.Tensor:
    """HU slices [n, y, x] (numpy or tensor) -> float32 tensor [n, 3, S, S] in [0, 1]."""
    t = torch.as_tensor(np.asarray(hu) if not isinstance(hu, torch.Tensor) else hu)
    if t.ndim == 2:
        t = t[None]
    x = apply_window(t, Window(*config.wide), config.rescale)[:, None]
    x = resize_short_side(x, config.image_size)
    return x.expand(-1, 3, -1, -1).contiguous()
