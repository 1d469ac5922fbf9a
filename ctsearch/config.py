"""A model's configuration and the names of its files: what every consumer of an encoder reads.

Torch-free on purpose: the index, the store and every Ray worker that only needs to know how a
model preprocesses its input import this, not ``ctsearch.model``. The window defaults are
``ctsearch.hu``'s presets, the dimensions come from the backbone registry.

Example:
    >>> cfg = ModelConfig(backbone="tiny", image_size=64)
    >>> cfg.embedding_dim, cfg.wide
    (128, (-200.0, 300.0))
    >>> ModelConfig.from_json(cfg.to_json()) == cfg
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from ctsearch.backbones import get_backbone
from ctsearch.hu import NARROW, WIDE, Rescale

MODEL_JSON = "model.json"
ENCODER_FILE = "encoder.safetensors"
RUN_CONFIG = "config.json"  # a training run's settings (ctsearch.jobs.train)

MAX_IMAGE_SIZE = 4096  # no CT slice is larger; a bigger value is a damaged or hand-edited config
Views = Literal["clinical", "standard"]  # clinical: wide + narrow window; standard: wide + wide


@dataclass
class ModelConfig:
    """Everything needed to rebuild an encoder and preprocess its input."""

    backbone: str = "resnet50"  # a name in ctsearch.backbones.BACKBONES
    image_size: int = 224
    views: Views = "clinical"
    rescale: Rescale = "reference"  # see ctsearch.hu.apply_window
    wide: tuple[float, float] = (WIDE.low, WIDE.high)
    narrow: tuple[float, float] = (NARROW.low, NARROW.high)
    model_id: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def embedding_dim(self) -> int:
        return get_backbone(self.backbone).dim

    def to_json(self) -> dict:
        d = asdict(self)
        d["embedding_dim"] = self.embedding_dim
        return d

    def check(self) -> ModelConfig:
        """Raise ValueError for a config no encoder can have (a hand-edited or damaged model.json)."""
        from typing import get_args

        get_backbone(self.backbone)
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int):
            raise ValueError(f"image_size must be an integer, got {self.image_size!r}")
        if not 16 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size {self.image_size} is outside 16..{MAX_IMAGE_SIZE} pixels")
        if self.views not in get_args(Views) or self.rescale not in get_args(Rescale):
            raise ValueError(f"views {self.views!r} / rescale {self.rescale!r} unknown")
        for name in ("wide", "narrow"):
            low, high = getattr(self, name)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"{name} window {low}..{high} HU is not a range")
        return self

    @classmethod
    def from_json(cls, d: dict) -> ModelConfig:
        known = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("wide", "narrow"):
            if key in kw:
                kw[key] = tuple(float(v) for v in kw[key])
        return cls(**kw)
