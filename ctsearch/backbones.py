"""The backbone registry: every encoder architecture ctsearch can train, index and explain with.

A backbone is one :class:`Backbone` entry in :data:`BACKBONES`; nothing else in ctsearch names
an architecture. Importing this module does not import torch (``ctsearch.config`` reads the
dimensions from here): the builders import torchvision when they run.

Adding one (docs/architecture.md, "Adding a backbone"): write a builder that returns the network
with its classifier replaced by ``nn.Identity`` (``[n, 3, S, S] -> [n, dim]``), a function that
lists its residual branches' last BatchNorm layers, and register both here.

Example:
    >>> BACKBONES["resnet50"].dim, BACKBONES["resnet50"].imagenet_file
    (2048, 'resnet50-0676ba61.pth')
    >>> backbone_help()
    'resnet50 (2048-d), resnet18 (512-d), tiny (128-d, tests)'
    >>> TRAINABLE
    ['resnet50', 'resnet18', 'tiny']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ctsearch.errors import CTSearchInputError


@dataclass(frozen=True)
class Backbone:
    """One encoder architecture.

    Attributes:
        name: the ``--backbone`` value.
        dim: embedding dimension, the width of the pooled features.
        build: () -> headless network (classifier replaced by ``nn.Identity``), torch's init.
        residual_bns: network -> the BatchNorm layers that close each residual branch
            (``ctsearch.model.set_residual_bn``).
        imagenet_file: torchvision's file name of its ImageNet weights (None: none exist).
        classifier: prefix of the classifier's keys in ImageNet state dicts, dropped on load.
        note: shown in ``--help`` beside the name.
    """

    name: str
    dim: int
    build: Callable[[], Any]
    residual_bns: Callable[[Any], Iterable[Any]]
    imagenet_file: str | None = None
    classifier: str = "fc"
    note: str = ""
    trainable: bool = True


def _headless(net):
    from torch import nn

    net.fc = nn.Identity()
    return net


def _resnet_residual_bns(net) -> Iterable:
    from torchvision.models import resnet

    for m in net.modules():
        if isinstance(m, resnet.Bottleneck):
            yield m.bn3
        elif isinstance(m, resnet.BasicBlock):
            yield m.bn2


def _torchvision_resnet(name: str) -> Callable[[], Any]:
    def build():
        from torchvision.models import resnet

        # zero_init_residual as in SimSiam's code: every residual branch starts as identity.
        return _headless(getattr(resnet, name)(weights=None, zero_init_residual=True))

    return build


def _tiny_resnet():
    """A ResNet-10 with widths 16..128: the same architecture family, small enough for CPU tests."""
    from torch import nn
    from torchvision.models import resnet

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
    for bn in _resnet_residual_bns(net):
        nn.init.zeros_(bn.weight)
    return _headless(net)


def _null_encoder(dim: int = 2048):
    """[n, 3, S, S] -> [n, dim] at no cost: ``dim`` pixels sampled evenly across the image.

    It stands in for a GPU's model on a CPU-only machine (bench/index.py): the pipeline around
    it must then deliver slices as fast as the CPUs decode them. Its embeddings mean nothing.
    """
    from torch import nn

    class NullEncoder(nn.Module):
        takes_grey = True  # reads the first channel only: the same on grey and pseudo-RGB input

        def forward(self, x):
            flat = x[:, 0].flatten(1)
            step = max(1, flat.shape[1] // dim)
            return flat[:, ::step][:, :dim].float()

    return NullEncoder()


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            "resnet50", 2048, _torchvision_resnet("resnet50"), _resnet_residual_bns, "resnet50-0676ba61.pth"
        ),
        Backbone(
            "resnet18", 512, _torchvision_resnet("resnet18"), _resnet_residual_bns, "resnet18-f37072fd.pth"
        ),
        Backbone("tiny", 128, _tiny_resnet, _resnet_residual_bns, note="tests"),
        Backbone("null", 2048, _null_encoder, lambda net: (), note="benchmarks only", trainable=False),
    )
}
TRAINABLE = [name for name, b in BACKBONES.items() if b.trainable]  # what --backbone offers


def get_backbone(name: str) -> Backbone:
    """The registry entry of ``name``; an unknown name is a one-line user error."""
    if name not in BACKBONES:
        raise CTSearchInputError(None, f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name]


def backbone_help() -> str:
    """The backbones for ``--help`` texts: name and dimension, in registry order."""
    return ", ".join(
        f"{b.name} ({b.dim}-d{', ' + b.note if b.note else ''})" for b in BACKBONES.values() if b.trainable
    )
