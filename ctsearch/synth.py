"""Synthetic abdominal CT phantoms and archives, hard enough to test retrieval science.

A phantom patient is a set of smooth 3-D shapes in patient millimetres (X toward the patient's
left, Y toward posterior, Z toward superior, Z = 0 at the top of the liver dome). Each
examination samples the patient on a scanner grid (spacing, slice thickness, scan range, table
offset), paints the organs in HU and adds noise. Everything is vectorised numpy over slabs of
slices and deterministic given the seed. See docs/synthetic.md for the anatomy, the per-patient
variation, the slice-count rule and the calibration that keeps retrieval from being trivial.

Example:
    >>> vol, label = synth_volume(0, size=64)
    >>> vol.hu.dtype, label.dtype, vol.hu.shape[1:]
    (dtype('int16'), dtype('uint8'), (64, 64))
    >>> sorted(int(v) for v in set(label.ravel().tolist()) - {0}) in ([1], [1, 2])
    True
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ctsearch.io.volume import Volume

# Decathlon label values (Task03_Liver).
BACKGROUND, LIVER, TUMOUR = 0, 1, 2

FORMATS = ("nifti", "dicom", "both")
NOMINAL_MATRIX = 512  # spacings are drawn for a 512 matrix; smaller --size keeps the field of view
THICKNESSES_MM = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
AIR_HU = -1000.0
PAD_HU = -2048.0  # value some scanners store outside the circular reconstruction field

# Patient-frame box the texture lattices cover (mm); anatomy never leaves it.
_LATTICE_BOX = ((-700.0, 500.0), (-320.0, 320.0), (-320.0, 320.0))  # Z, Y, X


def max_slices(size: int) -> int:
    """The slice-count cap for a ``size`` px matrix: ``size`` clipped to [32, 256].

    A scan covers 250-450 mm; when ``extent / thickness`` would exceed the cap, the slices get
    thicker (``extent / cap``) so small test archives stay small and 512 px volumes modest.
    """
    return int(np.clip(size, 32, 256))


# --------------------------------------------------------------------------------------------
# Smooth random fields on a patient-fixed lattice (texture, shape wobble, bowel loops, vessels)
# --------------------------------------------------------------------------------------------


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
class _Lattice:
    """A smoothed unit-variance random lattice with ``cell`` mm spacing over ``_LATTICE_BOX``."""

    values: np.ndarray  # float32 [gz, gy, gx]
    cell: float

    @classmethod
    def make(cls, rng: np.random.Generator, cell: float) -> _Lattice:
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


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


@dataclass
class Blob:
    """A tapering ellipsoid-like organ: elliptical cross-sections whose size and centre vary with Z.

    At height ``dz = Z - center.Z`` the cross-section radii are ``(rx, ry) * s`` with
    ``s = (1 - t**p) ** (1/p)``, ``t = dz / rz_up`` above the centre (``p = p_up``) and
    ``-dz / rz_down`` below (``p = p_down``): p = 2 is an ellipsoid, p < 2 a long thin tip,
    p >> 2 a cylinder. The centre drifts ``tilt`` mm per mm of dz; ``angle`` rotates the ellipse
    in-plane; ``wobble`` perturbs the boundary by that fraction times a smooth random field.
    """

    center: tuple[float, float, float]  # X, Y, Z (mm)
    rx: float
    ry: float
    rz_up: float
    rz_down: float
    p_up: float = 2.0
    p_down: float = 2.0
    tilt: tuple[float, float] = (0.0, 0.0)
    angle: float = 0.0
    wobble: float = 0.0

    @property
    def z_range(self) -> tuple[float, float]:
        return self.center[2] - self.rz_down, self.center[2] + self.rz_up

    def profile(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-slice (scale s, centre x, centre y) for 1-D ``z``; s = 0 outside the blob."""
        dz = z - self.center[2]
        t = np.where(dz > 0, dz / max(self.rz_up, 1e-6), -dz / max(self.rz_down, 1e-6))
        p = np.where(dz > 0, self.p_up, self.p_down)
        s = np.where(t < 1, np.clip(1 - np.clip(t, 0, 1) ** p, 0, 1) ** (1 / p), 0.0)
        return s, self.center[0] + self.tilt[0] * dz, self.center[1] + self.tilt[1] * dz

    def extent(self, z: np.ndarray) -> tuple[float, float, float, float]:
        """(xmin, xmax, ymin, ymax) over the slices ``z`` (conservative)."""
        s, cx, cy = self.profile(z)
        r = max(self.rx, self.ry) * s * (1 + 3 * self.wobble) + 1.0
        on = s > 0
        if not on.any():
            return 0.0, -1.0, 0.0, -1.0
        return float((cx - r)[on].min()), float((cx + r)[on].max()), float((cy - r)[on].min()), float((cy + r)[on].max())

    def rho2(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Normalised squared radius [nz, ny, nx] (<= 1 inside the undisturbed blob, inf outside its z-range)."""
        s, cx, cy = self.profile(z)
        s3 = s[:, None, None]
        u = x[None, None, :] - cx[:, None, None]
        v = y[None, :, None] - cy[:, None, None]
        if self.angle:
            c, sn = np.cos(self.angle), np.sin(self.angle)
            u, v = u * c + v * sn, -u * sn + v * c
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = (u / (self.rx * s3)) ** 2 + (v / (self.ry * s3)) ** 2
        return np.where(s3 > 0, r2, np.inf).astype(np.float32)

    def shrunk(self, mm: float) -> Blob:
        """The same blob with every radius reduced by ``mm`` (walls, cortical shells)."""
        return replace(
            self,
            rx=max(self.rx - mm, 0.5),
            ry=max(self.ry - mm, 0.5),
            rz_up=max(self.rz_up - mm, 0.5),
            rz_down=max(self.rz_down - mm, 0.5),
        )

    def moved(self, dx: float = 0.0, dy: float = 0.0, dz: float = 0.0, scale: float = 1.0) -> Blob:
        cx, cy, cz = self.center
        return replace(
            self,
            center=(cx + dx, cy + dy, cz + dz),
            rx=self.rx * scale,
            ry=self.ry * scale,
            rz_up=self.rz_up * scale,
            rz_down=self.rz_down * scale,
        )


# --------------------------------------------------------------------------------------------
# Patient anatomy and examinations
# --------------------------------------------------------------------------------------------


@dataclass
class Tumour:
    center: tuple[float, float, float]
    radius: float
    delta_hu: float  # relative to the liver (negative: hypodense)
    rim_hu: float  # enhancing rim relative to the liver (0: none)
    aspect: tuple[float, float, float]


@dataclass
class Patient:
    """Per-patient anatomy in patient millimetres (see the module docstring for the frame)."""

    index: int
    patient_id: str
    body_a: float  # body half-width at the liver dome
    body_b: float  # body half-depth
    fat_mm: float
    muscle_mm: float
    body_knots: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]  # Z, A-scale, B-scale
    liver_height: float
    liver_right: Blob
    liver_left: Blob
    tumours: list[Tumour]
    gallbladder: Blob | None
    spleen: Blob
    kidneys: tuple[Blob, Blob]
    stomach: Blob
    stomach_content: str  # water | food | gas
    pancreas: Blob
    heart: Blob
    dome_left_drop: float
    diaphragm_drop: float
    spine_y: float
    vert_rx: float
    vert_ry: float
    vert_pitch: float
    rib_pitch: float
    rib_drop: float
    rib_top: float
    iliac_crest_z: float
    acetabulum_z: float
    hip_x: float
    bladder: Blob
    colon_x: float
    aorta_x: float
    aorta_r: float
    ivc_x: float
    ivc_r: float
    hu: dict[str, float]  # tissue HU that do not depend on the examination
    field_seed: int


@dataclass
class Exam:
    """One examination of a patient: scanner geometry, contrast phase, noise, date."""

    index: int  # 0 = first examination
    exam_date: str
    z_top: float  # scan range in patient Z (mm)
    z_bottom: float
    spacing_xy: float  # nominal in-plane spacing for a 512 matrix (mm)
    thickness: float  # nominal slice thickness (mm)
    liver_hu: float
    noise_hu: float
    offset_lps: tuple[float, float, float]  # LPS position of the patient-frame origin
    breathing_dz: float  # liver/abdominal organ shift along Z relative to the anatomy (mm)
    tumour_growth: float
    new_tumours: list[Tumour] = field(default_factory=list)
    pad_outside_fov: bool = False


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_patient(rng: np.random.Generator, index: int = 0) -> Patient:
    """Draw one patient's anatomy."""
    u = lambda lo, hi: _u(rng, lo, hi)  # noqa: E731
    A = u(125, 180)
    B = A * u(0.62, 0.8)
    fat = u(6, 35) * A / 150
    muscle = u(7, 14)
    Ac, Bc = A - fat - muscle, B - fat - muscle
    H = u(135, 200)  # craniocaudal liver extent, dome to inferior tip
    crest = -u(245, 290)  # iliac crest
    acet = crest - u(80, 110)
    body_knots = (
        (400.0, 120.0, 0.0, -150.0, crest, acet, -700.0),
        (0.9 + u(0, 0.05), 0.96, 1.0, 1.0 + u(-0.03, 0.05), 1.04 + u(0, 0.05), 1.05, 1.0),
        (0.95, 0.97, 1.0, 1.0 + u(0, 0.12), 0.98, 0.92, 0.9),
    )

    rz_up = u(45, 65)
    right = Blob(
        center=(-Ac * u(0.35, 0.48), Bc * u(-0.12, 0.08), -rz_up),
        rx=Ac * u(0.5, 0.62),
        ry=Bc * u(0.8, 0.95),
        rz_up=rz_up,
        rz_down=H - rz_up,
        p_up=u(2.2, 3.0),
        p_down=u(1.8, 2.6),
        tilt=(u(0.0, 0.25), u(0.05, 0.3)),
        angle=u(-0.25, 0.15),
        wobble=u(0.04, 0.09),
    )
    left = Blob(
        center=(Ac * u(-0.02, 0.22), -Bc * u(0.3, 0.45), -u(28, 50)),
        rx=Ac * u(0.32, 0.5),
        ry=Bc * u(0.25, 0.38),
        rz_up=u(18, 32),
        rz_down=u(28, 55),
        p_up=2.0,
        p_down=u(1.3, 2.0),
        tilt=(0.0, u(0.0, 0.2)),
        angle=u(-0.4, 0.1),
        wobble=u(0.04, 0.1),
    )
    tumours = [_sample_tumour(rng, right if rng.random() < 0.8 else left) for _ in range(
        int(rng.choice([0, 1, 1, 2, 2, 3, 3, 4, 5, 7])))]

    gall = None
    if rng.random() < 0.85:
        gall = Blob(
            center=(-Ac * u(0.05, 0.25), -Bc * u(0.2, 0.42), -H * u(0.5, 0.75)),
            rx=u(12, 22), ry=u(12, 22), rz_up=u(20, 35), rz_down=u(15, 30), tilt=(-0.2, -0.2), wobble=0.05,
        )
    spleen = Blob(
        center=(Ac * u(0.5, 0.66), Bc * u(0.25, 0.5), -u(30, 70)),
        rx=u(25, 38), ry=u(45, 65), rz_up=u(35, 60), rz_down=u(35, 60),
        p_up=2.2, p_down=u(1.6, 2.2), angle=u(-0.8, -0.3), wobble=u(0.03, 0.08),
    )
    zr = -H * u(0.6, 0.85)
    kid_r = Blob(center=(-u(50, 72), Bc * u(0.35, 0.55), zr), rx=u(22, 30), ry=u(24, 32),
                 rz_up=u(45, 60), rz_down=u(45, 60), angle=u(0.3, 0.7), wobble=0.04, tilt=(-0.1, 0.0))
    kid_l = Blob(center=(u(50, 72), Bc * u(0.35, 0.55), zr + u(10, 35)), rx=u(22, 30), ry=u(24, 32),
                 rz_up=u(45, 60), rz_down=u(45, 60), angle=-u(0.3, 0.7), wobble=0.04, tilt=(0.1, 0.0))
    stomach = Blob(
        center=(Ac * u(0.18, 0.4), -Bc * u(0.05, 0.3), -u(40, 80)),
        rx=u(35, 55), ry=u(25, 45), rz_up=u(30, 45), rz_down=u(40, 75), p_down=u(1.5, 2.2),
        tilt=(0.25, -0.1), angle=u(-0.5, 0.2), wobble=u(0.05, 0.12),
    )
    pancreas = Blob(
        center=(u(0, 30), Bc * u(0.0, 0.2), -H * u(0.45, 0.62)),
        rx=u(55, 75), ry=u(9, 15), rz_up=u(10, 18), rz_down=u(10, 18), p_up=2.5, p_down=2.5,
        angle=u(-0.4, -0.1), wobble=0.1,
    )
    heart = Blob(
        center=(u(15, 40), -Bc * u(0.05, 0.25), u(45, 70)),
        rx=u(55, 72), ry=u(45, 60), rz_up=u(45, 60), rz_down=u(45, 60), angle=u(0.4, 0.8), wobble=0.03,
    )
    spine_y = Bc * u(0.45, 0.58)
    bladder = Blob(
        center=(u(-8, 8), -Bc * u(0.15, 0.4), acet + u(0, 25)),
        rx=u(28, 55), ry=u(22, 42), rz_up=u(22, 45), rz_down=u(20, 35), wobble=0.05,
    )
    hu = {
        "fat": u(-115, -80),
        "muscle": u(35, 60),
        "lung": u(-900, -820),
        "blood": u(130, 210),  # aorta / heart chambers, portal-venous phase
        "cortical": u(600, 1000),
        "cancellous": u(150, 300),
        "kidney_plus": u(40, 110),
        "spleen_plus": u(0, 25),
        "pancreas_plus": u(-20, 10),
        "bladder": u(0, 15),
        "gall": u(0, 25),
    }
    return Patient(
        index=index,
        patient_id=f"synth-{index:04d}",
        body_a=A, body_b=B, fat_mm=fat, muscle_mm=muscle, body_knots=body_knots,
        liver_height=H, liver_right=right, liver_left=left, tumours=tumours,
        gallbladder=gall, spleen=spleen, kidneys=(kid_r, kid_l), stomach=stomach,
        stomach_content=str(rng.choice(["water", "food", "gas"])), pancreas=pancreas, heart=heart,
        dome_left_drop=u(8, 28), diaphragm_drop=u(35, 60), spine_y=spine_y,
        vert_rx=u(17, 25), vert_ry=u(15, 21), vert_pitch=u(26, 34),
        rib_pitch=u(21, 27), rib_drop=u(60, 100), rib_top=u(220, 260),
        iliac_crest_z=crest, acetabulum_z=acet, hip_x=u(82, 100), bladder=bladder,
        colon_x=Ac * u(0.6, 0.75), aorta_x=u(8, 25), aorta_r=u(10, 14), ivc_x=-u(15, 28), ivc_r=u(9, 13),
        hu=hu, field_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _sample_tumour(rng: np.random.Generator, lobe: Blob) -> Tumour:
    """A hypodense lesion centred well inside ``lobe``."""
    dz = rng.uniform(-0.75, 0.55) * (lobe.rz_down if rng.random() < 0.6 else lobe.rz_up)
    s, cx, cy = (float(a[0]) for a in lobe.profile(np.array([lobe.center[2] + dz])))
    ang = rng.uniform(0, 2 * np.pi)
    rad = np.sqrt(rng.uniform(0, 1)) * 0.7
    u, v = rad * lobe.rx * s * np.cos(ang), rad * lobe.ry * s * np.sin(ang)
    c, sn = np.cos(lobe.angle), np.sin(lobe.angle)
    x, y = cx + u * c - v * sn, cy + u * sn + v * c
    return Tumour(
        center=(float(x), float(y), float(lobe.center[2] + dz)),
        radius=float(np.exp(rng.uniform(np.log(4), np.log(32)))),
        delta_hu=-float(rng.uniform(20, 70)),
        rim_hu=float(rng.uniform(10, 35)) if rng.random() < 0.3 else 0.0,
        aspect=tuple(float(a) for a in rng.uniform(0.8, 1.2, 3)),
    )


def sample_exam(rng: np.random.Generator, patient: Patient, index: int = 0, previous: Exam | None = None) -> Exam:
    """Draw one examination; ``previous`` makes it a later follow-up of that exam."""
    u = lambda lo, hi: _u(rng, lo, hi)  # noqa: E731
    H = patient.liver_height
    z_top = u(30, 200)
    extent = u(250, 450)
    # The scan must reach below the liver tip with margin: a liver archive always holds the liver.
    z_bottom = min(z_top - extent, -H - u(40, 90))
    a_max = patient.body_a * max(patient.body_knots[1])
    # Scanners pick the field of view to fit the patient: spacing follows body size, within 0.6-0.9 mm.
    spacing = float(np.clip(2 * a_max * u(1.08, 1.25) / NOMINAL_MATRIX, 0.6, 0.9))
    if previous is None:
        date = _dt.date(2012, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 365 * 8)))
        liver_hu = u(60, 130)
        growth = 1.0
        new: list[Tumour] = []
    else:
        date = _dt.date.fromisoformat(previous.exam_date) + _dt.timedelta(days=int(rng.integers(60, 500)))
        liver_hu = float(np.clip(previous.liver_hu + rng.normal(0, 12), 60, 130))
        growth = previous.tumour_growth * u(1.1, 1.6)
        new = list(previous.new_tumours)
        if rng.random() < 0.4:
            lobe = patient.liver_right if rng.random() < 0.8 else patient.liver_left
            new.append(replace(_sample_tumour(rng, lobe), radius=u(3, 8)))
    return Exam(
        index=index,
        exam_date=date.isoformat(),
        z_top=z_top,
        z_bottom=z_bottom,
        spacing_xy=spacing,
        thickness=float(rng.choice(THICKNESSES_MM)),
        liver_hu=liver_hu,
        noise_hu=u(8, 25),
        offset_lps=(u(-20, 20), u(-25, 15), u(-400, 100)),
        breathing_dz=u(-8, 8) if previous is not None else 0.0,
        tumour_growth=growth,
        new_tumours=new,
        pad_outside_fov=bool(rng.random() < 0.3),
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


class _Canvas:
    """One slab of slices being painted: HU float32 [n, y, x], label uint8, patient coordinates."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, lattices: dict[str, _Lattice]):
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

    def box(self, xmin: float, xmax: float, ymin: float, ymax: float, zmin: float, zmax: float) -> tuple[slice, slice, slice] | None:
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

    def paint_blob(self, b: Blob | None, value, label: int = BACKGROUND, where: Callable | None = None) -> None:
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


def _anatomy_for_exam(p: Patient, e: Exam) -> Patient:
    """The patient as this examination sees it: breathing shift, grown and new lesions."""
    dz = e.breathing_dz
    tumours = [replace(t, center=(t.center[0], t.center[1], t.center[2] + dz), radius=t.radius * e.tumour_growth)
               for t in p.tumours]
    tumours += [replace(t, center=(t.center[0], t.center[1], t.center[2] + dz)) for t in e.new_tumours]
    return replace(
        p,
        liver_right=p.liver_right.moved(dz=dz),
        liver_left=p.liver_left.moved(dz=dz),
        tumours=tumours,
        gallbladder=p.gallbladder.moved(dz=dz) if p.gallbladder else None,
        spleen=p.spleen.moved(dz=dz),
        kidneys=(p.kidneys[0].moved(dz=dz * 0.6), p.kidneys[1].moved(dz=dz * 0.6)),
        stomach=p.stomach.moved(dz=dz),
        pancreas=p.pancreas.moved(dz=dz * 0.6),
    )


def _render_slab(p: Patient, e: Exam, c: _Canvas) -> None:
    """Paint every structure of ``p`` onto the slab ``c`` (patient coordinates)."""
    hu = p.hu
    X = c.x[None, None, :]
    Y = c.y[None, :, None]
    Z = c.z[:, None, None]
    full = (slice(None), slice(None), slice(None))
    L = e.liver_hu

    # Body outline, subcutaneous fat, muscle wall, and the body cavity (all elliptical, varying with Z).
    zk, ak, bk = p.body_knots
    order = np.argsort(zk)
    za = np.interp(c.z, np.asarray(zk)[order], np.asarray(ak)[order])
    zb = np.interp(c.z, np.asarray(zk)[order], np.asarray(bk)[order])
    A = (p.body_a * za)[:, None, None]
    B = (p.body_b * zb)[:, None, None]
    pelvis = np.clip((p.iliac_crest_z - Z) / 60.0, 0, 1)  # 0 above the iliac crest, 1 well below
    wall = p.fat_mm + p.muscle_mm * (1 + 1.5 * pelvis)
    Ac, Bc = A - wall, B - wall
    r_body = (X / A) ** 2 + (Y / B) ** 2
    back = Y < B * 0.9  # a supine patient's back is flattened on the table
    body = (r_body <= 1) & back
    fine = c.field("fine")
    c.paint(full, body, hu["fat"] + 6 * fine)
    muscle = ((X / (A - p.fat_mm)) ** 2 + (Y / (B - p.fat_mm)) ** 2 <= 1) & back
    c.paint(full, muscle, hu["muscle"] + 5 * fine)
    rc = (X / Ac) ** 2 + (Y / Bc) ** 2
    cavity = rc <= 1
    # Mesentery: fat with soft-tissue strands.
    coarse = c.field("coarse")
    c.paint(full, cavity, hu["fat"] + 10 + 15 * np.clip(coarse, -1.5, 1.5) + 6 * fine)

    # CT table under the patient.
    table = (np.abs(Y - (B * 0.9 + 4 + 0.0006 * X**2)) < 3) & (np.abs(X) < 230)
    c.paint(full, np.broadcast_to(table, c.hu.shape), 150.0)

    # Diaphragm: two domes (right at Z = 0, left lower), deepening toward the lateral and posterior walls.
    k = p.diaphragm_drop / (0.55 * Ac) ** 2
    dome_r = -k * ((X + 0.45 * Ac) ** 2 + (Y / 1.2) ** 2)
    dome_l = -p.dome_left_drop - k * ((X - 0.4 * Ac) ** 2 + (Y / 1.2) ** 2)
    zdia = np.maximum(dome_r, dome_l) - 15 * np.clip(Y / Bc, 0, 1)
    above = Z > zdia
    thorax = cavity & above
    lungs = thorax & (rc <= 0.97)
    vessels = c.field("vessel")
    c.paint(full, lungs, hu["lung"] + 25 * fine + np.where(vessels > 1.9, 700.0, 0.0))
    c.paint(full, cavity & ~above & (Z > zdia - 5), hu["muscle"])  # the diaphragm muscle
    mediastinum = Blob((p.heart.center[0] * 0.3, 0.05 * p.body_b, 300.0), rx=26, ry=0.45 * p.body_b,
                       rz_up=200, rz_down=330, p_up=8, p_down=8)
    above_dia = lambda b: above[b]  # noqa: E731  (masks restricted to a blob's box)
    below = lambda b: ~above[b]  # noqa: E731
    in_cavity = lambda b: cavity[b]  # noqa: E731
    c.paint_blob(mediastinum, lambda b: hu["fat"] + 30 + 20 * fine[b], where=above_dia)

    # Pelvis: bladder, rectum.
    c.paint_blob(p.bladder, hu["muscle"])
    c.paint_blob(p.bladder.shrunk(3), hu["bladder"])
    rectum = Blob((0.0, p.spine_y - 25, p.acetabulum_z + 40), rx=16, ry=14, rz_up=80, rz_down=120, p_up=6, p_down=6,
                  tilt=(0, -0.15), wobble=0.1)
    c.paint_blob(rectum, lambda b: np.where(c.field("bowel")[b] > 0.6, AIR_HU, 10 + 30 * fine[b]))

    # Bowel loops: islands of a smooth random field (wall + fluid or gas lumen) in the free abdomen.
    bowel_f = c.field("bowel")
    gas_f = c.field("shape")
    in_abdomen = cavity & ~above & (Z < -0.45 * p.liver_height) & (Z > p.bladder.z_range[1] - 10)
    c.paint(full, in_abdomen & (bowel_f > 0.35), L * 0.5 + 20 + 8 * fine)
    c.paint(full, in_abdomen & (bowel_f > 0.6), np.where(gas_f > 1.4, AIR_HU, 15 + 10 * fine))

    # Colon frame: ascending (right), transverse, descending (left), with gas and stool.
    stool = lambda b: np.where(bowel_f[b] > 0.9, AIR_HU, -250 + 200 * np.clip(fine[b], -1.5, 1.5))  # noqa: E731
    H = p.liver_height
    asc = Blob((-p.colon_x, 0.0, -H - 60), rx=22, ry=20, rz_up=75, rz_down=120, p_up=6, p_down=6, wobble=0.12)
    desc = Blob((p.colon_x, 0.15 * p.body_b, -H - 40), rx=18, ry=18, rz_up=H - 20, rz_down=150, p_up=6, p_down=6,
                wobble=0.12)
    trans = Blob((0.0, -0.45 * p.body_b, -H - 5), rx=0.75 * p.body_a, ry=18, rz_up=20, rz_down=20, p_up=3, p_down=3,
                 wobble=0.15)
    for seg in (asc, desc, trans):
        c.paint_blob(seg, L * 0.4 + 20, where=in_cavity)
        c.paint_blob(seg.shrunk(4), stool, where=in_cavity)

    # Retroperitoneum and upper abdomen: psoas, kidneys, pancreas, spleen, stomach.
    for side in (-1, 1):
        psoas = Blob((side * (p.vert_rx + 14), p.spine_y - 5, -H - 80), rx=14, ry=16, rz_up=H * 0.55,
                     rz_down=max(-p.acetabulum_z - H - 60, 40), p_up=1.5, p_down=3, tilt=(-side * 0.06, 0.1))
        c.paint_blob(psoas, lambda b: hu["muscle"] + 5 * fine[b])
    for kid in p.kidneys:
        c.paint_blob(kid, L + hu["kidney_plus"], where=below)
        c.paint_blob(kid.shrunk(7), L + hu["kidney_plus"] * 0.5, where=below)
        sinus = replace(kid.shrunk(14), center=(kid.center[0] * 0.8, kid.center[1] - 4, kid.center[2]))
        c.paint_blob(sinus, hu["fat"] + 40, where=below)
    c.paint_blob(p.pancreas, lambda b: L + hu["pancreas_plus"] + 10 * fine[b], where=below)
    c.paint_blob(p.spleen, lambda b: L + hu["spleen_plus"] + 5 * fine[b], where=below)
    c.paint_blob(p.stomach, L + 5, where=below)
    inner = p.stomach.shrunk(4)
    if p.stomach_content == "food":
        content = lambda b: 45 + 25 * fine[b]  # noqa: E731  (overlaps the liver's HU)
    elif p.stomach_content == "gas":
        content = lambda b: np.where(c.grid(b)[1] < inner.center[1] - 0.2 * inner.ry, AIR_HU, 10 + 5 * fine[b])  # noqa: E731
    else:
        content = lambda b: 12 + 5 * fine[b]  # noqa: E731
    c.paint_blob(inner, content, where=below)

    # Liver (label 1): two lobes under the diaphragm, texture and portal-venous vessels; tumours (label 2).
    def liver_tex(b):
        return L + 6 * fine[b] + np.where(np.abs(vessels[b]) < 0.18, 45.0, 0.0)

    def liver_where(b):
        return (c.grid(b)[2] < zdia[b] - 4) & cavity[b]

    for lobe in (p.liver_right, p.liver_left):
        c.paint_blob(lobe, liver_tex, label=LIVER, where=liver_where)
    for t in p.tumours:
        tb = Blob(t.center, rx=t.radius * t.aspect[0], ry=t.radius * t.aspect[1], rz_up=t.radius * t.aspect[2],
                  rz_down=t.radius * t.aspect[2], wobble=0.08)
        is_liver = lambda b: c.label[b] > 0  # noqa: E731
        if t.rim_hu:
            c.paint_blob(tb, L + t.rim_hu, label=TUMOUR, where=is_liver)
            tb = tb.shrunk(min(3.0, t.radius * 0.3))
        c.paint_blob(tb, lambda b, t=t: L + t.delta_hu + 8 * fine[b], label=TUMOUR, where=is_liver)
    c.paint_blob(p.gallbladder, hu["gall"], where=below)

    # Vessels: IVC (carves the liver), aorta with its iliac branches, heart above the diaphragm.
    bif = p.iliac_crest_z + 15
    ivc = Blob((p.ivc_x, p.spine_y - p.vert_ry - p.ivc_r - 4, (bif + 10) / 2), rx=p.ivc_r * 1.2, ry=p.ivc_r,
               rz_up=(10 - bif) / 2, rz_down=(10 - bif) / 2, p_up=10, p_down=10)
    c.paint_blob(ivc, L * 0.6 + hu["blood"] * 0.4)
    aorta = Blob((p.aorta_x, p.spine_y - p.vert_ry - p.aorta_r - 3, (bif + 350) / 2), rx=p.aorta_r, ry=p.aorta_r,
                 rz_up=(350 - bif) / 2, rz_down=(350 - bif) / 2, p_up=12, p_down=12)
    c.paint_blob(aorta, hu["blood"])
    for side in (-1, 1):
        iliac = Blob((p.aorta_x * 0.5, aorta.center[1], bif), rx=p.aorta_r * 0.7, ry=p.aorta_r * 0.7, rz_up=1,
                     rz_down=130, p_down=10, tilt=(-side * 0.45, 0.1))
        c.paint_blob(iliac, hu["blood"])
    asc_aorta = Blob((p.heart.center[0] * 0.3, -0.25 * p.body_b, p.heart.center[2] + 90), rx=15, ry=15,
                     rz_up=80, rz_down=60, p_up=8, p_down=8)
    c.paint_blob(asc_aorta, hu["blood"])
    c.paint_blob(p.heart.moved(scale=1.06), hu["fat"] + 20, where=above_dia)  # pericardial fat
    c.paint_blob(p.heart, lambda b: L * 0.3 + 70 + 5 * fine[b], where=above_dia)  # myocardium
    for dx, dy in ((-14, -10), (16, 8)):
        chamber = replace(p.heart.shrunk(12).moved(dx=dx, dy=dy, scale=0.65))
        c.paint_blob(chamber, hu["blood"] - 10, where=above_dia)
    trachea = Blob((0.0, -0.15 * p.body_b, 330.0), rx=10, ry=9, rz_up=200, rz_down=170, p_up=8, p_down=8)
    c.paint_blob(trachea, AIR_HU)

    # Bones: vertebrae with discs and posterior elements, sacrum, ribs, sternum, hip bones, femora.
    _paint_spine(p, c)
    _paint_ribs(p, c, Ac, Bc, A, B)
    _paint_pelvic_bones(p, c)


def _bone(c: _Canvas, b: Blob, p: Patient, where: Callable | None = None, shell: float = 2.5) -> None:
    """Cortical shell + cancellous core: the hard edges a CNN latches onto."""
    c.paint_blob(b, p.hu["cortical"], where=where)
    c.paint_blob(b.shrunk(shell), lambda box: p.hu["cancellous"] + 25 * c.field("fine")[box], where=where)


def _paint_spine(p: Patient, c: _Canvas) -> None:
    sacrum_top = p.iliac_crest_z - 20
    phase = lambda box: ((c.grid(box)[2] - 7.0) / p.vert_pitch) % 1.0  # noqa: E731
    disc_frac = 7.0 / p.vert_pitch
    zs = (sacrum_top, 400.0)
    body = Blob((0.0, p.spine_y, sum(zs) / 2), rx=p.vert_rx, ry=p.vert_ry, rz_up=(zs[1] - zs[0]) / 2,
                rz_down=(zs[1] - zs[0]) / 2, p_up=20, p_down=20)
    c.paint_blob(body, 90.0)  # discs
    _bone(c, body, p, where=lambda box: phase(box) > disc_frac)
    canal_y = p.spine_y + p.vert_ry + 9
    arch = Blob((0.0, canal_y, body.center[2]), rx=13, ry=12, rz_up=body.rz_up, rz_down=body.rz_down, p_up=20, p_down=20)
    post = lambda box: (phase(box) > 0.15) & (phase(box) < 0.8)  # noqa: E731
    c.paint_blob(arch, p.hu["cortical"], where=post)
    spinous = Blob((0.0, canal_y + 22, body.center[2]), rx=5, ry=12, rz_up=body.rz_up, rz_down=body.rz_down,
                   p_up=20, p_down=20)
    _bone(c, spinous, p, where=post, shell=1.5)
    for side in (-1, 1):
        tp = Blob((side * (p.vert_rx + 13), canal_y - 3, body.center[2]), rx=13, ry=5, rz_up=body.rz_up,
                  rz_down=body.rz_down, p_up=20, p_down=20, angle=side * 0.2)
        _bone(c, tp, p, where=lambda box: (phase(box) > 0.3) & (phase(box) < 0.65), shell=1.5)
    canal = replace(arch, rx=8, ry=7)
    c.paint_blob(canal, 15.0)
    sacrum = Blob((0.0, p.spine_y + 10, sacrum_top), rx=48, ry=18, rz_up=1, rz_down=110, p_down=1.6, tilt=(0, -0.35))
    _bone(c, sacrum, p, shell=3)


def _paint_ribs(p: Patient, c: _Canvas, Ac, Bc, A, B) -> None:
    """Twelve ribs per side, each running obliquely down from the spine toward the front.

    In an axial slice a rib shows as short arcs in the chest wall; which arcs appear changes
    quickly with Z, as in real CT.
    """
    zmin = p.rib_top - 11 * p.rib_pitch - p.rib_drop - 10
    box = c.box(-1e4, 1e4, -1e4, 1e4, zmin, p.rib_top + 10)
    if box is None:
        return
    x, y, z = c.grid(box)
    kz = box[0]
    ac, bc, a_, b_ = Ac[kz], Bc[kz], A[kz], B[kz]
    rho = np.sqrt((x / ac) ** 2 + (y / bc) ** 2)
    depth = (rho - 1) * ac  # mm outward from the cavity wall
    phi = np.arctan2(x, -y)  # 0 anterior, +-pi posterior
    anterior = (1 + np.cos(phi)) / 2  # 1 at the front, 0 at the back
    z_rel = p.rib_top - z - p.rib_drop * anterior  # height below rib 1's posterior head along the rib's path
    idx = np.floor(z_rel / p.rib_pitch)
    frac = z_rel - idx * p.rib_pitch  # mm into the current rib band
    height = 11.0
    # Ribs 1-7 reach the sternum, 8-10 the costal margin, 11-12 float posterolaterally.
    reach = np.where(idx < 7, 0.93, np.where(idx < 10, 0.75, 0.35))
    on = (idx >= 0) & (idx < 12) & (frac < height) & (anterior < reach) & (depth > -3) & (depth < 7)
    on &= (x / a_) ** 2 + (y / b_) ** 2 < 1
    core = on & (frac > 2.5) & (frac < height - 2.5) & (depth > -0.5) & (depth < 4.5)
    c.paint(box, on, p.hu["cortical"])
    c.paint(box, core, p.hu["cancellous"])
    sternum = Blob((0.0, -(bc.min() + 6), 100.0), rx=14, ry=6, rz_up=100, rz_down=110, p_up=10, p_down=10)
    _bone(c, sternum, p, shell=2)


def _paint_pelvic_bones(p: Patient, c: _Canvas) -> None:
    crest, acet = p.iliac_crest_z, p.acetabulum_z
    for side in (-1, 1):
        wing = Blob((side * (p.hip_x - 15), p.spine_y * 0.45, crest - 15), rx=55, ry=9, rz_up=15,
                    rz_down=crest - acet + 5, p_up=2, p_down=3, tilt=(side * 0.2, 0.05), angle=-side * 0.75)
        _bone(c, wing, p, shell=3)
        head = Blob((side * p.hip_x, -0.05 * p.body_b, acet), rx=24, ry=24, rz_up=24, rz_down=24)
        _bone(c, head, p, shell=3)
        neck = Blob((side * (p.hip_x + 12), -0.05 * p.body_b, acet - 25), rx=16, ry=16, rz_up=20, rz_down=300,
                    p_up=3, p_down=10, tilt=(-side * 0.12, 0.0))
        _bone(c, neck, p, shell=5)
        pubis = Blob((side * 22, -0.45 * p.body_b, acet - 20), rx=20, ry=10, rz_up=15, rz_down=20, angle=side * 0.4)
        _bone(c, pubis, p, shell=2.5)
        ischium = Blob((side * (p.hip_x - 20), 0.3 * p.body_b, acet - 35), rx=14, ry=18, rz_up=25, rz_down=25)
        _bone(c, ischium, p, shell=2.5)


# --------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------


def _lattices(p: Patient, size: int) -> dict[str, _Lattice]:
    px = p.body_a * 2.4 / size  # rough pixel size, so textures stay visible at small matrices
    rng = np.random.default_rng(p.field_seed)
    return {
        "fine": _Lattice.make(rng, max(5.0, 1.5 * px)),
        "shape": _Lattice.make(rng, 18.0),
        "coarse": _Lattice.make(rng, 14.0),
        "bowel": _Lattice.make(rng, 16.0),
        "vessel": _Lattice.make(rng, max(7.0, 1.2 * px)),
    }


def exam_geometry(e: Exam, size: int) -> tuple[float, float, int]:
    """(in-plane spacing, slice thickness, number of slices) for a ``size`` px matrix (see max_slices)."""
    spacing = e.spacing_xy * NOMINAL_MATRIX / size
    extent = e.z_top - e.z_bottom
    n = int(round(extent / e.thickness)) + 1
    cap = max_slices(size)
    thickness = e.thickness
    if n > cap:
        n = cap
        thickness = extent / (cap - 1)
    return spacing, thickness, n


def render(p: Patient, e: Exam, size: int = 512, lattices: dict[str, _Lattice] | None = None) -> tuple[Volume, np.ndarray]:
    """Sample patient ``p`` as examination ``e`` on a ``size`` x ``size`` matrix.

    Returns:
        (Volume with hu int16 [z, y, x] in canonical LPS order, label uint8 [z, y, x]).
    """
    spacing, thickness, n = exam_geometry(e, size)
    ox, oy, oz = e.offset_lps
    # Scanner grid in LPS: isocentre at x = y = 0; the patient frame sits at offset_lps.
    lps_x = (np.arange(size) - (size - 1) / 2) * spacing
    lps_y = lps_x.copy()
    pz = e.z_bottom + thickness * np.arange(n)  # slice 0 is the most inferior
    x, y = lps_x - ox, lps_y - oy
    anat = _anatomy_for_exam(p, e)
    lattices = lattices or _lattices(p, size)
    slab = max(8, 2**20 // (size * size))  # slices painted at once: bounded memory, few Python loops
    noise_rng = np.random.default_rng([p.field_seed, e.index, size])
    hu = np.empty((n, size, size), np.int16)
    label = np.empty((n, size, size), np.uint8)
    outside_fov = (lps_x[None, :] ** 2 + lps_y[:, None] ** 2) > (size * spacing / 2) ** 2
    for k0 in range(0, n, slab):
        c = _Canvas(x.astype(np.float64), y.astype(np.float64), pz[k0 : k0 + slab], lattices)
        _render_slab(anat, e, c)
        c.hu += noise_rng.standard_normal(c.hu.shape, dtype=np.float32) * np.float32(e.noise_hu)
        if e.pad_outside_fov:
            c.hu[:, outside_fov] = PAD_HU
        hu[k0 : k0 + slab] = np.clip(np.rint(c.hu), -3024, 3071).astype(np.int16)
        label[k0 : k0 + slab] = c.label
    origin = (lps_x[0], lps_y[0], pz[0] + oz)
    sid = f"{p.patient_id}-exam{e.index + 1}"
    vol = Volume(
        hu=hu,
        spacing_mm=(float(thickness), float(spacing), float(spacing)),
        affine=Volume.affine_from((thickness, spacing, spacing), origin),
        patient_id=p.patient_id,
        study_id=sid,
        series_id=f"{sid}-ct",
        exam_date=e.exam_date,
        source="synthetic",
    )
    return vol, label


def _generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def synth_volume(
    rng: np.random.Generator | int | None = 0, size: int = 512, *, index: int = 0, exams: int = 1
) -> tuple[Volume, np.ndarray] | list[tuple[Volume, np.ndarray]]:
    """One synthetic patient's first examination (or a list of ``exams`` examinations).

    Args:
        rng: a numpy Generator or an int seed.
        size: matrix size (slices are size x size px); anatomy keeps its size in mm.
        index: patient number, used for the pseudonym ``synth-0003``.
        exams: 1 returns ``(volume, label)``; more returns a list of them, later exams later in time.

    Returns:
        (Volume, label uint8 [z, y, x]) with 0 background, 1 liver, 2 tumour.
    """
    out = list(_patient_exams(_generator(rng), size, index, exams))
    return out[0][2:] if exams == 1 else [o[2:] for o in out]


def _patient_exams(rng: np.random.Generator, size: int, index: int, exams: int) -> Iterator[tuple]:
    """Yield (patient, exam, volume, label) for each examination of one new patient."""
    p = sample_patient(rng, index)
    lattices = _lattices(p, size)
    prev = None
    for ei in range(exams):
        e = sample_exam(rng, p, ei, prev)
        vol, label = render(p, e, size, lattices)
        yield p, e, vol, label
        prev = e


# --------------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------------


@dataclass
class SynthCase:
    """One written volume and its ground truth."""

    case: str  # Decathlon case name, e.g. liver_3
    patient_id: str
    exam: int  # 1-based
    exam_date: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    liver_slices: tuple[int, int]  # first and last slice index holding liver (inclusive)
    tumours: int
    liver_hu: float
    noise_hu: float
    scan_range_mm: tuple[float, float]  # patient Z (0 = liver dome) of slice 0 and the last slice
    dome_z_lps: float  # LPS z of the anatomical liver dome in this exam (cross-exam ground truth)
    nifti_image: str | None = None
    nifti_label: str | None = None
    dicom_folder: str | None = None


@dataclass
class SynthSummary:
    """What ``synth_archive`` wrote."""

    out: str
    patients: int
    volumes: int
    slices: int
    size: int
    seed: int
    fmt: str
    nifti_dir: str | None
    dicom_dir: str | None
    cases: list[SynthCase]

    def to_json(self) -> dict:
        return asdict(self)


def synth_archive(
    out: str | os.PathLike,
    volumes: int,
    seed: int,
    size: int = 512,
    fmt: str = "nifti",
    exams: int = 1,
    progress: Callable[[Iterable, int, str], Iterable] | None = None,
) -> SynthSummary:
    """Write a synthetic liver CT archive.

    ``volumes`` patients are drawn from ``seed``; each gets ``exams`` examinations (so
    ``volumes * exams`` volumes in all, cases numbered patient by patient). NIfTI goes to
    ``out/nifti`` in the Medical Segmentation Decathlon layout (dataset.json, imagesTr/liver_N.nii.gz,
    labelsTr/liver_N.nii.gz); DICOM to ``out/dicom/<patient>/<study>/<series>/`` one file per slice.
    ``out/synth.json`` holds the summary and per-case ground truth. ``progress(items, total,
    description)`` may wrap the loop over patients (the CLI's progress bar).

    Example:
        >>> import tempfile
        >>> s = synth_archive(tempfile.mkdtemp(), volumes=2, seed=0, size=64)  # doctest: +SKIP
        >>> s.volumes, sorted(os.listdir(s.nifti_dir))                         # doctest: +SKIP
        (2, ['dataset.json', 'imagesTr', 'labelsTr'])
    """
    from ctsearch.errors import CTSearchInputError
    from ctsearch.io import write_dicom_series, write_nifti

    if fmt not in FORMATS:
        raise CTSearchInputError(str(out), f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if volumes < 1:
        raise CTSearchInputError(str(out), f"--volumes must be at least 1, not {volumes}")
    if exams < 1:
        raise CTSearchInputError(str(out), f"--exams must be at least 1, not {exams}")
    if not 16 <= size <= 1024:
        raise CTSearchInputError(str(out), f"--size must be between 16 and 1024 px, not {size}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CTSearchInputError(str(out), "exists and is not a folder")
    nifti_dir = out / "nifti" if fmt in ("nifti", "both") else None
    dicom_dir = out / "dicom" if fmt in ("dicom", "both") else None
    root = np.random.SeedSequence(seed)
    cases: list[SynthCase] = []
    progress = progress or (lambda items, total, desc: items)
    for pi, child in progress(enumerate(root.spawn(volumes)), volumes, "synthesising patients"):
        rng = np.random.default_rng(child)
        for p, e, vol, label in _patient_exams(rng, size, pi, exams):
            name = f"liver_{len(cases)}"
            z_liver = np.flatnonzero(label.reshape(label.shape[0], -1).max(axis=1) > 0)
            spacing = tuple(float(s) for s in vol.spacing_mm)
            case = SynthCase(
                case=name,
                patient_id=p.patient_id,
                exam=e.index + 1,
                exam_date=e.exam_date,
                shape=vol.shape,
                spacing_mm=spacing,
                liver_slices=(int(z_liver[0]), int(z_liver[-1])) if len(z_liver) else (-1, -1),
                tumours=int(len(p.tumours) + len(e.new_tumours)),
                liver_hu=round(e.liver_hu, 1),
                noise_hu=round(e.noise_hu, 1),
                scan_range_mm=(round(e.z_bottom, 1), round(e.z_bottom + spacing[0] * (vol.shape[0] - 1), 1)),
                dome_z_lps=round(e.offset_lps[2] + e.breathing_dz, 2),
            )
            if nifti_dir is not None:
                img, lab = nifti_dir / "imagesTr" / f"{name}.nii.gz", nifti_dir / "labelsTr" / f"{name}.nii.gz"
                write_nifti(vol, img, label=label, label_path=lab)
                case.nifti_image, case.nifti_label = str(img), str(lab)
            if dicom_dir is not None:
                folder = dicom_dir / p.patient_id / f"study-{e.index + 1}" / "series-1"
                write_dicom_series(vol, folder, rng_seed=seed * 100003 + len(cases))
                case.dicom_folder = str(folder)
            cases.append(case)
    if nifti_dir is not None:
        _write_dataset_json(nifti_dir, cases)
    summary = SynthSummary(
        out=str(out),
        patients=volumes,
        volumes=len(cases),
        slices=int(sum(c.shape[0] for c in cases)),
        size=size,
        seed=seed,
        fmt=fmt,
        nifti_dir=str(nifti_dir) if nifti_dir else None,
        dicom_dir=str(dicom_dir) if dicom_dir else None,
        cases=cases,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "synth.json").write_text(json.dumps(summary.to_json(), indent=2))
    return summary


def _write_dataset_json(nifti_dir: Path, cases: list[SynthCase]) -> None:
    """Decathlon dataset.json; the extra patient_id / exam_date keys are ignored by Decathlon readers."""
    doc = {
        "name": "SynthLiver",
        "description": "Synthetic abdominal CT phantoms with liver and tumour labels (ctsearch synth)",
        "reference": "ctsearch",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": len(cases),
        "numTest": 0,
        "training": [
            {
                "image": f"./imagesTr/{c.case}.nii.gz",
                "label": f"./labelsTr/{c.case}.nii.gz",
                "patient_id": c.patient_id,
                "exam_date": c.exam_date,
            }
            for c in cases
        ],
        "test": [],
    }
    (nifti_dir / "dataset.json").write_text(json.dumps(doc, indent=2))
