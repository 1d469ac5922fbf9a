"""Volumes in and out: NIfTI files, DICOM series, archive scanning.

Example:
    >>> from ctsearch.io import read_volume            # doctest: +SKIP
    >>> vol = read_volume("imagesTr/liver_0.nii.gz")   # doctest: +SKIP
    >>> vol.hu.shape, vol.hu.dtype                     # doctest: +SKIP
    ((75, 512, 512), dtype('int16'))
"""

from ctsearch.errors import CTSearchInputError
from ctsearch.io.dicom import write_dicom_series
from ctsearch.io.nifti import write_nifti
from ctsearch.io.volume import Volume

__all__ = ["CTSearchInputError", "Volume", "write_dicom_series", "write_nifti"]
