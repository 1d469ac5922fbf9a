"""Backbones, SimSiam heads, and the encoder that index/search/explain load.

The encoder is the backbone up to global average pooling; its config (backbone, image size,
windows) travels with the weights in ``model.json`` so every consumer preprocesses identically.

Example:
    >>> cfg = ModelConfig(backbone="tiny", image_size=64)
    >>> enc = build_encoder(cfg)
    >>> import torch
    >>> enc(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 128])
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet
from ctsearch.errors import CTSearchInputError

MODEL_JSON = "model.json"
ENCODER_FILE = "encoder.safetensors"


@dataclass
class ModelConfig:
    """Everything needed to rebuild an encoder and preprocess its input."""

    backbone: str = "resnet50"
    image_size: int = 224
    views: str = "clinical"  # clinical (wide + narrow) | standard (wide + wide)
    rescale: str = "reference"  # reference | own (see ctsearch.hu)
    wide: tuple[float, float] = (-200.0, 300.0)
    narrow: tuple[float, float] = (50.0, 150.0)
    model_id: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def embedding_dim(self) -> int:
        return BACKBONES[self.backbone][1]

    def to_json(self) -> dict:
        d = asdict(self)
        d["embedding_dim"] = self.embedding_dim
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("wide", "narrow"):
            if key in kw:
                kw[key] = tuple(float(v) for v in kw[key])
        return cls(**kw)


def _tiny_resnet() -> nn.Module:
    """A ResNet-10 with widths 16..128: the same architecture family, small enough for CPU tests."""
    net = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], zero_init_residual=True)
    widths = (16, 32, 64, 128)
    net.inplanes = 16
    net.conv1 = nn.Conv2d(3, 16, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(16)
    net.layer1 = net._make_layer(resnet.BasicBlock, widths[0], 1)
    net.layer2 = net._make_layer(resnet.BasicBlock, widths[1], 1, stride=2)
    net.layer3 = net._make_layer(resnet.BasicBlock, widths[2], 1, stride=2)
    net.layer4 = net._make_layer(resnet.BasicBlock, widths[3], 1, stride=2)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, resnet.BasicBlock):
            nn.init.zeros_(m.bn2.weight)
    return net


# name -> (constructor, embedding dim)
BACKBONES: dict[str, tuple] = {
    "resnet50": (lambda: resnet.resnet50(weights=None, zero_init_residual=True), 2048),
    "resnet18": (lambda: resnet.resnet18(weights=None, zero_init_residual=True), 512),
    "tiny": (_tiny_resnet, 128),
}


def build_encoder(config: ModelConfig) -> nn.Module:
    """Backbone with its classifier replaced by identity: [n, 3, S, S] -> [n, D]."""
    if config.backbone not in BACKBONES:
        raise CTSearchInputError(None, f"unknown backbone {config.backbone!r}; choose one of {sorted(BACKBONES)}")
    net = BACKBONES[config.backbone][0]()
    net.fc = nn.Identity()
    return net


def save_encoder(encoder: nn.Module, config: ModelConfig, out_dir: str | os.PathLike) -> Path:
    """Write ``encoder.safetensors`` and ``model.json`` atomically into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    tmp = out / (ENCODER_FILE + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, out / ENCODER_FILE)
    tmp = out / (MODEL_JSON + ".tmp")
    tmp.write_text(json.dumps(config.to_json(), indent=2))
    os.replace(tmp, out / MODEL_JSON)
    return out


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig]:
    """Load an encoder from a run directory (or the folder holding model.json), in eval mode."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_file() and p.name == MODEL_JSON:
        p = p.parent
    cfg_path, w_path = p / MODEL_JSON, p / ENCODER_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise CTSearchInputError(p, f"not a model directory: expected {MODEL_JSON} and {ENCODER_FILE} (written by `ctsearch train`)")
    try:
        config = ModelConfig.from_json(json.loads(cfg_path.read_text()))
    except (ValueError, TypeError) as e:
        raise CTSearchInputError(cfg_path, f"unreadable model config ({e})") from None
    encoder = build_encoder(config)
    encoder.load_state_dict(load_file(str(w_path)))
    return encoder.to(device).eval(), config
