"""Indexing throughput: is the Ray Data pipeline limited by the model and by decoding, or by itself?

Measured side by side in one run, on the same synthetic archive:
  decode, 1 core  what a reading task does per slice, in this process on one thread: read the
                  volume (gzip + NIfTI), plus window/resize slab by slab where the model is on
                  the CPU
  decode + hash   the same plus the two sha256 every reading task records (file bytes for
                  duplicates, pixels for copies in other formats)
  bare model      encoder forward passes on ready batches, in-process (bf16 + channels_last on a GPU)
  pipeline        ``index_source`` end to end (decode, preprocess, embed, parquet + FAISS commits);
                  with ``--repeat N`` N runs on one Ray instance: the first cold (Ray Data's own
                  actors and the workers start), the others warm, as jobs on a long-lived cluster
The one-core rates are measured before and after the pipeline; the faster is the baseline.

Targets (issue 12):
  --backbone null (an encoder that costs nothing: the GPU regime simulated on a CPU)
      pipeline >= 0.8 x decode cores x (decode, 1 core)
  --device cuda
      pipeline >= 0.8 x min(bare model, decode cores x decode, 1 core)
  a real model on the CPU
      pipeline >= 0.8 x bare model
"decode cores" are the CPUs Ray may run reading tasks on: ``--num-cpus`` less the one the
embedding actor holds. With a null encoder the actor stands in for a GPU node's model, which
holds a CPU of its own; give Ray one CPU more than the cores you want decoding.

The archive is ``--distinct`` synthetic volumes written once, then copied until there are
``--volumes`` files; each copy differs in its gzip header's timestamp only, so its bytes (and
content hash) differ but decoding it costs the same.

    .venv/bin/python bench/index.py --backbone null --volumes 40 --size 512 --num-cpus 3 --repeat 3
    .venv/bin/python bench/index.py --backbone resnet18 --volumes 10 --size 256
    python3 bench/index.py --device cuda --backbone resnet50 --volumes 48 --size 512
"""

from __future__ import annotations

import os

# "decode, 1 core" is one core, numpy's BLAS (the resize's matrix products) included, as in a
# reading task (Ray gives a 1-CPU task OMP_NUM_THREADS=1). Set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402

from ctsearch.jobs.index import SLAB_SLICES, index_source  # noqa: E402
from ctsearch.model import (  # noqa: E402
    ModelConfig,
    build_encoder,
    fold_batchnorm,
    grey_input,
    load_encoder,
    save_encoder,
)
from ctsearch.preprocess import eval_pixels  # noqa: E402
from ctsearch.synth import synth_archive  # noqa: E402


def make_archive(out: Path, volumes: int, distinct: int, size: int) -> list[Path]:
    """``volumes`` .nii.gz files in ``out``, copies of ``distinct`` synthetic volumes."""
    synth_archive(out / "synth", volumes=distinct, seed=0, size=size, fmt="nifti")
    sources = sorted((out / "synth" / "nifti" / "imagesTr").glob("*.nii.gz"))
    (out / "flat").mkdir()
    paths = []
    for i in range(volumes):
        p = out / "flat" / f"vol_{i:04d}.nii.gz"
        shutil.copyfile(sources[i % len(sources)], p)
        with open(p, "r+b") as f:  # gzip MTIME (bytes 4-7): another file, the same data
            f.seek(4)
            f.write(i.to_bytes(4, "little"))
        paths.append(p)
    return paths


def decode_one_core(paths: list[Path], config: ModelConfig, with_preprocess: bool) -> dict[str, float]:
    """slices/s in this process on one thread, no Ray: ``read``, ``decode`` (read + preprocess
    where the model is on the CPU) and ``decode + hash`` (plus the two sha256 a reading task
    records: the file's bytes and the pixels). bench/read.py compares the reading with
    nibabel's and pydicom's own."""
    from ctsearch.io import read_volume
    from ctsearch.store import content_hash

    read_s = prep_s = hash_s = 0.0
    n = 0
    for p in paths:
        t0 = time.perf_counter()
        vol = read_volume(p)
        t1 = time.perf_counter()
        if with_preprocess:  # what a reading task does for a CPU model, slab by slab
            for a in range(0, len(vol.hu), SLAB_SLICES):
                eval_pixels(vol.hu[a : a + SLAB_SLICES], config)
        t2 = time.perf_counter()
        content_hash(p), vol.pixel_hash()
        read_s, prep_s, hash_s = read_s + t1 - t0, prep_s + t2 - t1, hash_s + time.perf_counter() - t2
        n += len(vol.hu)
    return {
        "read": n / read_s,
        "decode": n / (read_s + prep_s),
        "decode + hash": n / (read_s + prep_s + hash_s),
    }


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """{pid: (what it is, CPU seconds so far)} of every process on this machine (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(d.name)] = (cmd, (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
    return out


def cpu_breakdown(before: dict, after: dict, driver: int) -> dict[str, float]:
    """CPU seconds spent between two ``cpu_seconds`` snapshots, by kind of process."""
    kinds: dict[str, float] = {}
    for pid, (cmd, t) in after.items():
        used = t - before.get(pid, (cmd, 0.0))[1]
        if used <= 0:
            continue
        if pid == driver:
            kind = "driver (this process)"
        elif cmd.startswith("ray::"):
            kind = cmd.split()[0]  # ray::IDLE, ray::MapWorker(...), ray::ReadVolumeRows ...
        elif "raylet" in cmd or "gcs_server" in cmd or "/ray/" in cmd:
            kind = "Ray system (raylet, GCS, agents)"
        else:
            kind = "other processes"
        kinds[kind] = kinds.get(kind, 0.0) + used
    return kinds


def bare_model(model_dir: Path, n: int, batch_size: int, device: str) -> float:
    """slices/s of the encoder alone on ready grey batches (bf16 + channels_last on a GPU)."""
    model, config = load_encoder(model_dir, device=device)
    model = fold_batchnorm(grey_input(model))  # as the embedding actor runs it (grey input)
    torch.backends.cudnn.benchmark = device != "cpu"  # as the embedding actor does
    S = config.image_size
    x = torch.rand(batch_size, 1, S, S).to(device)
    if device != "cpu":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        if device == "cpu":
            return model(x).float().cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x).float().cpu()  # .cpu() waits for the GPU, as the pipeline does

    batches = max(3, n // batch_size)
    with torch.inference_mode():
        run()  # warm-up
        t0 = time.perf_counter()
        for _ in range(batches):
            run()
    return batches * batch_size / (time.perf_counter() - t0)


def run_pipeline(arc: Path, model: Path, out: Path, gpus: int, batch_size: int) -> dict:
    """One ``index_source`` run: wall, rates, start-up and CPU seconds by kind of process."""
    done_at: list[float] = []
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    s = index_source(
        arc / "flat",
        model,
        out,
        gpus=gpus,
        batch_size=batch_size,
        on_volume=lambda done, total: done_at.append(time.perf_counter()),
    )
    wall = time.perf_counter() - t0
    # Start-up (Ray Data planning, workers, the model actor) until the first volume is embedded,
    # then the steady rate over the remaining volumes (all volumes have about the same size).
    last = done_at[-1] - done_at[0]
    steady = s.rows_added * (len(done_at) - 1) / len(done_at) / last if len(done_at) > 1 and last > 0 else 0.0
    return {
        "rows": s.rows_added,
        "wall": wall,
        "rate": s.rows_added / wall,
        "first": done_at[0] - t0,
        "steady": steady,
        "cpu": cpu_breakdown(cpu0, cpu_seconds(), os.getpid()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--backbone", default="resnet18", help="resnet50 | resnet18 | tiny | null (costs nothing)"
    )
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--volumes", type=int, default=10, help="volumes in the archive (~190 slices each)")
    ap.add_argument("--distinct", type=int, default=4, help="distinct synthetic volumes among them")
    ap.add_argument("--size", type=int, default=256, help="synthetic slice side, pixels")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs given to Ray (default: all cores)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="pipeline runs on the same Ray instance: the first starts Ray Data's own actors and "
        "the workers (cold), later ones find them running, as jobs on a long-lived cluster do (warm)",
    )
    ap.add_argument(
        "--stats", action="store_true", help="print Ray Data's per-stage statistics of the pipeline"
    )
    ap.add_argument("--archive", type=Path, default=None, help="keep the archive here and reuse it next time")
    args = ap.parse_args()
    torch.manual_seed(0)
    gpus = 1 if args.device == "cuda" else 0
    ray_cpus = args.num_cpus or os.cpu_count() or 1
    decode_cores = max(1, ray_cpus - 1)  # the embedding actor holds one
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        arc = args.archive or tmp / "archive"
        paths = sorted((arc / "flat").glob("*.nii.gz"))
        if len(paths) != args.volumes:
            shutil.rmtree(arc, ignore_errors=True)
            arc.mkdir(parents=True)
            t0 = time.perf_counter()
            paths = make_archive(arc, args.volumes, min(args.distinct, args.volumes), args.size)
            print(
                f"archive: {len(paths)} volumes of {args.size} px written in {time.perf_counter() - t0:.0f} s"
            )
        cfg = ModelConfig(backbone=args.backbone, image_size=args.image_size)
        save_encoder(build_encoder(cfg), cfg, tmp / "model")
        sample = paths[: min(len(paths), 4)]
        # Measured before and after the pipeline: this box's speed drifts over a run; the faster
        # of the two is the baseline (the stricter ratio).
        before = decode_one_core(sample, cfg, with_preprocess=not gpus)
        ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        if args.stats:
            logging.basicConfig()
            logging.getLogger("ctsearch.jobs.index").setLevel(logging.DEBUG)
        runs = [
            run_pipeline(arc, tmp / "model", tmp / f"idx{r}", gpus, args.batch_size)
            for r in range(args.repeat)
        ]
        ray.shutdown()
        after = decode_one_core(sample, cfg, with_preprocess=not gpus)
        bare = bare_model(tmp / "model", runs[0]["rows"], args.batch_size, args.device)
    one_core = {k: max(before[k], after[k]) for k in before}
    print(
        f"machine: {os.cpu_count()} cores, device {args.device}, Ray CPUs {ray_cpus} ({decode_cores} for decoding); "
        f"{args.backbone} @ {args.image_size} px, {args.volumes} volumes, {runs[0]['rows']} slices of "
        f"{args.size} px, batch {args.batch_size}"
    )
    where = {
        "read": "read_volume: gzip + NIfTI",
        "decode": "read only: the GPU actor preprocesses" if gpus else "read + window/resize",
        "decode + hash": "+ the two sha256 an index records",
    }
    for k, what in where.items():
        print(
            f"{k + ', 1 core':21s} {one_core[k]:9.1f} slices/s   ({what}; before {before[k]:.1f}, after {after[k]:.1f})"
        )
    print(f"bare model            {bare:9.1f} slices/s")
    feed = decode_cores * one_core["decode"]
    null = args.backbone == "null"
    if null:
        limit, what = feed, f"{decode_cores} x decode"
    elif gpus:
        limit, what = min(bare, feed), f"min(bare, {decode_cores} x decode)"
    else:
        limit, what = bare, "bare model"
    with_hash = decode_cores * one_core["decode + hash"] if null else None
    for r, run in enumerate(runs):
        kind = "cold: Ray Data's actors and workers start" if r == 0 else "warm: they run already"
        print(f"pipeline, run {r + 1}       {run['rate']:9.1f} slices/s   ({kind}; wall {run['wall']:.1f} s)")
        print(
            f"  of which            {run['first']:9.1f} s to the first volume, then {run['steady']:.1f} slices/s (steady)"
        )
        print(
            f"  pipeline / {what} = {run['rate'] / limit:.2f}   (target >= 0.8; {what} = {limit:.1f}/s);"
            f" steady {run['steady'] / limit:.2f}"
            + (
                f"; against {decode_cores} x (decode + hash): {run['rate'] / with_hash:.2f}"
                if with_hash
                else ""
            )
        )
        cores_s = (os.cpu_count() or 1) * run["wall"]
        print(f"  CPU during the run ({os.cpu_count()} cores x {run['wall']:.1f} s = {cores_s:.1f} s):")
        for kind, secs in sorted(run["cpu"].items(), key=lambda kv: -kv[1]):
            print(f"    {secs:7.1f} s  {1e3 * secs / max(1, run['rows']):6.2f} ms/slice  {kind}")
    print(
        f"{decode_cores} x decode / bare model = {feed / bare:.2f}   (> 1: decoding can keep the model fed)"
    )


if __name__ == "__main__":
    main()
