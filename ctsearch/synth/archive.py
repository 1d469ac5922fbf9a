"""A synthetic archive on disk: patients with several examinations, as NIfTI (Decathlon layout) and DICOM.

Example:
    >>> import tempfile
    >>> summary = synth_archive(tempfile.mkdtemp(), volumes=1, size=32, fmt="nifti")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ctsearch.synth.render import patient_exams

FORMATS = ("nifti", "dicom", "both")


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
    # Per slice (index order): mm above this exam's liver dome, the patient's own frame; the same
    # anatomy has the same value in every exam (ctsearch evaluate --crossexam, docs/synthetic.md).
    z_anatomical_mm: list[float] = field(default_factory=list)
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
    overwrite: bool = False,
) -> SynthSummary:
    """Write a synthetic liver CT archive.

    ``volumes`` patients are drawn from ``seed``; each gets ``exams`` examinations (so
    ``volumes * exams`` volumes in all, cases numbered patient by patient). NIfTI goes to
    ``out/nifti`` in the Medical Segmentation Decathlon layout (dataset.json, imagesTr/liver_N.nii.gz,
    labelsTr/liver_N.nii.gz); DICOM to ``out/dicom/<patient>/<study>/<series>/`` one file per slice.
    ``out/synth.json`` holds the summary and per-case ground truth. ``progress(items, total,
    description)`` may wrap the loop over patients (the CLI's progress bar). A non-empty ``out`` is
    refused unless it holds an archive of the same settings (rewritten byte for byte) or
    ``overwrite`` is given and it holds only what synth writes, which is then removed first: an
    archive is never a mix of two runs.

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
    from ctsearch import storage

    if storage.is_remote(out):
        return _synth_to_store(
            os.fspath(out).rstrip("/"),
            dict(volumes=volumes, seed=seed, size=size, fmt=fmt, exams=exams, progress=progress),
            overwrite,
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CTSearchInputError(str(out), "exists and is not a folder")
    _claim(
        out,
        {"patients": volumes, "volumes": volumes * exams, "size": size, "seed": seed, "fmt": fmt},
        overwrite,
    )
    nifti_dir = out / "nifti" if fmt in ("nifti", "both") else None
    dicom_dir = out / "dicom" if fmt in ("dicom", "both") else None
    root = np.random.SeedSequence(seed)
    cases: list[SynthCase] = []
    progress = progress or (lambda items, total, desc: items)
    for pi, child in progress(enumerate(root.spawn(volumes)), volumes, "synthesising patients"):
        rng = np.random.default_rng(child)
        for p, e, vol, label in patient_exams(rng, size, pi, exams):
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
                z_anatomical_mm=np.round(vol.z_mm() - (e.offset_lps[2] + e.breathing_dz), 2).tolist(),
            )
            if nifti_dir is not None:
                img, lab = (
                    nifti_dir / "imagesTr" / f"{name}.nii.gz",
                    nifti_dir / "labelsTr" / f"{name}.nii.gz",
                )
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


_OWN = {"nifti", "dicom", "synth.json"}  # everything synth_archive writes into ``out``


def _synth_to_store(location: str, kwargs: dict, overwrite: bool) -> SynthSummary:
    """``synth_archive`` into an object-store URI: the same checks as ``_claim`` on what the store
    holds there, then written into a staging folder and uploaded; the summary and synth.json
    name the archive's URIs."""
    from ctsearch import storage
    from ctsearch.errors import CTSearchInputError

    storage.require_bucket(location)
    found = storage.list_files(location)
    if found:
        settings = {
            "patients": kwargs["volumes"],
            "volumes": kwargs["volumes"] * kwargs["exams"],
            "size": kwargs["size"],
            "seed": kwargs["seed"],
            "fmt": kwargs["fmt"],
        }
        top = sorted({n.split("/", 1)[0] for n in found})
        try:
            old = storage.read_json(storage.join(location, TRUTH_FILE), "synth summary")
        except CTSearchInputError:
            old = None
        if old is not None and all(old.get(k) == v for k, v in settings.items()):
            pass  # the same settings write the same files again
        elif overwrite and set(top) <= _OWN:
            for n in found:
                storage.delete(storage.join(location, n))
        elif overwrite:
            others = ", ".join(n for n in top if n not in _OWN)[:200]
            raise CTSearchInputError(
                location,
                f"holds files synth did not write ({others}); --overwrite only replaces a synth archive",
            )
        else:
            what = "a synth archive of other settings" if old is not None else f"{len(top)} entries"
            raise CTSearchInputError(
                location,
                f"is not empty ({what}); choose an empty folder, or pass --overwrite to replace the archive",
            )
    with storage.staged_output(location) as stage:
        summary = synth_archive(stage, **kwargs)

        def rebase(p: str | None) -> str | None:
            return None if p is None else storage.join(location, Path(p).relative_to(stage).as_posix())

        summary.out = location
        summary.nifti_dir, summary.dicom_dir = rebase(summary.nifti_dir), rebase(summary.dicom_dir)
        for c in summary.cases:
            c.nifti_image, c.nifti_label = rebase(c.nifti_image), rebase(c.nifti_label)
            c.dicom_folder = rebase(c.dicom_folder)
        (stage / TRUTH_FILE).write_text(json.dumps(summary.to_json(), indent=2))
    return summary


def _claim(out: Path, settings: dict, overwrite: bool) -> None:
    """Make sure writing into ``out`` cannot leave a mix of two archives there."""
    import shutil

    from ctsearch.errors import CTSearchInputError

    found = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not found:
        return
    try:
        old = json.loads((out / "synth.json").read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and all(old.get(k) == v for k, v in settings.items()):
        return  # the same settings write the same files again
    if overwrite and set(found) <= _OWN:
        shutil.rmtree(out)
        return
    if overwrite:
        others = ", ".join(n for n in found if n not in _OWN)[:200]
        raise CTSearchInputError(
            out, f"holds files synth did not write ({others}); --overwrite only replaces a synth archive"
        )
    what = "a synth archive of other settings" if isinstance(old, dict) else f"{len(found)} entries"
    raise CTSearchInputError(
        out, f"is not empty ({what}); choose an empty folder, or pass --overwrite to replace the archive"
    )


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


TRUTH_FILE = "synth.json"


def anatomical_positions(paths: Iterable[str | os.PathLike]) -> dict[str, np.ndarray]:
    """Each synthetic volume's per-slice anatomical z (float64 [n], mm above its liver dome).

    ``paths`` are volumes as ``synth_archive`` wrote them (a NIfTI image or a DICOM series
    folder); the ground truth is the ``synth.json`` of the archive they are in (found among
    their parent folders). Returns ``{str(path): z}``; a path outside a synthetic archive is an
    input error.

    Example:
        >>> z = anatomical_positions(["synth/nifti/imagesTr/liver_1.nii.gz"])  # doctest: +SKIP
    """
    from ctsearch.errors import CTSearchInputError

    out, loaded = {}, {}
    for p in paths:
        path = Path(p).resolve()
        root = next((d for d in path.parents if (d / TRUTH_FILE).is_file()), None)
        if root is None:
            raise CTSearchInputError(
                p, f"not in a synthetic archive: no {TRUTH_FILE} above it holds its anatomical ground truth"
            )
        if root not in loaded:
            cases = json.loads((root / TRUTH_FILE).read_text())["cases"]
            loaded[root] = {
                key: c.get("z_anatomical_mm")
                for c in cases
                for key in (
                    f"nifti/imagesTr/{c['case']}.nii.gz",
                    f"dicom/{c['patient_id']}/study-{c['exam']}/series-1",
                )
            }
        z = loaded[root].get(path.relative_to(root).as_posix())
        if not z:
            raise CTSearchInputError(
                p,
                f"has no per-slice anatomical positions in {root / TRUTH_FILE} (written by an older ctsearch synth?)",
            )
        out[str(p)] = np.asarray(z, np.float64)
    return out
