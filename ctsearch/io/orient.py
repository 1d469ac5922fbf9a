"""Map any voxel grid onto the canonical orientation (docs/formats.md).

Canonical: array index ``[k, j, i]`` with i -> patient Left, j -> Posterior, k -> Superior, i.e. the
voxel axes point along +x, +y, +z of DICOM's LPS world. Readers build the affine of the grid as
stored (voxel ``(i, j, k)`` -> LPS mm, data indexed ``[i, j, k]`` like nibabel), then call
:func:`to_canonical`, which only flips and permutes axes: voxel values are never resampled, so an
oblique scan keeps its obliqueness in the affine.

Example:
    >>> import numpy as np
    >>> data_ijk = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    >>> affine = np.diag([-1.0, 1.0, 2.0, 1.0])     # i points Right: flip it
    >>> hu, aff = to_canonical(data_ijk, affine)
    >>> hu.shape, float(aff[0, 0])
    ((4, 3, 2), 1.0)
"""

from __future__ import annotations

import numpy as np
from nibabel import orientations as ornt

# Voxel axis n along world axis n, positive direction: L, P, S in LPS.
CANONICAL_ORNT = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def canonical_transform(affine_lps: np.ndarray, shape_ijk: tuple[int, int, int]):
    """The axis permutation/flips that make ``affine_lps``'s grid canonical.

    Returns:
        (transform, new_affine, new_shape_ijk): ``transform`` for
        ``nibabel.orientations.apply_orientation``, the LPS affine of the reoriented grid and its shape.
    """
    affine_lps = np.asarray(affine_lps, dtype=np.float64)
    current = ornt.io_orientation(affine_lps)
    if np.isnan(current).any():
        raise ValueError("affine has a degenerate (zero or collinear) voxel axis")
    transform = ornt.ornt_transform(current, CANONICAL_ORNT)
    new_affine = affine_lps @ ornt.inv_ornt_aff(transform, shape_ijk)
    perm = transform[:, 0].astype(int)
    new_shape = [0, 0, 0]
    for src, dst in enumerate(perm):
        new_shape[dst] = int(shape_ijk[src])
    return transform, new_affine, tuple(new_shape)


def to_canonical(data_ijk: np.ndarray, affine_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient ``data_ijk`` [i, j, k] with affine ``affine_lps`` to canonical ``[k, j, i]``.

    Returns:
        (data [k, j, i] C-contiguous, affine voxel (i, j, k) -> LPS mm of the returned grid).
    """
    transform, new_affine, _ = canonical_transform(affine_lps, data_ijk.shape)
    data = ornt.apply_orientation(data_ijk, transform)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), new_affine


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """(z, y, x) voxel size in mm: the lengths of the affine's k, j, i columns."""
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return float(norms[2]), float(norms[1]), float(norms[0])
