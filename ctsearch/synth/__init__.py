"""Synthetic abdominal CT phantoms and archives, hard enough to test retrieval science.

A phantom patient is a set of smooth 3-D shapes in patient millimetres (X toward the patient's
left, Y toward posterior, Z toward superior, Z = 0 at the top of the liver dome). Each
examination samples the patient on a scanner grid (spacing, slice thickness, scan range, table
offset), paints the organs in HU and adds noise. Everything is vectorised numpy over slabs of
slices and deterministic given the seed. See docs/synthetic.md for the anatomy, the per-patient
variation, the slice-count rule and the calibration that keeps retrieval from being trivial.

One module per step: ``anatomy`` (shapes, patients, examinations), ``fields`` (texture
lattices), ``canvas`` (a slab being painted), ``paint`` (one painter per body region),
``render`` (an examination -> Volume + label) and ``archive`` (NIfTI + DICOM on disk).

Example:
    >>> vol, label = synth_volume(0, size=64)
    >>> vol.hu.dtype, label.dtype, vol.hu.shape[1:]
    (dtype('int16'), dtype('uint8'), (64, 64))
    >>> sorted(int(v) for v in set(label.ravel().tolist()) - {0}) in ([1], [1, 2])
    True
"""

from ctsearch.synth.anatomy import (
    BACKGROUND,
    LIVER,
    NOMINAL_MATRIX,
    THICKNESSES_MM,
    TUMOUR,
    Blob,
    Exam,
    Patient,
    Tumour,
    anatomy_for_exam,
    sample_exam,
    sample_patient,
)
from ctsearch.synth.archive import FORMATS, SynthCase, SynthSummary, anatomical_positions, synth_archive
from ctsearch.synth.canvas import AIR_HU
from ctsearch.synth.render import PAD_HU, exam_geometry, max_slices, render, synth_volume

__all__ = [
    "AIR_HU",
    "BACKGROUND",
    "FORMATS",
    "LIVER",
    "NOMINAL_MATRIX",
    "PAD_HU",
    "THICKNESSES_MM",
    "TUMOUR",
    "Blob",
    "Exam",
    "Patient",
    "SynthCase",
    "SynthSummary",
    "Tumour",
    "anatomical_positions",
    "anatomy_for_exam",
    "exam_geometry",
    "max_slices",
    "render",
    "sample_exam",
    "sample_patient",
    "synth_archive",
    "synth_volume",
]
