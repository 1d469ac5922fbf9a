"""Painting a patient onto a slab: one painter per body region, in the order that layers them.

Each painter paints its region's structures onto the ``Canvas``; a later one paints over an
earlier one (organs over the mesentery, bones last). ``BodyFrame`` holds what several regions
share: the body and cavity outlines, the diaphragm and the texture fields.

Example:
    >>> import numpy as np
    >>> from ctsearch.synth.anatomy import sample_exam, sample_patient
    >>> from ctsearch.synth.fields import texture_lattices
    >>> p = sample_patient(np.random.default_rng(0)); e = sample_exam(np.random.default_rng(1), p)
    >>> c = Canvas(np.linspace(-200, 200, 32), np.linspace(-200, 200, 32), np.array([-60.0]), texture_lattices(p, 32))
    >>> paint_patient(p, e, c)
    >>> bool((c.label == 1).any())  # 60 mm below the dome: liver
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ctsearch.synth.anatomy import LIVER, TUMOUR, Blob, Exam, Patient
from ctsearch.synth.canvas import AIR_HU, Canvas

FULL = (slice(None), slice(None), slice(None))


@dataclass
class BodyFrame:
    """The geometry every region paints within, on the slab's grid (arrays broadcast to [z, y, x])."""

    X: np.ndarray  # [1, 1, x] patient mm
    Y: np.ndarray  # [1, y, 1]
    Z: np.ndarray  # [z, 1, 1]
    A: np.ndarray  # [z, 1, 1] body semi-axes (left-right, anterior-posterior)
    B: np.ndarray
    Ac: np.ndarray  # [z, 1, 1] body-cavity semi-axes (inside the muscle wall)
    Bc: np.ndarray
    rc: np.ndarray  # (X / Ac)^2 + (Y / Bc)^2: 1 on the cavity wall
    cavity: np.ndarray  # bool [z, y, x]
    zdia: np.ndarray  # the diaphragm's height at (y, x)
    above: np.ndarray  # bool: above the diaphragm
    L: float  # this examination's liver HU (contrast phase)
    fine: np.ndarray  # texture fields of the slab
    vessels: np.ndarray

    @classmethod
    def of(cls, p: Patient, e: Exam, c: Canvas) -> BodyFrame:
        X, Y, Z = c.x[None, None, :], c.y[None, :, None], c.z[:, None, None]
        # Body outline and wall (elliptical, varying with Z); the cavity is inside the muscle wall.
        zk, ak, bk = p.body_knots
        order = np.argsort(zk)
        za = np.interp(c.z, np.asarray(zk)[order], np.asarray(ak)[order])
        zb = np.interp(c.z, np.asarray(zk)[order], np.asarray(bk)[order])
        A = (p.body_a * za)[:, None, None]
        B = (p.body_b * zb)[:, None, None]
        pelvis = np.clip((p.iliac_crest_z - Z) / 60.0, 0, 1)  # 0 above the iliac crest, 1 well below
        wall = p.fat_mm + p.muscle_mm * (1 + 1.5 * pelvis)
        Ac, Bc = A - wall, B - wall
        rc = (X / Ac) ** 2 + (Y / Bc) ** 2
        # Diaphragm: two domes (right at Z = 0, left lower), deepening toward the lateral and posterior walls.
        k = p.diaphragm_drop / (0.55 * Ac) ** 2
        dome_r = -k * ((X + 0.45 * Ac) ** 2 + (Y / 1.2) ** 2)
        dome_l = -p.dome_left_drop - k * ((X - 0.4 * Ac) ** 2 + (Y / 1.2) ** 2)
        zdia = np.maximum(dome_r, dome_l) - 15 * np.clip(Y / Bc, 0, 1)
        return cls(
            X, Y, Z, A, B, Ac, Bc, rc, rc <= 1, zdia, Z > zdia, e.liver_hu, c.field("fine"), c.field("vessel")
        )

    # Masks restricted to a blob's box (``Canvas.paint_blob(..., where=...)``).
    def above_dia(self, box) -> np.ndarray:
        return self.above[box]

    def below_dia(self, box) -> np.ndarray:
        return ~self.above[box]

    def in_cavity(self, box) -> np.ndarray:
        return self.cavity[box]


def paint_patient(p: Patient, e: Exam, c: Canvas) -> None:
    """Paint every structure of ``p`` onto the slab ``c`` (patient coordinates), region by region."""
    f = BodyFrame.of(p, e, c)
    for painter in PAINTERS:
        painter(p, c, f)


def paint_body_wall(p: Patient, c: Canvas, f: BodyFrame) -> None:
    """Subcutaneous fat, the muscle wall, the mesentery filling the cavity, and the CT table."""
    hu, X, Y, A, B = p.hu, f.X, f.Y, f.A, f.B
    back = Y < B * 0.9  # a supine patient's back is flattened on the table
    body = ((X / A) ** 2 + (Y / B) ** 2 <= 1) & back
    c.paint(FULL, body, hu["fat"] + 6 * f.fine)
    muscle = ((X / (A - p.fat_mm)) ** 2 + (Y / (B - p.fat_mm)) ** 2 <= 1) & back
    c.paint(FULL, muscle, hu["muscle"] + 5 * f.fine)
    # Mesentery: fat with soft-tissue strands.
    c.paint(FULL, f.cavity, hu["fat"] + 10 + 15 * np.clip(c.field("coarse"), -1.5, 1.5) + 6 * f.fine)
    table = (np.abs(Y - (B * 0.9 + 4 + 0.0006 * X**2)) < 3) & (np.abs(X) < 230)
    c.paint(FULL, np.broadcast_to(table, c.hu.shape), 150.0)


def paint_thorax(p: Patient, c: Canvas, f: BodyFrame) -> None:
    """Lungs (with vessels), the diaphragm muscle and the mediastinal fat."""
    hu = p.hu
    lungs = f.cavity & f.above & (f.rc <= 0.97)
    c.paint(FULL, lungs, hu["lung"] + 25 * f.fine + np.where(f.vessels > 1.9, 700.0, 0.0))
    c.paint(FULL, f.cavity & ~f.above & (f.Z > f.zdia - 5), hu["muscle"])  # the diaphragm muscle
    mediastinum = Blob(
        (p.heart.center[0] * 0.3, 0.05 * p.body_b, 300.0),
        rx=26,
        ry=0.45 * p.body_b,
        rz_up=200,
        rz_down=330,
        p_up=8,
        p_down=8,
    )
    c.paint_blob(mediastinum, lambda b: hu["fat"] + 30 + 20 * f.fine[b], where=f.above_dia)


def paint_pelvic_organs(p: Patient, c: Canvas, f: BodyFrame) -> None:
    """Bladder (wall and urine) and rectum."""
    c.paint_blob(p.bladder, p.hu["muscle"])
    c.paint_blob(p.bladder.shrunk(3), p.hu["bladder"])
    rectum = Blob(
        (0.0, p.spine_y - 25, p.acetabulum_z + 40),
        rx=16,
        ry=14,
        rz_up=80,
        rz_down=120,
        p_up=6,
        p_down=6,
        tilt=(0, -0.15),
        wobble=0.1,
    )
    c.paint_blob(rectum, lambda b: np.where(c.field("bowel")[b] > 0.6, AIR_HU, 10 + 30 * f.fine[b]))


def paint_bowel(p: Patient, c: Canvas, f: BodyFrame) -> None:
    """Small-bowel loops: islands of a smooth random field (wall + fluid or gas lumen) in the free abdomen."""
    bowel, gas = c.field("bowel"), c.field("shape")
    free = f.cavity & ~f.above & (f.Z < -0.45 * p.liver_height) & (f.Z > p.bladder.z_range[1] - 10)
    c.paint(FULL, free & (bowel > 0.35), f.L * 0.5 + 20 + 8 * f.fine)
    c.paint(FULL, free & (bowel > 0.6), np.where(gas > 1.4, AIR_HU, 15 + 10 * f.fine))


def paint_colon(p: Patient, c: Canvas, f: BodyFrame) -> None:
    """The colon frame: ascending (right), transverse, descending (left), with gas and stool."""
    bowel = c.field("bowel")
    stool = lambda b: np.where(bowel[b] > 0.9, AIR_HU, -250 + 200 * np.clip(f.fine[b], -1.5, 1.5))  # noqa: E731
    H = p.liver_height
    asc = Blob((-p.colon_x, 0.0, -H - 60), rx=22, ry=20, rz_up=75, rz_down=120, p_up=6, p_down=6, wobble=0.12)
    desc = Blob(
        (p.colon_x, 0.15 * p.body_b, -H - 40),
        rx=18,
        ry=18,
        rz_up=H - 20,
        rz_down=150,
        p_up=6,
        p_down=6,
        wobble=0.12,
    )
    trans = Blob(
        (0.0, -0.45 * p.body_b, -H - 5),
        rx=0.75 * p.body_a,
        ry=18,
        rz_up=20,
        rz_down=20,
        p_up=3,
        p_down=3,
        wobble=0.15,
    )
    for seg in (asc, desc, trans):
        c.paint_blob(seg, f.L * 0.4 + 20, where=f.in_cavity)
        c.paint_blob(seg.shrunk(4), stool, where=f.in_cavity)


def paint_upper_abdomen(p: Patient, c: Canvas, f: BodyFrame) -> None:
    """Retroperitoneum and upper abdomen: psoas, kidneys, pancreas, spleen, stomach."""
    hu, L, H, fine = p.hu, f.L, p.liver_height, f.fine
    for side in (-1, 1):
        psoas = Blob(
            (side * (p.vert_rx + 14), p.spine_y - 5, -H - 80),
            rx=14,
            ry=16,
            rz_up=H * 0.55,
            rz_down=max(-p.acetabulum_z - H - 60, 40),
            p_up=1.5,
            p_down=3,
            tilt=(-side * 0.06, 0.1),
        )
        c.paint_blob(psoas, lambda b: hu["muscle"] + 5 * fine[b])
    for kid in p.kidneys:
        c.paint_blob(kid, L + hu["kidney_plus"], where=f.below_dia)
        c.paint_blob(kid.shrunk(7), L + hu["kidney_plus"] * 0.5, where=f.below_dia)
        sinus = replace(kid.shrunk(14), center=(kid.center[0] * 0.8, kid.center[1] - 4, kid.center[2]))
        c.paint_blob(sinus, hu["fat"] + 40, where=f.below_dia)
    c.paint_blob(p.pancreas, lambda b: L + hu["pancreas_plus"] + 10 * fine[b], where=f.below_dia)
    c.paint_blob(p.spleen, lambda b: L + hu["spleen_plus"] + 5 * fine[b], where=f.below_dia)
    c.paint_blob(p.stomach, L + 5, where=f.below_dia)
    inner = p.stomach.shrunk(4)
    if p.stomach_content == "food":
        content = lambda b: 45 + 25 * fine[b]  # noqa: E731  (overlaps the liver's HU)
    elif p.stomach_content == "gas":
        content = lambda b: np.where(
            c.grid(b)[1] < inner.center[1] - 0.2 * inner.ry, AIR_HU, 10 + 5 * fine[b]
        )  # noqa: E731
    else:
        content = lambda b: 12 + 5 * fine[b]  # noqa: E731
    c.paint_blob(inner, content, where=f.below_dia)


def paint_liver(p: Patient, c: Canvas, f: BodyFrame) -> None:
    """Liver (label 1): two lobes under the diaphragm with texture and portal-venous vessels;
    tumours (label 2) inside it; the gallbladder."""
    L, fine = f.L, f.fine

    def texture(b):
        return L + 6 * fine[b] + np.where(np.abs(f.vessels[b]) < 0.18, 45.0, 0.0)

    def under_diaphragm(b):
        return (c.grid(b)[2] < f.zdia[b] - 4) & f.cavity[b]

    for lobe in (p.liver_right, p.liver_left):
        c.paint_blob(lobe, texture, label=LIVER, where=under_diaphragm)
    is_liver = lambda b: c.label[b] > 0  # noqa: E731
    for t in p.tumours:
        tb = Blob(
            t.center,
            rx=t.radius * t.aspect[0],
            ry=t.radius * t.aspect[1],
            rz_up=t.radius * t.aspect[2],
            rz_down=t.radius * t.aspect[2],
            wobble=0.08,
        )
        if t.rim_hu:
            c.paint_blob(tb, L + t.rim_hu, label=TUMOUR, where=is_liver)
            tb = tb.shrunk(min(3.0, t.radius * 0.3))
        c.paint_blob(tb, lambda b, t=t: L + t.delta_hu + 8 * fine[b], label=TUMOUR, where=is_liver)
    c.paint_blob(p.gallbladder, p.hu["gall"], where=f.below_dia)


def paint_vessels_and_heart(p: Patient, c: Canvas, f: BodyFrame) -> None:
    """IVC (carves the liver), aorta with its iliac branches, heart above the diaphragm, trachea."""
    hu, L = p.hu, f.L
    bif = p.iliac_crest_z + 15
    ivc = Blob(
        (p.ivc_x, p.spine_y - p.vert_ry - p.ivc_r - 4, (bif + 10) / 2),
        rx=p.ivc_r * 1.2,
        ry=p.ivc_r,
        rz_up=(10 - bif) / 2,
        rz_down=(10 - bif) / 2,
        p_up=10,
        p_down=10,
    )
    c.paint_blob(ivc, L * 0.6 + hu["blood"] * 0.4)
    aorta = Blob(
        (p.aorta_x, p.spine_y - p.vert_ry - p.aorta_r - 3, (bif + 350) / 2),
        rx=p.aorta_r,
        ry=p.aorta_r,
        rz_up=(350 - bif) / 2,
        rz_down=(350 - bif) / 2,
        p_up=12,
        p_down=12,
    )
    c.paint_blob(aorta, hu["blood"])
    for side in (-1, 1):
        iliac = Blob(
            (p.aorta_x * 0.5, aorta.center[1], bif),
            rx=p.aorta_r * 0.7,
            ry=p.aorta_r * 0.7,
            rz_up=1,
            rz_down=130,
            p_down=10,
            tilt=(-side * 0.45, 0.1),
        )
        c.paint_blob(iliac, hu["blood"])
    asc_aorta = Blob(
        (p.heart.center[0] * 0.3, -0.25 * p.body_b, p.heart.center[2] + 90),
        rx=15,
        ry=15,
        rz_up=80,
        rz_down=60,
        p_up=8,
        p_down=8,
    )
    c.paint_blob(asc_aorta, hu["blood"])
    c.paint_blob(p.heart.moved(scale=1.06), hu["fat"] + 20, where=f.above_dia)  # pericardial fat
    c.paint_blob(p.heart, lambda b: L * 0.3 + 70 + 5 * f.fine[b], where=f.above_dia)  # myocardium
    for dx, dy in ((-14, -10), (16, 8)):
        chamber = replace(p.heart.shrunk(12).moved(dx=dx, dy=dy, scale=0.65))
        c.paint_blob(chamber, hu["blood"] - 10, where=f.above_dia)
    trachea = Blob((0.0, -0.15 * p.body_b, 330.0), rx=10, ry=9, rz_up=200, rz_down=170, p_up=8, p_down=8)
    c.paint_blob(trachea, AIR_HU)


def paint_bones(p: Patient, c: Canvas, f: BodyFrame) -> None:
    """Vertebrae with discs and posterior elements, sacrum, ribs, sternum, hip bones, femora."""
    _paint_spine(p, c)
    _paint_ribs(p, c, f.Ac, f.Bc, f.A, f.B)
    _paint_pelvic_bones(p, c)


# The regions in painting order: a later one paints over an earlier one.
PAINTERS: tuple[Callable[[Patient, Canvas, BodyFrame], None], ...] = (
    paint_body_wall,
    paint_thorax,
    paint_pelvic_organs,
    paint_bowel,
    paint_colon,
    paint_upper_abdomen,
    paint_liver,
    paint_vessels_and_heart,
    paint_bones,
)


def _bone(c: Canvas, b: Blob, p: Patient, where: Callable | None = None, shell: float = 2.5) -> None:
    """Cortical shell + cancellous core: the hard edges a CNN latches onto."""
    c.paint_blob(b, p.hu["cortical"], where=where)
    c.paint_blob(b.shrunk(shell), lambda box: p.hu["cancellous"] + 25 * c.field("fine")[box], where=where)


def _paint_spine(p: Patient, c: Canvas) -> None:
    sacrum_top = p.iliac_crest_z - 20
    phase = lambda box: ((c.grid(box)[2] - 7.0) / p.vert_pitch) % 1.0  # noqa: E731
    disc_frac = 7.0 / p.vert_pitch
    zs = (sacrum_top, 400.0)
    body = Blob(
        (0.0, p.spine_y, sum(zs) / 2),
        rx=p.vert_rx,
        ry=p.vert_ry,
        rz_up=(zs[1] - zs[0]) / 2,
        rz_down=(zs[1] - zs[0]) / 2,
        p_up=20,
        p_down=20,
    )
    c.paint_blob(body, 90.0)  # discs
    _bone(c, body, p, where=lambda box: phase(box) > disc_frac)
    canal_y = p.spine_y + p.vert_ry + 9
    arch = Blob(
        (0.0, canal_y, body.center[2]),
        rx=13,
        ry=12,
        rz_up=body.rz_up,
        rz_down=body.rz_down,
        p_up=20,
        p_down=20,
    )
    post = lambda box: (phase(box) > 0.15) & (phase(box) < 0.8)  # noqa: E731
    c.paint_blob(arch, p.hu["cortical"], where=post)
    spinous = Blob(
        (0.0, canal_y + 22, body.center[2]),
        rx=5,
        ry=12,
        rz_up=body.rz_up,
        rz_down=body.rz_down,
        p_up=20,
        p_down=20,
    )
    _bone(c, spinous, p, where=post, shell=1.5)
    for side in (-1, 1):
        tp = Blob(
            (side * (p.vert_rx + 13), canal_y - 3, body.center[2]),
            rx=13,
            ry=5,
            rz_up=body.rz_up,
            rz_down=body.rz_down,
            p_up=20,
            p_down=20,
            angle=side * 0.2,
        )
        _bone(c, tp, p, where=lambda box: (phase(box) > 0.3) & (phase(box) < 0.65), shell=1.5)
    canal = replace(arch, rx=8, ry=7)
    c.paint_blob(canal, 15.0)
    sacrum = Blob(
        (0.0, p.spine_y + 10, sacrum_top), rx=48, ry=18, rz_up=1, rz_down=110, p_down=1.6, tilt=(0, -0.35)
    )
    _bone(c, sacrum, p, shell=3)


def _paint_ribs(p: Patient, c: Canvas, Ac, Bc, A, B) -> None:
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


def _paint_pelvic_bones(p: Patient, c: Canvas) -> None:
    crest, acet = p.iliac_crest_z, p.acetabulum_z
    for side in (-1, 1):
        wing = Blob(
            (side * (p.hip_x - 15), p.spine_y * 0.45, crest - 15),
            rx=55,
            ry=9,
            rz_up=15,
            rz_down=crest - acet + 5,
            p_up=2,
            p_down=3,
            tilt=(side * 0.2, 0.05),
            angle=-side * 0.75,
        )
        _bone(c, wing, p, shell=3)
        head = Blob((side * p.hip_x, -0.05 * p.body_b, acet), rx=24, ry=24, rz_up=24, rz_down=24)
        _bone(c, head, p, shell=3)
        neck = Blob(
            (side * (p.hip_x + 12), -0.05 * p.body_b, acet - 25),
            rx=16,
            ry=16,
            rz_up=20,
            rz_down=300,
            p_up=3,
            p_down=10,
            tilt=(-side * 0.12, 0.0),
        )
        _bone(c, neck, p, shell=5)
        pubis = Blob(
            (side * 22, -0.45 * p.body_b, acet - 20), rx=20, ry=10, rz_up=15, rz_down=20, angle=side * 0.4
        )
        _bone(c, pubis, p, shell=2.5)
        ischium = Blob((side * (p.hip_x - 20), 0.3 * p.body_b, acet - 35), rx=14, ry=18, rz_up=25, rz_down=25)
        _bone(c, ischium, p, shell=2.5)


# --------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------
