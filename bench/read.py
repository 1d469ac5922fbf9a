"""Reading on one core: ctsearch's readers against what the libraries do by themselves.

Decoding is what a CPU core must do for indexing, and on a GPU node it sets the pace
(docs/scaling.md). Measured side by side in one run, interleaved (A B A B ...), best of
``--repeats``, on the same synthetic volumes, in this process on one thread:
  nifti  ``read_volume(.nii.gz)`` (header checks, zlib into the array, canonical orientation)
         against nibabel's read of the voxels alone (``dataobj.get_unscaled()``: gzip.GzipFile)
  dicom  ``read_volume(series folder)`` (grouping, checks, integer rescale, orientation)
         against pydicom per file: ``dcmread`` + ``pixel_array`` + ``apply_modality_lut``,
         rounded and clipped to int16 as an index needs them

    .venv/bin/python bench/read.py --volumes 2 --size 512
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from ctsearch.io import read_volume, scan_archive
from ctsearch.synth import synth_archive


def pydicom_slices(files: list[str]) -> int:
    for f in files:
        ds = pydicom.dcmread(f)
        np.clip(np.rint(apply_modality_lut(ds.pixel_array, ds)), -32768, 32767).astype(np.int16)
    return len(files)


def rate(fn, slices: int) -> float:
    """slices/s of one call of ``fn`` (CPU time of this process)."""
    t = time.process_time()
    fn()
    return slices / (time.process_time() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, default=2)
    ap.add_argument("--size", type=int, default=512, help="synthetic slice side, pixels")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        arc = Path(tmp) / "archive"
        synth_archive(arc, volumes=args.volumes, seed=0, size=args.size, fmt="both")
        entries, _ = scan_archive(arc)
        nifti = [e for e in entries if e.format == "nifti"]
        dicom = [e for e in entries if e.format == "dicom"]
        n_nifti = sum(e.shape[0] for e in nifti)
        n_dicom = sum(e.shape[0] for e in dicom)
        cases = {
            "nifti": (
                lambda: [read_volume(e.path) for e in nifti],
                lambda: [nib.load(e.path).dataobj.get_unscaled() for e in nifti],
                n_nifti,
            ),
            "dicom": (
                lambda: [read_volume(e.path) for e in dicom],
                lambda: [pydicom_slices(list(e.files)) for e in dicom],
                n_dicom,
            ),
        }
        print(
            f"{args.volumes} synthetic volumes of {args.size} px; one core, CPU time, best of {args.repeats}"
        )
        print("format   ctsearch      library alone   ctsearch / library")
        for name, (ours, theirs, n) in cases.items():
            a, b = [], []
            for _ in range(args.repeats):  # interleaved: the machine's noise hits both alike
                a.append(rate(ours, n))
                b.append(rate(theirs, n))
            print(f"{name:6} {max(a):8.1f} /s  {max(b):10.1f} /s   {max(a) / max(b):6.2f}x   ({n} slices)")


if __name__ == "__main__":
    main()
