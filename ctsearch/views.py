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


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Grey [n, 1, S, S] -> pseudo-RGB [n, 3, S, S] (channels stacked, as the reference does)."""
    return x.expand(-1, 3, -1, -1).contiguous()


# ---------------------------------------------------------------------------------------------
# Training views (SimSiam). The reference code windows each slice, stacks it into pseudo-RGB and
# then gives each view its own independent augmentation (reference-facts.md, "Two views").

JITTER_SATURATION = {"paper": 0.4, "reference": 0.2}


def view_windows(config: ModelConfig) -> tuple[Window, Window]:
    """Windows of view 1 and view 2: clinical = (wide, narrow); standard = (wide, wide)."""
    wide, narrow = Window(*config.wide), Window(*config.narrow)
    if config.views == "clinical":
        return wide, narrow
    if config.views == "standard":
        return wide, wide
    raise ValueError(f"views must be 'clinical' or 'standard', got {config.views!r}")


CROP_SCALE = 0.2  # SimSiam's (and the paper's) smallest crop, as a fraction of the slice area


def augmentation(image_size: int, jitter: str = "paper", crop_scale: float = CROP_SCALE):
    """RandomResizedCrop(S, crop_scale-1) -> jitter (p 0.8) -> grayscale (p 0.2) -> flip (p 0.5), per image [3, y, x].

    ``jitter`` picks the saturation strength: ``paper`` 0.4 (paper text), ``reference`` 0.2
    (reference code). On pseudo-RGB, saturation, hue and grayscale leave the image unchanged.
    ``crop_scale`` is the smallest crop area as a fraction of the slice (paper: 0.2).
    """
    from torchvision.transforms import v2 as T

    if jitter not in JITTER_SATURATION:
        raise ValueError(f"jitter must be one of {sorted(JITTER_SATURATION)}, got {jitter!r}")
    if not 0.0 < crop_scale <= 1.0:
        raise ValueError(f"crop_scale must be in (0, 1], got {crop_scale!r}")
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(crop_scale, 1.0), antialias=True),
            T.RandomApply([T.ColorJitter(0.4, 0.4, JITTER_SATURATION[jitter], 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomHorizontalFlip(p=0.5),
        ]
    )


class TwoViews:
    """HU slices [n, y, x] -> two augmented views, each float32 [n, 3, S, S] in [0, 1].

    Randomness comes from torch's global generator: seed it (``torch.manual_seed``) for
    reproducible views.

    Example:
        >>> import numpy as np
        >>> views = TwoViews(ModelConfig(image_size=32, views="clinical"))
        >>> x1, x2 = views(np.zeros((2, 48, 48), np.int16))
        >>> tuple(x1.shape), tuple(x2.shape)
        ((2, 3, 32, 32), (2, 3, 32, 32))
    """

    def __init__(self, config: ModelConfig, jitter: str = "paper", crop_scale: float = CROP_SCALE):
        self.windows = view_windows(config)
        self.rescale = config.rescale
        self.augment = augmentation(config.image_size, jitter, crop_scale)

    def view(self, images: list[torch.Tensor], window: Window) -> torch.Tensor:
        return torch.stack(
            [self.augment(apply_window(img, window, self.rescale)[None].expand(3, -1, -1)) for img in images]
        )

    def __call__(self, hu) -> tuple[torch.Tensor, torch.Tensor]:
        """``hu``: int16 [n, y, x], or a list of [y, x] slices that may differ in size."""
        images = [torch.as_tensor(np.asarray(h)) for h in hu]
        return self.view(images, self.windows[0]), self.view(images, self.windows[1])
