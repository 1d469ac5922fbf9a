"""Volumes in and out: NIfTI files, DICOM series, archive scanning (docs/formats.md).

Every reader returns a ``Volume`` in one canonical orientation: ``hu[k, j, i]`` int16 with
i -> patient Left, j -> Posterior, k -> Superior (slice 0 most inferior), whatever the source.

Example:
    >>> from ctsearch.io import read_volume, scan_archive          # doctest: +SKIP
    >>> vol = read_volume("imagesTr/liver_0.nii.gz")               # doctest: +SKIP
    >>> vol.hu.shape, vol.hu.dtype                                 # doctest: +SKIP
    ((75, 512, 512), dtype('int16'))
    >>> entries, errors = scan_archive("Task03_Liver")             # doctest: +SKIP
"""

from ctsearch.errors import CTSearchInputError
from ctsearch.io.dicom import read_dicom_series, write_dicom_series
from ctsearch.io.nifti import read_label, read_nifti, write_nifti
from ctsearch.io.scan import ScanEntry, detect_layout, read_volume, scan_archive
from ctsearch.io.volume import Volume

__all__ = [
    "CTSearchInputError",
    "ScanEntry",
    "Volume",
    "detect_layout",
    "read_dicom_series",
    "read_label",
    "read_nifti",
    "read_volume",
    "scan_archive",
    "write_dicom_series",
    "write_nifti",
]
