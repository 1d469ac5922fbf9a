"""Smooth random fields on a patient-fixed lattice: texture, shape wobble, bowel loops, vessels.

The lattices belong to the patient (seeded by ``Patient.field_seed``), so every examination of
one patient sees the same texture at the same anatomy.

Example:
    >>> import numpy as np
    >>> f = Lattice.make(np.random.default_rng(0), cell=20.0)
    >>> f.sample(np.zeros(2), np.zeros(3), np.zeros(4)).shape
    (2, 3, 4)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctsearch.synth.anatomy import Patient

# Patient-frame box the texture lattices cover (mm); anatomy never leaves it.
_LATTICE_BOX = ((-700.0, 500.0), (-320.0, 320.0), (-320.0, 320.0))  # Z, Y, X


def _blur_lattice(a: np.ndarray, passes: int = 2) -> np.ndarray:
    """Separable binomial [1, 2, 1] / 4 blur along every axis (edges replicated), ``passes`` times."""
    for _ in range(passes):
        for ax in range(a.ndim):
            p = np.pad(a, [(1, 1) if i == ax else (0, 0) for i in range(a.ndim)], mode="edge")
            lo = [slice(None)] * a.ndim
            mid = [slice(None)] * a.ndim
            hi = [slice(None)] * a.ndim
            lo[ax], mid[ax], hi[ax] = slice(0, -2), slice(1, -1), slice(2, None)
            a = 0.25 * p[tuple(lo)] + 0.5 * p[tuple(mid)] + 0.25 * p[tuple(hi)]
    return a


@dataclass
class Lattice:
    """A smoothed unit-variance random lattice with ``cell`` mm spacing over ``_LATTICE_BOX``."""

    values: np.ndarray  # float32 [gz, gy, gx]
    cell: float

    @classmethod
    def make(cls, rng: np.random.Generator, cell: float) -> Lattice:
        shape = tuple(int(np.ceil((hi - lo) / cell)) + 2 for lo, hi in _LATTICE_BOX)
        v = _blur_lattice(rng.standard_normal(shape).astype(np.float32))
        v = (v - v.mean()) / (v.std() + 1e-6)
        return cls(values=v.astype(np.float32), cell=cell)

    def _weights(self, coords: np.ndarray, axis: int) -> tuple[np.ndarray, slice]:
        """Linear interpolation matrix [len(coords), g] over the lattice rows that ``coords`` touch."""
        lo = _LATTICE_BOX[axis][0]
        g = self.values.shape[axis]
        t = np.clip((coords - lo) / self.cell, 0, g - 1.001)
        i0 = np.floor(t).astype(np.int64)
        w = (t - i0).astype(np.float32)
        a, b = int(i0.min()), int(i0.max()) + 2
        m = np.zeros((len(coords), b - a), np.float32)
        r = np.arange(len(coords))
        m[r, i0 - a] = 1 - w
        m[r, i0 - a + 1] = w
        return m, slice(a, b)

    def sample(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """float32 [len(z), len(y), len(x)]: the field at the grid of patient coordinates."""
        wz, sz = self._weights(z, 0)
        wy, sy = self._weights(y, 1)
        wx, sx = self._weights(x, 2)
        v = self.values[sz, sy, sx]
        v = np.tensordot(wz, v, axes=(1, 0))  # [n, gy, gx]
        return np.matmul(np.matmul(wy, v.astype(np.float32)), wx.T)


def texture_lattices(p: Patient, size: int) -> dict[str, Lattice]:
    px = p.body_a * 2.4 / size  # rough pixel size, so textures stay visible at small matrices
    rng = np.random.default_rng(p.field_seed)
    return {
        "fine": Lattice.make(rng, max(5.0, 1.5 * px)),
        "shape": Lattice.make(rng, 18.0),
        "coarse": Lattice.make(rng, 14.0),
        "bowel": Lattice.make(rng, 16.0),
        "vessel": Lattice.make(rng, max(7.0, 1.2 * px)),
    }
