"""Does the synthetic archive test the science? Untrained vs standard vs HU-clipping SimSiam.

Writes a synthetic archive (``ctsearch.synth.synth_archive``), cuts the paper's slice protocol
with ``ctsearch.prepare.prepare`` (5 liver + 5 non-liver slices per volume; the first
``--train-volumes`` volumes are the database, the rest the queries; with ``--train-slices all``
SimSiam also sees every other slice of the database volumes, unlabelled), then trains with
``ctsearch.jobs.train.train`` (the code behind ``ctsearch train``: Ray Train, the same views and
step) once per seed and method: ``--views standard``, ``--views clinical`` (HU clipping, the narrow
window on the wide window's scale as in the reference code) and ``--views clinical --rescale own``
(the narrow window stretched to [0, 1], which the paper's text also admits).
The untrained encoder is each run's epoch-0 evaluation: the same initial weights, before training.
Prints MAP@5 (the paper's formula) and 5-NN accuracy per seed and their mean, and, for scale,
the same metrics of Euclidean distance on the raw windowed pixels.

The paper's ordering is untrained < standard SimSiam < HU-clipping SimSiam; docs/synthetic.md
records the measured table.

Example:
    python bench/synth_calibration.py                      # demo settings, 2 seeds, ~6-10 min on 2 CPU cores
    python bench/synth_calibration.py --crop-scale 0.2 --train-slices protocol --zero-init-residual  # paper defaults
    python bench/synth_calibration.py --device cuda --backbone resnet18 --epochs 60
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ctsearch.jobs.train import TrainOptions, read_metrics, train
from ctsearch.metrics import knn_accuracy, map_at_k
from ctsearch.model import ModelConfig
from ctsearch.prepare import prepare
from ctsearch.preprocess import eval_transform
from ctsearch.store import read_slices
from ctsearch.synth import synth_archive


def raw_pixel_scores(prepared: Path, size: int) -> tuple[float, float]:
    """MAP@5 and 5-NN accuracy of L2 distance on the wide-windowed, resized pixels."""
    train_s, test_s = read_slices(prepared / "train.parquet"), read_slices(prepared / "test.parquet")
    cfg = ModelConfig(image_size=size)
    db = eval_transform(train_s.hu, cfg)[:, 0].reshape(len(train_s), -1).numpy()
    q = eval_transform(test_s.hu, cfg)[:, 0].reshape(len(test_s), -1).numpy()
    return (
        map_at_k(q, test_s.label, db, train_s.label, k=5),
        knn_accuracy(q, test_s.label, db, train_s.label, k=5),
    )


# method -> (--views, --rescale)
METHODS = {
    "standard": ("standard", "reference"),
    "clinical": ("clinical", "reference"),
    "clinical-own": ("clinical", "own"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--volumes", type=int, default=16, help="patients in the archive")
    ap.add_argument("--exams", type=int, default=2, help="examinations per patient")
    ap.add_argument("--train-volumes", type=int, default=24, help="database volumes (the rest are queries)")
    ap.add_argument("--size", type=int, default=64, help="slice size and network input (px)")
    ap.add_argument("--archive-seed", type=int, default=0)
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (initial weights, views, order)"
    )
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--base-lr", type=float, default=0.5)
    ap.add_argument("--crop-scale", type=float, default=0.5)
    ap.add_argument("--train-slices", default="all", choices=["protocol", "all"])
    ap.add_argument(
        "--zero-init-residual", action="store_true", help="SimSiam's zero-initialised residual BN"
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        help="standard: wide + wide; clinical: wide + narrow on the wide scale (reference code); "
        "clinical-own: wide + narrow stretched to [0, 1] (--rescale own)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cpus", type=float, default=2.0, help="CPUs for the training worker (torch threads)")
    ap.add_argument(
        "--keep", type=Path, default=None, help="keep archive, dataset and runs under this folder"
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        t0 = time.perf_counter()
        synth_archive(
            root / "archive", volumes=args.volumes, seed=args.archive_seed, size=args.size, exams=args.exams
        )
        s = prepare(
            root / "archive" / "nifti",
            root / "prepared",
            protocol="decathlon",
            per_volume=5,
            train_volumes=args.train_volumes,
            seed=args.archive_seed,
            all_train_slices=True,
        )
        print(
            f"archive seed {args.archive_seed}: {args.volumes} patients x {args.exams} exams at {args.size} px "
            f"({time.perf_counter() - t0:.0f} s); database {s['train_slices']} slices, queries {s['test_slices']}, "
            f"SimSiam trains on {s['train_all_slices'] if args.train_slices == 'all' else s['train_slices']} slices"
        )
        raw = raw_pixel_scores(root / "prepared", args.size)
        print(f"raw pixels (L2 on the wide window): MAP@5 {raw[0]:.3f}  5-NN acc {raw[1]:.3f}")

        results: dict[str, list[tuple[float, float]]] = {"untrained": [], **{m: [] for m in args.methods}}
        seconds: dict[str, list[float]] = {m: [] for m in args.methods}
        for seed in args.seeds:
            for method in args.methods:
                views, rescale = METHODS[method]
                opts = TrainOptions(
                    backbone=args.backbone,
                    image_size=args.size,
                    views=views,
                    rescale=rescale,
                    init="random",
                    zero_init_residual=args.zero_init_residual,
                    crop_scale=args.crop_scale,
                    train_slices=args.train_slices,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    base_lr=args.base_lr,
                    seed=seed,
                    eval_every=args.epochs,
                    max_failures=0,
                    cpus_per_worker=args.cpus,
                    gpus_per_worker=1.0 if args.device == "cuda" else 0.0,
                )
                out = root / "runs" / f"{method}-{seed}"
                summary = train(root / "prepared", out, opts)
                rows = [r for r in read_metrics(out) if "map_at_5" in r]
                first, last = rows[0], rows[-1]
                if method == args.methods[0]:  # every method starts from the same seeded weights
                    results["untrained"].append((first["map_at_5"], first["knn_accuracy"]))
                results[method].append((last["map_at_5"], last["knn_accuracy"]))
                seconds[method].append(summary["seconds"])
                print(
                    f"  seed {seed} {method:12s}: untrained MAP@5 {first['map_at_5']:.3f} 5-NN {first['knn_accuracy']:.3f}"
                    f" -> epoch {last['epoch']} MAP@5 {last['map_at_5']:.3f} 5-NN {last['knn_accuracy']:.3f}"
                    f"  (loss {last['loss']:.3f}, embedding_std {last['embedding_std']:.4f}, {summary['seconds']:.0f} s)",
                    flush=True,
                )

    names = {
        "untrained": "untrained (epoch 0)",
        "standard": "standard SimSiam (wide + wide)",
        "clinical": "HU-clipping SimSiam, --rescale reference",
        "clinical-own": "HU-clipping SimSiam, --rescale own",
    }
    print(
        f"\n{args.backbone}, {args.epochs} epochs, batch {args.batch_size}, base lr {args.base_lr}, crop scale "
        f"{args.crop_scale}, train slices {args.train_slices}, zero-init residual {args.zero_init_residual}; "
        f"mean ± sd over seeds {args.seeds}"
    )
    print("| encoder | MAP@5 | 5-NN acc | per seed (MAP@5 / 5-NN) | train s |")
    print("|---|---|---|---|---|")
    for key, vals in results.items():
        a = np.array(vals)
        per = ", ".join(f"{m:.3f}/{k:.3f}" for m, k in vals)
        secs = f"{np.mean(seconds[key]):.0f}" if key in seconds else ""
        print(
            f"| {names.get(key, key)} | {a[:, 0].mean():.3f} ± {a[:, 0].std():.3f} | "
            f"{a[:, 1].mean():.3f} ± {a[:, 1].std():.3f} | {per} | {secs} |"
        )
    print(f"| raw pixels, L2 | {raw[0]:.3f} | {raw[1]:.3f} | | |")


if __name__ == "__main__":
    main()
