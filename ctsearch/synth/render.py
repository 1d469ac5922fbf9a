"""Sampling a patient as one examination: the scanner grid, painting slab by slab, noise, the Volume.

Example:
    >>> vol, label = synth_volume(0, size=64)
    >>> vol.hu.dtype, label.dtype, vol.hu.shape[1:]
    (dtype('int16'), dtype('uint8'), (64, 64))
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ctsearch.io.volume import Volume
from ctsearch.synth.anatomy import (
    NOMINAL_MATRIX,
    Exam,
    Patient,
    anatomy_for_exam,
    sample_exam,
    sample_patient,
)
from ctsearch.synth.canvas import Canvas
from ctsearch.synth.fields import Lattice, texture_lattices
from ctsearch.synth.paint import paint_patient

PAD_HU = -2048.0  # value some scanners store outside the circular reconstruction field


def max_slices(size: int) -> int:
    """The slice-count cap for a ``size`` px matrix: ``size`` clipped to [32, 256].

    A scan covers 250-450 mm; when ``extent / thickness`` would exceed the cap, the slices get
    thicker (``extent / cap``) so small test archives stay small and 512 px volumes modest.
    """
    return int(np.clip(size, 32, 256))


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


def render(
    p: Patient, e: Exam, size: int = 512, lattices: dict[str, Lattice] | None = None
) -> tuple[Volume, np.ndarray]:
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
    anat = anatomy_for_exam(p, e)
    lattices = lattices or texture_lattices(p, size)
    slab = max(8, 2**20 // (size * size))  # slices painted at once: bounded memory, few Python loops
    noise_rng = np.random.default_rng([p.field_seed, e.index, size])
    hu = np.empty((n, size, size), np.int16)
    label = np.empty((n, size, size), np.uint8)
    outside_fov = (lps_x[None, :] ** 2 + lps_y[:, None] ** 2) > (size * spacing / 2) ** 2
    for k0 in range(0, n, slab):
        c = Canvas(x.astype(np.float64), y.astype(np.float64), pz[k0 : k0 + slab], lattices)
        paint_patient(anat, e, c)
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
    out = list(patient_exams(_generator(rng), size, index, exams))
    return out[0][2:] if exams == 1 else [o[2:] for o in out]


def patient_exams(rng: np.random.Generator, size: int, index: int, exams: int) -> Iterator[tuple]:
    """Yield (patient, exam, volume, label) for each examination of one new patient."""
    p = sample_patient(rng, index)
    lattices = texture_lattices(p, size)
    prev = None
    for ei in range(exams):
        e = sample_exam(rng, p, ei, prev)
        vol, label = render(p, e, size, lattices)
        yield p, e, vol, label
        prev = e
