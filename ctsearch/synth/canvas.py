"""One slab of slices being painted: HU and labels over a grid of patient coordinates.

Example:
    >>> import numpy as np
    >>> from ctsearch.synth.anatomy import Blob
    >>> c = Canvas(np.linspace(-50, 50, 8), np.linspace(-50, 50, 8), np.linspace(-10, 10, 3), lattices={})
    >>> c.paint_blob(Blob((0.0, 0.0, 0.0), rx=30, ry=30, rz_up=20, rz_down=20), 40.0, label=1)
    >>> int(c.label.sum()) > 0, float(c.hu.max())
    (True, 40.0)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ctsearch.synth.anatomy import BACKGROUND, Blob
from ctsearch.synth.fields import Lattice

AIR_HU = -1000.0


class Canvas:
    """One slab of slices being painted: HU float32 [n, y, x], label uint8, patient coordinates."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, lattices: dict[str, Lattice]):
        self.x, self.y, self.z = x, y, z
        self.hu = np.full((len(z), len(y), len(x)), AIR_HU, np.float32)
        self.label = np.zeros(self.hu.shape, np.uint8)
        self._lattices = lattices
        self._fields: dict[str, np.ndarray] = {}

    def field(self, name: str) -> np.ndarray:
        """A smooth unit-variance random field over the whole slab, sampled once per slab."""
        if name not in self._fields:
            self._fields[name] = self._lattices[name].sample(self.z, self.y, self.x)
        return self._fields[name]

    def box(
        self, xmin: float, xmax: float, ymin: float, ymax: float, zmin: float, zmax: float
    ) -> tuple[slice, slice, slice] | None:
        """Index slices (z, y, x) of the voxels inside a mm box, or None when empty."""
        kz = slice(int(np.searchsorted(self.z, zmin)), int(np.searchsorted(self.z, zmax, side="right")))
        ky = slice(int(np.searchsorted(self.y, ymin)), int(np.searchsorted(self.y, ymax, side="right")))
        kx = slice(int(np.searchsorted(self.x, xmin)), int(np.searchsorted(self.x, xmax, side="right")))
        if kz.stop <= kz.start or ky.stop <= ky.start or kx.stop <= kx.start:
            return None
        return kz, ky, kx

    def blob(self, b: Blob) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """(box, mask) of the voxels inside ``b`` (wobble included)."""
        z0, z1 = b.z_range
        inz = (self.z >= z0) & (self.z <= z1)
        if not inz.any():
            return None
        xmin, xmax, ymin, ymax = b.extent(self.z[inz])
        box = self.box(xmin, xmax, ymin, ymax, z0, z1)
        if box is None:
            return None
        kz, ky, kx = box
        r2 = b.rho2(self.x[kx], self.y[ky], self.z[kz])
        limit = 1.0 if not b.wobble else (1 + b.wobble * self.field("shape")[box]) ** 2
        return box, r2 <= limit

    def paint(self, box, mask: np.ndarray, value, label: int = BACKGROUND) -> None:
        """Set HU (scalar or array over ``box``) and label where ``mask``; later paint wins."""
        if box is None:
            return
        hu, lab = self.hu[box], self.label[box]
        if np.ndim(value) == 0:
            hu[mask] = value
        else:
            hu[mask] = np.broadcast_to(value, mask.shape)[mask]
        lab[mask] = label

    def paint_blob(
        self, b: Blob | None, value, label: int = BACKGROUND, where: Callable | None = None
    ) -> None:
        """Paint ``b``; ``value`` may be a callable(box) -> array; ``where(box)`` restricts the mask."""
        if b is None:
            return
        hit = self.blob(b)
        if hit is None:
            return
        box, mask = hit
        if where is not None:
            mask &= where(box)
        if callable(value):
            value = value(box)
        self.paint(box, mask, value, label)

    def grid(self, box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        kz, ky, kx = box
        return self.x[kx][None, None, :], self.y[ky][None, :, None], self.z[kz][:, None, None]
