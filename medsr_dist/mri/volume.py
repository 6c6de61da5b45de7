"""Volumes in and out: NIfTI (``.nii``, ``.nii.gz``) through nibabel and DICOM series through pydicom.

A :class:`Volume` keeps the voxels as float32 *physical* values (NIfTI ``scl_slope``/``scl_inter`` or DICOM
RescaleSlope/Intercept applied) beside everything needed to write a derived volume that a viewer overlays on the
source: the affine, the stored dtype and its scaling, and the source header (NIfTI) or slice datasets (DICOM).

Axis order: ``data[i, j, k]`` follows the NIfTI voxel grid; ``affine`` maps ``(i, j, k, 1)`` to RAS+ mm. A DICOM
series is read as ``i`` = column, ``j`` = row, ``k`` = slice (sorted along the slice normal), and its LPS patient
coordinates are flipped to RAS+ (as nibabel and dcm2niix do).

Resampling along one axis keeps the field of view: a voxel of the coarse grid covers exactly ``k`` voxels of the
fine grid, so its centre is the centroid of theirs (for odd ``k`` it *is* the centre of the middle one). Both
directions use :func:`resampled_affine`, so downsampling a reconstruction gives back the input's affine exactly.
"""
from __future__ import annotations

import gzip
import io
import json
import warnings
import zlib
from collections.abc import Iterable, Sequence as SequenceABC
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from medsr_dist.io.dicom import looks_like_dicom, read_image_dataset
from medsr_dist.io.medical_image import ImageDecodeError

#: Largest |R^T R - I| entry accepted for the direction cosines of an affine or a DICOM orientation.
ORTHONORMAL_TOLERANCE = 1e-3
#: The low-resolution axis must be coarser than the next-coarsest axis by at least this factor.
ANISOTROPY_MIN_RATIO = 1.2
AXIS_NAMES = ("i", "j", "k")


class VolumeError(ValueError):
    """A volume cannot be used as given; the message names the source and what is wrong (never patient data)."""


@dataclass
class Volume:
    """A 3-D scalar volume with its geometry.

    Attributes:
        data: (I, J, K) float32 physical values (scaling applied), C-contiguous not guaranteed.
        affine: (4, 4) float64, voxel index -> RAS+ mm.
        source: the file or series name (for error messages and provenance).
        stored_dtype: dtype of the stored values (``int16`` stays ``int16`` when written).
        scl_slope, scl_inter: stored value -> physical value ``stored * slope + inter`` (1, 0 when unscaled).
        format: ``"nifti"`` or ``"dicom"``.
        nifti_header: the source NIfTI header (template for writing), or None.
        dicom_slices: the source DICOM datasets in slice order (pixel data removed), or None.
        facts: small JSON-able header facts (qform/sform codes, series number, orientation codes, ...).
    """

    data: np.ndarray
    affine: np.ndarray
    source: str = ""
    stored_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    scl_slope: float = 1.0
    scl_inter: float = 0.0
    format: str = "nifti"
    nifti_header: Any = None
    dicom_slices: list | None = None
    facts: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        self.stored_dtype = np.dtype(self.stored_dtype)
        if self.data.ndim != 3:
            raise VolumeError(f"{self.source or 'volume'}: expected a 3-D volume, got shape {self.data.shape}")
        if self.affine.shape != (4, 4):
            raise VolumeError(f"{self.source or 'volume'}: affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """(3,) voxel sizes in mm along i, j, k (column norms of the affine)."""
        return voxel_sizes(self.affine)

    def with_data(self, data: np.ndarray, affine: np.ndarray | None = None) -> Volume:
        """A copy carrying new voxels (and geometry); the source's dtype, scaling and headers come along."""
        return replace(self, data=data, affine=self.affine if affine is None else affine, facts=dict(self.facts))


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """(3,) voxel sizes in mm: the norms of the affine's first three columns."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def check_orthonormal(affine: np.ndarray, source: str) -> None:
    """Raise :class:`VolumeError` unless the affine's direction cosines are orthonormal (no shear, no zero axis)."""
    sizes = voxel_sizes(affine)
    if np.any(sizes <= 0) or not np.all(np.isfinite(affine)):
        raise VolumeError(f"{source}: the affine has a zero-length or non-finite axis (voxel sizes {sizes.tolist()})")
    directions = np.asarray(affine)[:3, :3] / sizes
    err = np.abs(directions.T @ directions - np.eye(3)).max()
    if err > ORTHONORMAL_TOLERANCE:
        raise VolumeError(f"{source}: the orientation matrix is not orthonormal (sheared or skewed grid; "
                          f"max |R^T R - I| = {err:.3g} > {ORTHONORMAL_TOLERANCE}); resample it to an orthogonal grid first")


def low_resolution_axis(spacing: SequenceABC[float], source: str = "volume",
                        min_ratio: float = ANISOTROPY_MIN_RATIO) -> int:
    """The voxel axis (0, 1 or 2) with the largest spacing: the through-plane axis of a thick-slice volume.

    Raises:
        VolumeError: fewer or more than 3 axes, or no single axis is coarser than both others by ``min_ratio``
            (an isotropic volume, or two equally coarse axes): the message gives the voxel sizes.
    """
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3:
        raise VolumeError(f"{source}: expected 3 voxel sizes, got {len(spacing)} ({spacing}); 4-D volumes are not supported")
    order = np.argsort(spacing)[::-1]
    coarse, second = spacing[order[0]], spacing[order[1]]
    if coarse < min_ratio * second:
        raise VolumeError(f"{source}: no single low-resolution axis: voxel sizes {[round(s, 4) for s in spacing]} mm "
                          f"(the coarsest must exceed the others by x{min_ratio}); it is isotropic or anisotropic along two axes")
    return int(order[0])


def resampled_affine(affine: np.ndarray, axis: int, factor: float) -> np.ndarray:
    """The affine of a grid whose spacing along ``axis`` is ``factor`` times the old one, same field of view.

    New voxel ``n`` along ``axis`` sits at old continuous index ``n * factor + (factor - 1) / 2``: with
    ``factor = k`` (coarser) it is the centre of old voxels ``n*k .. n*k+k-1``; with ``factor = 1/k`` (finer) old
    voxel ``m`` is the centroid of new voxels ``m*k .. m*k+k-1``.
    """
    step = np.eye(4)
    step[axis, axis] = factor
    step[axis, 3] = (factor - 1.0) / 2.0
    return np.asarray(affine, dtype=np.float64) @ step


def axis_codes(affine: np.ndarray) -> tuple[str, str, str]:
    """nibabel's orientation codes of the voxel axes, e.g. ``('R', 'A', 'S')``."""
    import nibabel as nib

    return tuple(str(c) for c in nib.aff2axcodes(affine))  # type: ignore[return-value]


def plane_normal_axes(affine: np.ndarray) -> dict[str, int]:
    """Which voxel axis is normal to the axial, coronal and sagittal planes (``{"axial": 2, ...}``).

    Axial planes are normal to the S/I axis, coronal to A/P, sagittal to L/R (the closest anatomical direction
    of each voxel axis, as :func:`axis_codes`).
    """
    codes = axis_codes(affine)
    which = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "L": "sagittal", "R": "sagittal"}
    return {which[c]: axis for axis, c in enumerate(codes)}


# ------------------------------------------------------------------------------------------------ NIfTI

def _is_gzip(data: bytes) -> bool:
    return data[:2] == b"\x1f\x8b"


#: Bytes a .nii.gz may inflate to past what its header declares (vox_offset + voxels x bitpix / 8): honest files
#: hold exactly that; a stream that goes on is a decompression bomb, stopped here instead of inflated in full.
NIFTI_INFLATE_SLACK = 1 << 20


def _nifti_declared_bytes(head: bytes) -> int | None:
    """vox_offset + voxels x bitpix / 8 from a NIfTI-1/-2 header's first bytes; ``None``: not a NIfTI header."""
    for order in "<>":
        if len(head) < 348:
            return None
        size = int(np.frombuffer(head[:4], order + "i4")[0])
        if size == 348:
            dim = np.frombuffer(head[40:56], order + "i2").astype(np.int64)
            bitpix = int(np.frombuffer(head[72:74], order + "i2")[0])
            offset = int(max(float(np.frombuffer(head[108:112], order + "f4")[0]), 352.0))
        elif size == 540 and len(head) >= 544:
            dim = np.frombuffer(head[16:80], order + "i8")
            bitpix = int(np.frombuffer(head[14:16], order + "i2")[0])
            offset = int(max(int(np.frombuffer(head[168:176], order + "i8")[0]), 544))
        else:
            continue
        ndim = int(dim[0])
        if not 1 <= ndim <= 7 or np.any(dim[1:ndim + 1] < 1) or bitpix < 1:
            return None
        return offset + int(np.prod([int(n) for n in dim[1:ndim + 1]], dtype=object)) * bitpix // 8
    return None


def _gunzip_bounded(data: bytes, source: str) -> bytes:
    """A .nii.gz inflated to at most the size its header declares (+ :data:`NIFTI_INFLATE_SLACK`)."""
    try:
        head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, 1024)
        declared = _nifti_declared_bytes(head)
        bound = (declared if declared is not None else len(head)) + NIFTI_INFLATE_SLACK
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        raw = inflater.decompress(data, bound + 1)
    except zlib.error as exc:
        raise VolumeError(f"{source}: truncated or corrupt gzip stream ({exc})") from None
    if len(raw) > bound:
        raise VolumeError(f"{source}: the gzip stream inflates past the {bound:,} bytes its NIfTI header declares "
                          "(a decompression bomb?); not read further")
    if not inflater.eof:
        raise VolumeError(f"{source}: truncated or corrupt gzip stream (it ends before its end of stream)")
    return raw


def read_nifti(data: bytes, source: str) -> Volume:
    """Decode a NIfTI-1/NIfTI-2 file (``.nii`` or gzip-compressed ``.nii.gz``) into a :class:`Volume`.

    Raises:
        VolumeError: not a NIfTI file, not 3-D (a 4-D series with more than one volume is refused, a trailing axis
            of length 1 is dropped), non-orthonormal orientation, or no finite voxels.
    """
    import nibabel as nib

    raw = _gunzip_bounded(data, source) if _is_gzip(data) else bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sizeof_hdr = int(np.frombuffer(raw[:4], "<i4")[0]) if len(raw) >= 4 else 0
            cls = nib.Nifti2Image if sizeof_hdr in (540, int.from_bytes((540).to_bytes(4, "little"), "big")) else nib.Nifti1Image
            img = cls.from_bytes(raw)
            shape = img.shape
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad file
        raise VolumeError(f"{source}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise VolumeError(f"{source}: expected a 3-D volume, got shape {tuple(img.shape)}"
                          + (" (a 4-D series: split it into 3-D volumes first)" if len(shape) == 4 else ""))
    affine = np.asarray(img.affine, dtype=np.float64)
    check_orthonormal(affine, source)
    try:
        values = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except Exception as exc:  # noqa: BLE001 - a short file fails here
        raise VolumeError(f"{source}: cannot read the voxel data ({type(exc).__name__}: {exc})") from None
    if not np.isfinite(values).any():
        raise VolumeError(f"{source}: no finite voxel values")
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    header = img.header.copy()
    facts = {"qform_code": int(header["qform_code"]), "sform_code": int(header["sform_code"]),
             "axis_codes": "".join(axis_codes(affine)), "nifti_version": 2 if cls is nib.Nifti2Image else 1}
    return Volume(data=values, affine=affine, source=source, stored_dtype=img.get_data_dtype(),
                  scl_slope=float(slope), scl_inter=float(inter), format="nifti", nifti_header=header, facts=facts)


def _quantise(values: np.ndarray, dtype: np.dtype, slope: float, inter: float,
              limits: tuple[float, float] | None = None) -> np.ndarray:
    """Physical float values -> stored values of ``dtype``: ``rint((v - inter) / slope)`` clipped to ``limits``
    (default: the dtype's range) for integers (NaN -> 0), a plain cast for floats. Integer conversion runs slab by
    slab along the first axis, so its float64 temporaries stay a few MB whatever the volume's size."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return values.astype(dtype)
    info = np.iinfo(dtype)
    lo, hi = limits if limits is not None else (info.min, info.max)
    out = np.empty(values.shape, dtype)
    step = max(1, (1 << 20) // max(1, int(np.prod(values.shape[1:]))))
    for a in range(0, values.shape[0], step):
        stored = np.rint((values[a:a + step].astype(np.float64) - inter) / slope)
        out[a:a + step] = np.clip(np.nan_to_num(stored, nan=0.0), lo, hi)
    return out


def write_nifti(volume: Volume, *, gz: bool = True, description: str = "", provenance: dict | None = None) -> bytes:
    """Encode ``volume`` as a NIfTI file (gzip-compressed when ``gz``) in its source's stored dtype and scaling.

    The header is the source's (when there is one) with the new shape, the new affine as both sform and qform
    (their codes kept; 1 = scanner when the source had none), pixdim = the new voxel sizes, and the source's
    scl_slope/scl_inter: integer dtypes store ``rint((value - inter) / slope)`` clipped to the dtype's range.
    ``provenance`` (JSON-able) is added as a NIfTI ``comment`` header extension (code 6), beside the source's own.
    """
    import nibabel as nib
    from nibabel.volumeutils import array_to_file

    dtype = volume.stored_dtype
    slope, inter = (volume.scl_slope, volume.scl_inter) if np.issubdtype(dtype, np.integer) else (1.0, 0.0)
    if not np.isfinite(slope) or slope == 0:
        slope, inter = 1.0, 0.0
    src = volume.nifti_header  # a Nifti1Header or Nifti2Header (a subclass of it): the source's version is kept
    hdr = src.copy() if isinstance(src, nib.Nifti1Header) else nib.Nifti1Header()
    hdr["magic"] = hdr.single_magic  # one .nii file even when the source was a .hdr/.img pair
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(volume.shape)
    qcode = int(hdr["qform_code"]) or 1
    scode = int(hdr["sform_code"]) or qcode
    hdr.set_qform(volume.affine, code=qcode)
    hdr.set_sform(volume.affine, code=scode)
    hdr.set_zooms(tuple(float(z) for z in volume.spacing))
    hdr.set_slope_inter(slope, inter)
    hdr.set_xyzt_units("mm", "sec")
    if description:
        hdr["descrip"] = description.encode("ascii", "replace")[:79]
    if provenance is not None:
        hdr.extensions.append(nib.nifti1.Nifti1Extension("comment", json.dumps(provenance, sort_keys=True).encode()))
    stored = _quantise(volume.data, dtype, slope, inter)
    # single-file layout: data right after the header and its extensions (16-byte aligned as nibabel writes it)
    hdr.set_data_offset(int(-(-(hdr.single_vox_offset + sum(e.get_sizeondisk() for e in hdr.extensions)) // 16) * 16))
    buf = io.BytesIO()
    hdr.write_to(buf)
    offset = hdr.get_data_offset()
    if buf.tell() < offset:
        buf.write(b"\x00" * (offset - buf.tell()))
    array_to_file(stored, buf, dtype, offset=offset, order="F")  # stored values already quantised: no rescale
    raw = buf.getvalue()
    return gzip.compress(raw, compresslevel=6, mtime=0) if gz else raw


# ------------------------------------------------------------------------------------------------ DICOM series

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _read_dataset(data: bytes, name: str):
    """A slice's dataset through the image reader's bounds (:func:`~medsr_dist.io.dicom.read_image_dataset`:
    bounded Deflate inflation, sequence items counted, compressed frames' headers checked before decoding)."""
    if not looks_like_dicom(data):
        raise VolumeError(f"{name}: not a DICOM file")
    try:
        return read_image_dataset(data, name)
    except ImageDecodeError as exc:
        raise VolumeError(f"{name}: {exc.reason}") from None


def _floats(ds, keyword: str, n: int, name: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.array([])
    if out.size != n or not np.all(np.isfinite(out)):
        raise VolumeError(f"{name}: {keyword} missing or malformed (need {n} numbers)")
    return out


def read_dicom_series(files: Iterable[tuple[str, bytes]], series: str = "") -> Volume:
    """Single-frame DICOM slices of one series -> a :class:`Volume` (i = column, j = row, k = slice, RAS+).

    Slices are sorted by ImagePositionPatient projected on the normal of ImageOrientationPatient (row x column
    cosines). Each slice's RescaleSlope/Intercept is applied.

    Args:
        files: ``(name, bytes)`` of every file of the series, in any order.
        series: a name for the series in messages (its folder, say); defaults to the first file's name.

    Raises:
        VolumeError naming the series and what is wrong: fewer than 2 slices, files of several series, a
        multi-frame object, missing geometry, orientations that differ between slices or are not orthonormal,
        different matrix sizes or pixel spacings, duplicate positions, positions not stacked along the normal,
        missing slices (a gap of about a whole multiple of the spacing) or otherwise inconsistent spacing.
        Messages carry file names, positions and UIDs, never patient identifiers.
    """
    files = list(files)
    series = series or (files[0][0] if files else "DICOM series")
    if len(files) < 2:
        raise VolumeError(f"series {series}: {len(files)} file(s); a volume needs at least 2 slices")
    slices = []
    for name, data in files:
        ds = _read_dataset(data, f"series {series}: {name}")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeError(f"series {series}: {name} is a multi-frame object ({ds.NumberOfFrames} frames); "
                              "only series of single-frame slices are read")
        if "PixelData" not in ds:
            raise VolumeError(f"series {series}: {name} has no pixel data")
        slices.append((name, ds))
    uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(uids) > 1:
        raise VolumeError(f"series {series}: files of {len(uids)} different series (SeriesInstanceUID {sorted(uids)})")
    iops = [_floats(ds, "ImageOrientationPatient", 6, f"series {series}: {name}") for name, ds in slices]
    iop = iops[0]
    for (name, _), other in zip(slices, iops):
        if np.abs(other - iop).max() > 1e-4:
            raise VolumeError(f"series {series}: mixed orientations: {name} has ImageOrientationPatient "
                              f"{np.round(other, 5).tolist()}, {slices[0][0]} has {np.round(iop, 5).tolist()}")
    row_cos, col_cos = iop[:3], iop[3:]
    cosines = np.stack([row_cos, col_cos])
    if np.abs(cosines @ cosines.T - np.eye(2)).max() > ORTHONORMAL_TOLERANCE:
        raise VolumeError(f"series {series}: ImageOrientationPatient {np.round(iop, 5).tolist()} is not two "
                          "orthonormal direction cosines")
    normal = np.cross(row_cos, col_cos)
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in slices}
    if len(shapes) > 1:
        raise VolumeError(f"series {series}: slices of different matrix sizes {sorted(shapes)}")
    spacings = {tuple(np.round(_floats(ds, "PixelSpacing", 2, f"series {series}: {n}"), 6)) for n, ds in slices}
    if len(spacings) > 1:
        raise VolumeError(f"series {series}: slices with different PixelSpacing {sorted(spacings)}")
    positions = np.stack([_floats(ds, "ImagePositionPatient", 3, f"series {series}: {n}") for n, ds in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    positions, along = positions[order], along[order]
    gaps = np.diff(along)
    names = [n for n, _ in slices]
    dup = np.flatnonzero(np.abs(gaps) < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise VolumeError(f"series {series}: duplicate slice position {along[i]:.3f} mm along the normal "
                          f"({names[i]} and {names[i + 1]})")
    offsets = positions[1:] - positions[:-1]
    in_plane = np.abs(offsets - np.outer(gaps, normal)).max()
    if in_plane > max(1e-3, 0.01 * float(np.median(gaps))):
        raise VolumeError(f"series {series}: slices are not stacked along their normal (in-plane shift up to "
                          f"{in_plane:.3f} mm between neighbours: a tilted or sheared acquisition)")
    step = float(np.min(gaps))
    tolerance = max(0.01 * step, 1e-3)
    bad = np.flatnonzero(np.abs(gaps - step) > tolerance)
    if bad.size:
        i = int(bad[0])
        ratio = gaps[i] / step
        if abs(ratio - round(ratio)) * step <= tolerance and round(ratio) >= 2:
            raise VolumeError(f"series {series}: {int(round(ratio)) - 1} missing slice(s) between {names[i]} and "
                              f"{names[i + 1]} (positions {along[i]:.3f} and {along[i + 1]:.3f} mm along the normal, "
                              f"spacing {step:.3f} mm); {bad.size} gap(s) in all")
        raise VolumeError(f"series {series}: inconsistent slice spacing: gaps from {gaps.min():.3f} to "
                          f"{gaps.max():.3f} mm along the normal (first irregular gap between {names[i]} and {names[i + 1]})")

    planes, stored_dtype, slope0, inter0 = [], None, None, None
    for name, ds in slices:
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
            raise VolumeError(f"series {series}: {name}: cannot decode pixel data ({type(exc).__name__}: {exc})") from None
        if pixels.ndim != 2:
            raise VolumeError(f"series {series}: {name}: expected a single-channel slice, got pixel shape {pixels.shape}")
        slope, inter = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        if stored_dtype is None:
            stored_dtype, slope0, inter0 = pixels.dtype, slope, inter
        planes.append(pixels.astype(np.float32) * np.float32(slope) + np.float32(inter))
    data = np.stack(planes, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) -> (i = column, j = row, k)
    row_spacing, col_spacing = (float(v) for v in slices[0][1].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = row_cos * col_spacing  # along a row = increasing column index i
    lps[:3, 1] = col_cos * row_spacing  # down a column = increasing row index j
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[0]
    affine = _LPS_TO_RAS @ lps
    headers = []
    for _, ds in slices:
        ds = ds.copy()
        del ds.PixelData
        headers.append(ds)
    first = slices[0][1]
    facts = {"series_instance_uid": str(first.get("SeriesInstanceUID", "")), "series_number": first.get("SeriesNumber"),
             "modality": str(first.get("Modality", "")), "slice_thickness": float(first.get("SliceThickness", step) or step),
             "axis_codes": "".join(axis_codes(affine))}
    return Volume(data=data, affine=affine, source=f"series {series}", stored_dtype=stored_dtype, scl_slope=slope0,
                  scl_inter=inter0, format="dicom", dicom_slices=headers, facts=facts)


def write_dicom_series(volume: Volume, *, derivation: str, series_description_suffix: str = " [SR iso]",
                       uid_entropy: str = "") -> list[tuple[str, bytes]]:
    """A derived DICOM series of single-frame slices (along ``k``) from a volume read by :func:`read_dicom_series`.

    Every output slice starts from the source slice nearest to it (its Patient/Study/equipment modules are
    kept) and gets: ImagePositionPatient of its own, ImageOrientationPatient / PixelSpacing from the volume's
    affine, SliceThickness = SpacingBetweenSlices = the new k spacing, SliceLocation along the normal, a new
    Series (SeriesInstanceUID from the source's and ``uid_entropy``) and SOPInstanceUIDs, InstanceNumber 1..K,
    ImageType DERIVED\\SECONDARY, DerivationDescription = ``derivation``, a SourceImageSequence reference.
    Stored values use the first source slice's dtype and RescaleSlope/Intercept (clipped to BitsStored).

    Returns:
        ``(file name, Part-10 bytes)`` per slice, ``slice_0001.dcm`` ...

    Raises:
        VolumeError: the volume did not come from a DICOM series (no slice headers to derive from).
    """
    if not volume.dicom_slices:
        raise VolumeError(f"{volume.source}: a derived DICOM series needs a DICOM source series (this volume is {volume.format})")
    check_orthonormal(volume.affine, volume.source)
    templates = volume.dicom_slices
    lps = _LPS_TO_RAS @ volume.affine
    sizes = voxel_sizes(lps)
    row_cos, col_cos = lps[:3, 0] / sizes[0], lps[:3, 1] / sizes[1]
    normal = np.cross(row_cos, col_cos)
    # source slice centres along the normal, to pick each output slice's template
    src_pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in templates]) @ normal
    first = templates[0]
    src_series = str(first.get("SeriesInstanceUID", ""))
    series_uid = generate_uid(entropy_srcs=[src_series, "medsr-dist mri", derivation, uid_entropy])
    bits = int(first.get("BitsStored", 16))
    signed = int(first.get("PixelRepresentation", 0)) == 1
    allocated = int(first.get("BitsAllocated", 16))
    dtype = np.dtype(("<i" if signed else "<u") + str(allocated // 8))
    slope, inter = volume.scl_slope or 1.0, volume.scl_inter
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    stored_all = _quantise(volume.data, dtype, slope, inter, (lo, hi))
    thickness = format_number_as_ds(float(sizes[2]))
    out = []
    for k in range(volume.shape[2]):
        position = (lps @ np.array([0.0, 0.0, k, 1.0]))[:3]
        template = templates[int(np.argmin(np.abs(src_pos - position @ normal)))]
        ds = template.copy()
        sop_uid = generate_uid(entropy_srcs=[series_uid, str(k)])
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        ds.ImageType = ["DERIVED", "SECONDARY"] + [str(v) for v in list(template.get("ImageType", []))[2:]]
        ds.DerivationDescription = derivation[:1024]
        base = str(template.get("SeriesDescription", "") or "").strip()
        ds.SeriesDescription = (base[: 64 - len(series_description_suffix)] + series_description_suffix).strip()
        ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in position]
        ds.ImageOrientationPatient = [format_number_as_ds(float(v)) for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [format_number_as_ds(float(sizes[1])), format_number_as_ds(float(sizes[0]))]
        ds.SliceThickness = thickness
        ds.SpacingBetweenSlices = thickness
        ds.SliceLocation = format_number_as_ds(float(position @ normal))
        if "SOPInstanceUID" in template and "SOPClassUID" in template:
            ref = Dataset()
            ref.ReferencedSOPClassUID = template.SOPClassUID
            ref.ReferencedSOPInstanceUID = template.SOPInstanceUID
            purpose = Dataset()
            purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
            purpose.CodeMeaning = "Source image for image processing operation"
            ref.PurposeOfReferenceCodeSequence = Sequence([purpose])
            ds.SourceImageSequence = Sequence([ref])
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
            if keyword in ds:
                delattr(ds, keyword)  # stale for the new pixels
        plane = stored_all[:, :, k].T  # (i, j) -> (rows = j, columns = i)
        ds.Rows, ds.Columns = int(plane.shape[0]), int(plane.shape[1])
        if "RescaleSlope" in template or "RescaleIntercept" in template or (slope, inter) != (1.0, 0.0):
            ds.RescaleSlope = format_number_as_ds(float(slope))  # the MR IOD has no Modality LUT: only when needed
            ds.RescaleIntercept = format_number_as_ds(float(inter))
        ds.PixelData = np.ascontiguousarray(plane).tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = template.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.preamble = b"\x00" * 128
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        out.append((f"slice_{k + 1:04d}.dcm", buf.getvalue()))
    return out


# ------------------------------------------------------------------------------------------------ dispatch

def read_volume(data: bytes, source: str) -> Volume:
    """A NIfTI file by its bytes (``.nii``/``.nii.gz``); DICOM series go through :func:`read_dicom_series`."""
    if source.endswith((".nii", ".nii.gz")) or _is_gzip(data) or data[344:348] in (b"n+1\x00", b"ni1\x00"):
        return read_nifti(data, source)
    raise VolumeError(f"{source}: not a NIfTI volume (.nii/.nii.gz); DICOM series are read per folder")
