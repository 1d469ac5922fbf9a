"""The phantom's anatomy: smooth shapes in patient millimetres, a patient, an examination of it.

Patient frame: X toward the patient's left, Y toward posterior, Z toward superior, Z = 0 at the
top of the liver dome. ``sample_patient`` draws one patient's organs and lesions,
``sample_exam`` one examination (scanner grid, breathing shift, lesion growth), and
``anatomy_for_exam`` the patient as that examination sees it.

Example:
    >>> import numpy as np
    >>> p = sample_patient(np.random.default_rng(0))
    >>> e = sample_exam(np.random.default_rng(1), p)
    >>> p.liver_right.center[2] < 0 < e.z_top
    True
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field, replace

import numpy as np

# Decathlon label values (Task03_Liver).
BACKGROUND, LIVER, TUMOUR = 0, 1, 2

NOMINAL_MATRIX = 512  # spacings are drawn for a 512 matrix; smaller --size keeps the field of view
THICKNESSES_MM = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)


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
        return (
            float((cx - r)[on].min()),
            float((cx + r)[on].max()),
            float((cy - r)[on].min()),
            float((cy + r)[on].max()),
        )

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
    tumours = [
        _sample_tumour(rng, right if rng.random() < 0.8 else left)
        for _ in range(int(rng.choice([0, 1, 1, 2, 2, 3, 3, 4, 5, 7])))
    ]

    gall = None
    if rng.random() < 0.85:
        gall = Blob(
            center=(-Ac * u(0.05, 0.25), -Bc * u(0.2, 0.42), -H * u(0.5, 0.75)),
            rx=u(12, 22),
            ry=u(12, 22),
            rz_up=u(20, 35),
            rz_down=u(15, 30),
            tilt=(-0.2, -0.2),
            wobble=0.05,
        )
    spleen = Blob(
        center=(Ac * u(0.5, 0.66), Bc * u(0.25, 0.5), -u(30, 70)),
        rx=u(25, 38),
        ry=u(45, 65),
        rz_up=u(35, 60),
        rz_down=u(35, 60),
        p_up=2.2,
        p_down=u(1.6, 2.2),
        angle=u(-0.8, -0.3),
        wobble=u(0.03, 0.08),
    )
    zr = -H * u(0.6, 0.85)
    kid_r = Blob(
        center=(-u(50, 72), Bc * u(0.35, 0.55), zr),
        rx=u(22, 30),
        ry=u(24, 32),
        rz_up=u(45, 60),
        rz_down=u(45, 60),
        angle=u(0.3, 0.7),
        wobble=0.04,
        tilt=(-0.1, 0.0),
    )
    kid_l = Blob(
        center=(u(50, 72), Bc * u(0.35, 0.55), zr + u(10, 35)),
        rx=u(22, 30),
        ry=u(24, 32),
        rz_up=u(45, 60),
        rz_down=u(45, 60),
        angle=-u(0.3, 0.7),
        wobble=0.04,
        tilt=(0.1, 0.0),
    )
    stomach = Blob(
        center=(Ac * u(0.18, 0.4), -Bc * u(0.05, 0.3), -u(40, 80)),
        rx=u(35, 55),
        ry=u(25, 45),
        rz_up=u(30, 45),
        rz_down=u(40, 75),
        p_down=u(1.5, 2.2),
        tilt=(0.25, -0.1),
        angle=u(-0.5, 0.2),
        wobble=u(0.05, 0.12),
    )
    pancreas = Blob(
        center=(u(0, 30), Bc * u(0.0, 0.2), -H * u(0.45, 0.62)),
        rx=u(55, 75),
        ry=u(9, 15),
        rz_up=u(10, 18),
        rz_down=u(10, 18),
        p_up=2.5,
        p_down=2.5,
        angle=u(-0.4, -0.1),
        wobble=0.1,
    )
    heart = Blob(
        center=(u(15, 40), -Bc * u(0.05, 0.25), u(45, 70)),
        rx=u(55, 72),
        ry=u(45, 60),
        rz_up=u(45, 60),
        rz_down=u(45, 60),
        angle=u(0.4, 0.8),
        wobble=0.03,
    )
    spine_y = Bc * u(0.45, 0.58)
    bladder = Blob(
        center=(u(-8, 8), -Bc * u(0.15, 0.4), acet + u(0, 25)),
        rx=u(28, 55),
        ry=u(22, 42),
        rz_up=u(22, 45),
        rz_down=u(20, 35),
        wobble=0.05,
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
        body_a=A,
        body_b=B,
        fat_mm=fat,
        muscle_mm=muscle,
        body_knots=body_knots,
        liver_height=H,
        liver_right=right,
        liver_left=left,
        tumours=tumours,
        gallbladder=gall,
        spleen=spleen,
        kidneys=(kid_r, kid_l),
        stomach=stomach,
        stomach_content=str(rng.choice(["water", "food", "gas"])),
        pancreas=pancreas,
        heart=heart,
        dome_left_drop=u(8, 28),
        diaphragm_drop=u(35, 60),
        spine_y=spine_y,
        vert_rx=u(17, 25),
        vert_ry=u(15, 21),
        vert_pitch=u(26, 34),
        rib_pitch=u(21, 27),
        rib_drop=u(60, 100),
        rib_top=u(220, 260),
        iliac_crest_z=crest,
        acetabulum_z=acet,
        hip_x=u(82, 100),
        bladder=bladder,
        colon_x=Ac * u(0.6, 0.75),
        aorta_x=u(8, 25),
        aorta_r=u(10, 14),
        ivc_x=-u(15, 28),
        ivc_r=u(9, 13),
        hu=hu,
        field_seed=int(rng.integers(0, 2**31 - 1)),
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


def sample_exam(
    rng: np.random.Generator, patient: Patient, index: int = 0, previous: Exam | None = None
) -> Exam:
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


def anatomy_for_exam(p: Patient, e: Exam) -> Patient:
    """The patient as this examination sees it: breathing shift, grown and new lesions."""
    dz = e.breathing_dz
    tumours = [
        replace(t, center=(t.center[0], t.center[1], t.center[2] + dz), radius=t.radius * e.tumour_growth)
        for t in p.tumours
    ]
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
