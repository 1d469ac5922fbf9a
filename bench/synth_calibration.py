"""Is the synthetic archive hard enough? Retrieval quality of an untrained encoder on it.

Writes a synthetic archive (``ctsearch.synth.synth_archive``), cuts the paper's slice protocol
with ``ctsearch.prepare.prepare`` (5 liver + 5 non-liver slices per volume; the first
``--train`` volumes are the database, the rest the queries), embeds every slice with a randomly
initialised encoder through ``ctsearch.views.eval_transform`` and prints MAP@5 (the paper's
formula) and 5-NN accuracy per archive seed and encoder seed. An archive where an untrained
network already scores ~1.0 cannot tell methods apart; the target is about 0.8-0.9
(docs/synthetic.md records the measured numbers).

Example:
    python bench/synth_calibration.py --seeds 0 1 --backbones tiny resnet18
    python bench/synth_calibration.py --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ctsearch.metrics import knn_accuracy, map_at_k
from ctsearch.model import ModelConfig, build_encoder
from ctsearch.prepare import prepare
from ctsearch.store import read_slices
from ctsearch.synth import synth_archive
from ctsearch.views import eval_transform


@torch.no_grad()
def embed(hu: np.ndarray, cfg: ModelConfig, seed: int, device: str) -> np.ndarray:
    """float32 [n, D] embeddings of HU slices [n, y, x] by a randomly initialised encoder."""
    torch.manual_seed(seed)
    enc = build_encoder(cfg).eval().to(device)
    if device == "cuda":
        enc = enc.to(memory_format=torch.channels_last)
    out = []
    for i in range(0, len(hu), 256):
        x = eval_transform(hu[i : i + 256], cfg).to(device)
        if device == "cuda":
            x = x.to(memory_format=torch.channels_last)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out.append(enc(x).float().cpu())
    return torch.cat(out).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=40, help="database volumes")
    ap.add_argument("--test", type=int, default=12, help="query volumes")
    ap.add_argument("--size", type=int, default=64, help="slice size (px)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="archive seeds")
    ap.add_argument("--init-seeds", type=int, nargs="+", default=[0, 1], help="encoder initialisation seeds")
    ap.add_argument("--backbones", nargs="+", default=["tiny", "resnet18"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", type=Path, default=None, help="keep the archives under this folder")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            root = (args.keep / f"seed{seed}") if args.keep else Path(tmp)
            t0 = time.perf_counter()
            summary = synth_archive(root / "archive", volumes=args.train + args.test, seed=seed, size=args.size)
            t_synth = time.perf_counter() - t0
            prepare(root / "archive" / "nifti", root / "prepared", protocol="decathlon", per_volume=5,
                    train_volumes=args.train, seed=seed)
            train, test = read_slices(root / "prepared" / "train.parquet"), read_slices(root / "prepared" / "test.parquet")
            print(f"archive seed {seed}: {summary.volumes} volumes, {summary.slices} slices, {t_synth:.1f} s to write; "
                  f"db {len(train.label)} slices, queries {len(test.label)} slices")
            for backbone in args.backbones:
                cfg = ModelConfig(backbone=backbone, image_size=args.size)
                for init in args.init_seeds:
                    db = embed(train.hu, cfg, init, args.device)
                    q = embed(test.hu, cfg, init, args.device)
                    m = map_at_k(q, test.label, db, train.label, k=5)
                    acc = knn_accuracy(q, test.label, db, train.label, k=5)
                    rows.append((seed, backbone, init, m, acc))
                    print(f"  {backbone:9s} init {init}: MAP@5 {m:.3f}  5-NN acc {acc:.3f}")
    print("\nmean over archive and init seeds:")
    for backbone in args.backbones:
        sel = [r for r in rows if r[1] == backbone]
        maps, accs = np.array([r[3] for r in sel]), np.array([r[4] for r in sel])
        print(f"  {backbone:9s} MAP@5 {maps.mean():.3f} ± {maps.std():.3f}  5-NN acc {accs.mean():.3f} ± {accs.std():.3f}"
              f"  (n={len(sel)})")


if __name__ == "__main__":
    main()
