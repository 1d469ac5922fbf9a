"""SimSiam training views: two differently windowed, independently augmented copies of a slice.

The evaluation transform (index, search, explain, evaluate) is ``ctsearch.preprocess``.

Example:
    >>> import numpy as np
    >>> from ctsearch.config import ModelConfig
    >>> x1, x2 = TwoViews(ModelConfig(image_size=32, views="clinical"))(np.zeros((2, 48, 48), np.int16))
    >>> tuple(x1.shape), tuple(x2.shape)
    ((2, 3, 32, 32), (2, 3, 32, 32))
"""

from __future__ import annotations

import numpy as np
import torch

from ctsearch.config import ModelConfig
from ctsearch.hu import Window, apply_window
from ctsearch.preprocess import eval_transform  # noqa: F401 - index.json names it "ctsearch.views.eval_transform"

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
