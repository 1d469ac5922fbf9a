"""SimSiam's loss, optimiser, learning-rate schedule and one training step, free of any framework.

``ctsearch.jobs.train`` runs ``train_step`` inside Ray Train; ``bench/train.py`` runs the very
same step in a bare loop to measure what Ray costs.

Example:
    >>> import torch
    >>> from ctsearch.model import ModelConfig, SimSiam
    >>> model = SimSiam(ModelConfig(backbone="tiny", image_size=32))
    >>> opt = build_optimizer(model, batch_size=4)
    >>> loss = train_step(model, opt, torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32))
    >>> -1.0 <= loss <= 1.0
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-mean cosine similarity of rows of p [n, d] with rows of z [n, d] (z must already be detached)."""
    return -F.cosine_similarity(p.float(), z.float(), dim=-1).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetrised loss -(cos(p1, sg z2) + cos(p2, sg z1)) / 2; in [-1, 1], -1 is perfect agreement."""
    return (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2


@dataclass
class OptimConfig:
    """SimSiam's SGD recipe; lr = base_lr * batch_size / 256 (batch_size is the global batch)."""

    base_lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "constant"  # constant (paper) | cosine (original SimSiam)
    fix_pred_lr: bool = False
    epochs: int = 250

    @property
    def init_lr(self) -> float:
        return self.base_lr * self.batch_size / 256


def build_optimizer(
    model: nn.Module, batch_size: int = 32, config: OptimConfig | None = None
) -> torch.optim.SGD:
    """SGD over the trainable parameters; the predictor is its own group so its lr can stay fixed."""
    config = config or OptimConfig(batch_size=batch_size)
    predictor = getattr(model, "module", model).predictor
    pred_ids = {id(p) for p in predictor.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in pred_ids], "fix_lr": False},
        {"params": [p for p in params if id(p) in pred_ids], "fix_lr": config.fix_pred_lr},
    ]
    return torch.optim.SGD(
        groups, lr=config.init_lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def lr_at(epoch: int, config: OptimConfig) -> float:
    """Learning rate for 0-based ``epoch``: constant, or SimSiam's half-cosine decay over ``epochs``."""
    if config.schedule == "constant":
        return config.init_lr
    if config.schedule == "cosine":
        return config.init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    raise ValueError(f"schedule must be 'constant' or 'cosine', got {config.schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, epoch: int, config: OptimConfig) -> float:
    """Apply ``lr_at(epoch)`` to every group except those marked ``fix_lr``; returns the lr."""
    lr = lr_at(epoch, config)
    for group in optimizer.param_groups:
        group["lr"] = config.init_lr if group.get("fix_lr") else lr
    return lr


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x1: torch.Tensor,
    x2: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
    sync: bool = True,
) -> float | torch.Tensor:
    """One SGD step on a pair of views [n, 3, S, S]; returns the loss as a float.

    ``sync=False`` returns it as a 0-d tensor on the device instead, so the host does not wait for
    the step: it prepares the next batch while the GPU computes (the training loop sums an epoch).

    ``autocast_dtype`` (e.g. ``torch.bfloat16`` on GPU) runs the forward pass under autocast on
    the inputs' device; the loss itself is always computed in float32.
    """
    device_type = x1.device.type
    with torch.autocast(
        device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    ):
        p1, p2, z1, z2 = model(x1, x2)
    loss = simsiam_loss(p1, p2, z1, z2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()) if sync else loss.detach()
