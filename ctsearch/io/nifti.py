"""NIfTI volumes: write a canonical ``Volume``, read any orientation back into it.

NIfTI world coordinates are RAS+ while ``Volume.affine`` maps voxels to LPS; the two differ by
``diag(-1, -1, 1)``. nibabel's data array is indexed ``[i, j, k]`` (x, y, z), ``Volume.hu`` is
``[k, j, i]``, so writing transposes and reading reorients with orientation codes.

Example:
    >>> import numpy as np, tempfile, os
    >>> from ctsearch.io.volume import Volume
    >>> vol = Volume(hu=np.zeros((3, 4, 5), np.int16), spacing_mm=(2.0, 0.7, 0.7),
    ...              affine=Volume.affine_from((2.0, 0.7, 0.7), (0.0, 0.0, 0.0)))
    >>> path = os.path.join(tempfile.mkdtemp(), "liver_0.nii.gz")
    >>> write_nifti(vol, path)
    >>> read_nifti(path).hu.shape
    (3, 4, 5)
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from ctsearch.errors import CTSearchInputError
from ctsearch.io.volume import Volume

# NIfTI RAS+ <-> DICOM LPS+: negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Refuse headers claiming more voxels than any CT volume plausibly holds (~4 GiB of int16),
# so a corrupt or hostile header can never make us allocate from its dims.
MAX_VOXELS = 2 * 1024**3

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True when the file name ends in .nii or .nii.gz (case-insensitive), ignoring macOS '._' files."""
    name = os.path.basename(os.fspath(path)).lower()
    return name.endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """``imagesTr/liver_3.nii.gz`` -> ``liver_3``."""
    name = os.path.basename(os.fspath(path))
    return re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE)


def write_nifti(
    volume: Volume,
    path: str | os.PathLike,
    *,
    label: np.ndarray | None = None,
    label_path: str | os.PathLike | None = None,
) -> None:
    """Write ``volume`` as int16 NIfTI with a RAS affine; optionally its uint8 label alongside.

    Args:
        volume: canonical volume (hu int16 [z, y, x], affine voxel -> LPS mm).
        path: output file, ``.nii`` or ``.nii.gz``.
        label: uint8 [z, y, x] segmentation, same shape as ``volume.hu`` (Decathlon: 1 liver, 2 tumour).
        label_path: where to write ``label``; required when ``label`` is given.
    """
    if (label is None) != (label_path is None):
        raise ValueError("give both label and label_path, or neither")
    affine_ras = LPS_TO_RAS @ np.asarray(volume.affine, dtype=np.float64)
    _save(np.asarray(volume.hu, dtype=np.int16), affine_ras, path)
    if label is not None:
        label = np.asarray(label)
        if label.shape != volume.hu.shape:
            raise ValueError(f"label shape {label.shape} != volume shape {volume.hu.shape}")
        _save(label.astype(np.uint8), affine_ras, label_path)


def _save(zyx: np.ndarray, affine_ras: np.ndarray, path) -> None:
    img = nib.Nifti1Image(np.ascontiguousarray(zyx.transpose(2, 1, 0)), affine_ras)
    img.set_qform(affine_ras, code=1)
    img.set_sform(affine_ras, code=1)
    img.header.set_xyzt_units("mm", "sec")
    # Stored exactly: no scaling, so the reader's rounding is the identity.
    img.header.set_slope_inter(1.0, 0.0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, os.fspath(path))
