"""What RELAX's early stop (``tolerance=``) saves, and what it costs in agreement.

For each tolerance: masks used (of ``--masks``), and the agreement of the importance maps with
the full run (smallest per-slice correlation, largest difference over the map's range). A second
full run with another seed gives RELAX's own sampling noise to compare with.

    .venv/bin/python bench/relax_tolerance.py            # tiny, 64 px, 4 slices, 3000 masks
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from relax import phantom_slices

from ctsearch.model import ModelConfig, build_encoder
from ctsearch.preprocess import eval_transform
from ctsearch.relax import relax


def agreement(maps: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(smallest correlation, largest |diff| / range) over corresponding [n, S, S] maps."""
    corr = min(np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(maps, reference))
    diff = max(np.abs(a - b).max() / np.ptp(b) for a, b in zip(maps, reference))
    return float(corr), float(diff)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--masks", type=int, default=3000)
    ap.add_argument("--tolerances", default="0.1,0.05,0.02,0.01")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=a.backbone, image_size=a.size)
    enc = build_encoder(cfg).eval()
    for m in enc.modules():  # spread BN statistics, as bench/relax.py does
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_mean.uniform_(-0.1, 0.1)
    x = eval_transform(phantom_slices(a.images, max(a.size, 96)), cfg)
    full = relax(enc, x, num_masks=a.masks, batch_size=100, seed=1).importance
    for tol in map(float, a.tolerances.split(",")):
        r = relax(enc, x, num_masks=a.masks, batch_size=100, seed=1, tolerance=tol)
        corr, diff = agreement(r.importance, full)
        print(
            f"tolerance {tol}: {r.masks_used} of {a.masks} masks; min corr {corr:.4f}, max |diff|/range {diff:.3f}"
        )
    corr, _ = agreement(relax(enc, x, num_masks=a.masks, batch_size=100, seed=2).importance, full)
    print(f"another seed, {a.masks} masks (sampling noise): min corr {corr:.4f}")


if __name__ == "__main__":
    main()
