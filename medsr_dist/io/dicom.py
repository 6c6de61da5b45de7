# Long module: the whole DICOM codec (read, derive, sample builders) shares one set of tag rules,
# the pydicom quieting wrapper and the code items; split, those rules would be imported back and forth.
"""DICOM side of medsr-dist image I/O: read an image object, write a derived SR object, build samples.

Read: any transfer syntax pydicom's pixel handlers and the pylibjpeg plugins decode (Implicit/Explicit VR Little
Endian, Explicit VR Big Endian, Deflate, RLE Lossless, JPEG Baseline/Extended/Lossless, JPEG-LS, JPEG 2000),
single- and multi-frame, unsigned and signed (PixelRepresentation=1), MONOCHROME1/2, RGB, YBR_* and PALETTE
COLOR (the last two converted to RGB); Part 10 files, also with a non-zero preamble (dual-personality
DICOM/TIFF), and bare datasets without preamble or file meta. Objects without an image (SR, waveforms, RT
plans, presentation states, ...) raise :class:`~medsr_dist.io.medical_image.NotAnImageObject`.

The model sees *stored* values normalised by ``2**BitsStored - 1`` (display-oriented, MONOCHROME1 inverted,
signed values offset by ``2**(BitsStored-1)``); the modality LUT (Rescale Slope/Intercept) and the VOI window
travel unchanged in the header, so a derived object maps its stored values to the same physical units and opens
with the same window as its source. Derived objects are written Explicit VR Little Endian, or RLE Lossless /
JPEG 2000 Lossless on request — never lossy.

Most callers go through :func:`medsr_dist.io.image.decode_image` / :func:`~medsr_dist.io.image.encode_image`;
this module holds the DICOM specifics and the dataset builders used for sample data and tests
(:func:`build_radiograph_dataset`, :func:`dataset_to_bytes`).
"""

from __future__ import annotations

import functools
import io
import logging
import struct
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    RLELossless,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)
from pydicom.encaps import generate_fragmented_frames
from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes, RLETransferSyntaxes
from pydicom.valuerep import format_number_as_ds

from medsr_dist.io.codestream import CodestreamError, frame_header, rle_segment_count
from medsr_dist.io.medical_image import ImageDecodeError, ImageMeta, ImageProbe, MedicalImage, NotAnImageObject

__all__ = [
    "read_image_dataset",
    "PROVENANCE_MODEL",
    "PROVENANCE_MODEL_SHA256",
    "PROVENANCE_SCALE",
    "PROVENANCE_NOTE",
    "looks_like_dicom",
    "probe_dicom",
    "decode_dicom",
    "encode_dicom",
    "build_radiograph_dataset",
    "dataset_to_bytes",
]

# Provenance keys that the derived DICOM object turns into DICOM attributes (the rest is ignored there).
PROVENANCE_MODEL = "medsr:model"
PROVENANCE_MODEL_SHA256 = "medsr:model_sha256"
PROVENANCE_SCALE = "medsr:scale"
PROVENANCE_NOTE = "medsr:note"

_DERIVED_SUFFIX_TAG = "SR"
# Elements whose value describes the *old* pixel matrix and would be wrong after resampling.
_STALE_PIXEL_KEYWORDS = (
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "PixelDataProviderURL",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "DataSetTrailingPadding",
    "PlanarConfiguration",
)
_SPACING_KEYWORDS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_COMPRESSION_SYNTAX = {"rle": RLELossless, "jpeg2000-lossless": JPEG2000Lossless}
# Explicit VR value representations, to tell a bare explicit-VR dataset from arbitrary bytes.
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


class _NoPydicomWarningsFilter(logging.Filter):
    """pydicom logs (as well as warns) malformed element values and quotes them — a PatientID in a UI element, a
    name, a date: its records below ERROR never reach a log handler from a process that imported this module."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


logging.getLogger("pydicom").addFilter(_NoPydicomWarningsFilter())


def _quiet(function):
    """Run ``function`` with pydicom's value validation off (so no value-quoting warning is even made; the
    pixels and the header are taken as they are) and its warnings silenced."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        settings = pydicom.config.settings
        saved = settings.reading_validation_mode, settings.writing_validation_mode
        settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return function(*args, **kwargs)
        finally:
            settings.reading_validation_mode, settings.writing_validation_mode = saved

    return wrapper


def looks_like_dicom(data: bytes | bytearray | memoryview) -> bool:
    """True when ``data`` is a DICOM Part 10 file (``DICM`` at offset 128) or plausibly a bare dataset.

    A bare (preamble-less) dataset is recognised by its first element: a tag in group 0x0002 or 0x0008 (little or
    big endian), followed either by a valid explicit VR or by an implicit-VR length that fits in the data — how
    such datasets start in practice. :func:`decode_dicom` / :func:`probe_dicom` then have the final word.
    """
    view = memoryview(data)
    if len(view) >= 132 and bytes(view[128:132]) == b"DICM":
        return True
    if len(view) < 12:
        return False
    head = bytes(view[:12])
    for order in ("<", ">"):
        group, element = struct.unpack(order + "HH", head[:4])
        if group not in (0x0002, 0x0008) or element > 0x1FFF:
            continue
        if head[4:6] in _VRS:
            return True
        if order == "<" and struct.unpack("<I", head[4:8])[0] <= len(view) - 8:
            return True  # implicit VR is always little endian
    return False


#: Deflated Explicit VR Little Endian bodies are inflated to at most this many bytes by default (callers pass their
#: own bound, e.g. the nightly job its ``enhance.max_input_bytes``: an inflated body is no bigger than an
#: uncompressed file that would be accepted) ...
MAX_INFLATED_BYTES = 512 * 1024 * 1024
#: ... and to at most this many times the deflated size (plus 1 MiB): honest image data deflates far less
#: (2-20:1), a deflate bomb ~1000:1, so a 256 KiB bomb is stopped at ~51 MiB instead of costing 256 MiB+.
MAX_INFLATE_RATIO = 200
#: Sequence items a dataset may hold before the pixel data (counted from their item tags before parsing): an
#: enhanced multi-frame object holds ~10 per frame; pydicom spends ~90 us and ~700 bytes on each, so 262k empty
#: items in a 2 MiB file cost ~24 s to parse, 50k at most ~5 s.
MAX_DICOM_ITEMS = 50_000
_ITEM_TAGS = (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")  # (FFFE,E000) little / big endian
_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")


def _count_items(data: bytes, name: str) -> None:
    """Refuse a dataset with more than :data:`MAX_DICOM_ITEMS` sequence items before its (last) PixelData tag —
    an upper bound taken from the bytes, before pydicom builds a Dataset for each."""
    end = max(data.rfind(tag) for tag in _PIXEL_TAGS)
    end = len(data) if end < 0 else end
    items = sum(data.count(tag, 0, end) for tag in _ITEM_TAGS)
    if items > MAX_DICOM_ITEMS:
        raise ImageDecodeError(name, f"DICOM header with more than {MAX_DICOM_ITEMS:,} sequence items (about "
                                     f"{items:,}); refused unparsed")


def _inflate(body: bytes, name: str, max_bytes: int) -> bytes:
    """A Deflated Explicit VR Little Endian body (raw deflate, PS3.5 A.5) inflated to at most
    ``min(max_bytes, MAX_INFLATE_RATIO * len(body) + 1 MiB)`` bytes; past that, ImageDecodeError."""
    bound = min(max_bytes, MAX_INFLATE_RATIO * len(body) + (1 << 20))
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(body, bound + 1)
    except zlib.error:
        raise ImageDecodeError(name, "corrupt Deflated Explicit VR Little Endian body (not a deflate stream)") from None
    if len(inflated) > bound:
        raise ImageDecodeError(name, f"Deflated Explicit VR Little Endian body inflates past {bound:,} bytes "
                                     f"(at most {MAX_INFLATE_RATIO}x its {len(body):,} deflated bytes + 1 MiB, and "
                                     f"at most {max_bytes:,}); refused")
    return inflated


def _read_deflated(data: bytes, name: str, max_bytes: int) -> Dataset | None:
    """The dataset of a Part 10 file in Deflated Explicit VR Little Endian, inflated here within a bound (pydicom
    inflates the whole body without one: a 256 KiB body became 256 MiB); None for any other transfer syntax."""
    source = io.BytesIO(data)
    preamble = read_preamble(source, False)
    meta = _read_file_meta_info(source)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return None
    inflated = _inflate(data[source.tell():], name, max_bytes)
    _count_items(inflated, name)
    ds = read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
    ds.file_meta, ds.preamble = meta, preamble
    return ds


def _read_dataset(data: bytes | bytearray | memoryview, name: str, *, header_only: bool = False,
                  max_inflated_bytes: int = MAX_INFLATED_BYTES) -> Dataset:
    """Parse ``data`` (never modified). ``header_only``: values over 1 KiB (the pixel data) are not read.
    A deflated body is inflated to at most ``max_inflated_bytes`` (see :func:`_inflate`); more than
    :data:`MAX_DICOM_ITEMS` sequence items are refused before parsing."""
    view = memoryview(data)
    has_magic = len(view) >= 132 and bytes(view[128:132]) == b"DICM"
    # bytes are shared, anything else copied once: the caller's buffer is never touched
    raw = data if isinstance(data, bytes) else bytes(view)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = _read_deflated(raw, name, max_inflated_bytes) if has_magic else None
            if ds is None:
                _count_items(raw, name)
                ds = pydicom.dcmread(io.BytesIO(raw), force=not has_magic, defer_size=1024 if header_only else None)
    except ImageDecodeError:
        raise
    except Exception as exc:  # pydicom raises a zoo of types on garbage (InvalidDicomError, EOFError, ...)
        raise ImageDecodeError(name, f"corrupt DICOM ({type(exc).__name__})") from exc
    if "TransferSyntaxUID" not in ds.get("file_meta", {}):
        # Bare dataset: read with force=True, so check it is one before trusting it (pydicom parses some
        # arbitrary bytes into a few elements): real datasets name their SOP class, modality or image matrix.
        implicit, little = ds.original_encoding
        if implicit is None or len(ds) < 2 or not any(k in ds for k in ("SOPClassUID", "Modality", "Rows")):
            raise ImageDecodeError(name, "not a DICOM dataset (no preamble, no file meta and no readable elements)")
        ds.file_meta = ds.get("file_meta") or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    return ds


def _floats(value: Any) -> list[float] | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [float(v) for v in value]
    return [float(value)]


def _summary(ds: Dataset) -> dict[str, Any]:
    """JSON-ready summary of the clinically relevant header fields (absent fields are None).

    Optional numbers are read tolerantly: a value that is not a number (``0,143`` with a decimal comma, an IS with
    letters; common in real archives) is absent, its keyword listed under ``ignored_attributes``, and its raw text
    never reaches an error message."""
    ignored: list[str] = []

    def tolerant(keyword: str, convert):
        try:
            return convert(ds.get(keyword))
        except (ValueError, TypeError, OverflowError):
            ignored.append(keyword)
            return None

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        return None if value is None or value == "" else str(value)

    def number(keyword: str) -> float | None:
        return tolerant(keyword, lambda value: None if value is None or value == "" else float(value))

    def integer(keyword: str) -> int | None:
        return tolerant(keyword, lambda value: None if value is None or value == "" else int(value))

    def floats(keyword: str) -> list[float] | None:
        return tolerant(keyword, _floats)

    explanation = ds.get("WindowCenterWidthExplanation")
    if explanation is not None and not isinstance(explanation, (list, pydicom.multival.MultiValue)):
        explanation = [explanation]
    summary = {
        "modality": text("Modality"),
        "sop_class_uid": text("SOPClassUID"),
        "sop_instance_uid": text("SOPInstanceUID"),
        "study_instance_uid": text("StudyInstanceUID"),
        "series_instance_uid": text("SeriesInstanceUID"),
        "series_description": text("SeriesDescription"),
        "series_number": integer("SeriesNumber"),
        "instance_number": integer("InstanceNumber"),
        "transfer_syntax_uid": str(ds.file_meta.TransferSyntaxUID),
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "bits_allocated": int(ds.BitsAllocated),
        "high_bit": integer("HighBit"),
        "pixel_representation": int(ds.get("PixelRepresentation", 0)),
        "rescale_slope": number("RescaleSlope"),
        "rescale_intercept": number("RescaleIntercept"),
        "rescale_type": text("RescaleType"),
        "window_center": floats("WindowCenter"),
        "window_width": floats("WindowWidth"),
        "window_explanation": None if explanation is None else [str(e) for e in explanation],
        "voi_lut_function": text("VOILUTFunction"),
        "pixel_spacing": floats("PixelSpacing"),
        "imager_pixel_spacing": floats("ImagerPixelSpacing"),
        "body_part_examined": text("BodyPartExamined"),
        "view_position": text("ViewPosition"),
        "image_type": None if "ImageType" not in ds else [str(v) for v in ds.ImageType],
        "number_of_frames": int(ds.get("NumberOfFrames") or 1),
        "source_photometric": text("PhotometricInterpretation"),
    }
    if ignored:
        summary["ignored_attributes"] = ignored
    return summary


def _header_bytes(ds: Dataset) -> bytes:
    """``ds`` without its pixel data, as an Explicit VR Little Endian Part 10 file."""
    header = Dataset()
    for elem in ds:  # iterating converts raw elements, so the original byte order does not leak through
        if elem.tag.group in (0x0000, 0x7FE0) or elem.tag == 0xFFFCFFFC:  # command set, pixels, padding
            continue
        header.add(elem)
    header.file_meta = FileMetaDataset()
    header.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    header.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7")
    header.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
    header.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, header, enforce_file_format=True)
    return buf.getvalue()


def _sop_class(ds: Dataset) -> tuple[str, str]:
    """(SOPClassUID, pydicom's name for it); ("", "unknown") when absent. A value that is not a UID (digits and
    dots) is never echoed — it could hold anything, identifiers included — and counts as absent."""
    uid = str(ds.get("SOPClassUID", "") or "").strip().rstrip("\x00")
    if not uid or len(uid) > 64 or not all(c.isdigit() or c == "." for c in uid):
        return ("", "unknown")
    return (uid, UID(uid).name)


def _require_image(ds: Dataset, name: str) -> None:
    """Raise NotAnImageObject unless ``ds`` is an image object: an image SOP class (pydicom names every one
    "... Image Storage ...") or an unknown/private/absent one, with pixel data. An image SOP class without pixel
    data is a damaged file (ImageDecodeError), not a different kind of object."""
    uid, label = _sop_class(ds)
    known = bool(uid) and label != uid
    if known and "Image Storage" not in label:
        raise NotAnImageObject(name, uid, label)
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        if known:
            raise ImageDecodeError(name, f"{label} object has no PixelData (truncated or stripped)")
        raise NotAnImageObject(name, uid, label, "no pixel data")


def _positive(ds: Dataset, keyword: str, name: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value in (None, ""):
        if default is not None:
            return default
        raise ImageDecodeError(name, f"DICOM image is missing the required attribute {keyword}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ImageDecodeError(name, f"DICOM attribute {keyword} is not an integer") from None
    if number < 1:
        raise ImageDecodeError(name, f"DICOM attribute {keyword}={number} must be positive")
    return number


@_quiet
def probe_dicom(data: bytes | bytearray | memoryview, name: str, *,
                max_inflated_bytes: int = MAX_INFLATED_BYTES) -> ImageProbe:
    """Header-only :class:`~medsr_dist.io.medical_image.ImageProbe` of a DICOM object (values over 1 KiB, i.e. the
    pixel data, are not read). Raises NotAnImageObject / ImageDecodeError as :func:`decode_dicom` would for the
    object class and the image matrix; sample layout and transfer syntax are only checked by decoding."""
    ds = _read_dataset(data, name, header_only=True, max_inflated_bytes=max_inflated_bytes)
    _require_image(ds, name)
    rows, columns = _positive(ds, "Rows", name), _positive(ds, "Columns", name)
    frames = _positive(ds, "NumberOfFrames", name, default=1)
    samples = _positive(ds, "SamplesPerPixel", name, default=1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    channels = 3 if photometric == "PALETTE COLOR" else samples
    bits = _positive(ds, "BitsAllocated", name, default=16)
    return ImageProbe("dicom", rows, columns, frames, channels, bits)


def _decoder_available(syntax: UID) -> bool:
    try:
        return bool(get_decoder(syntax).is_available)
    except Exception:  # pydicom has no decoder class at all for this syntax (MPEG, HEVC, ...)
        return False


def _palette_bits(ds: Dataset, name: str) -> int:
    descriptors = [ds.get(f"{c}PaletteColorLookupTableDescriptor") for c in ("Red", "Green", "Blue")]
    if any(d is None or len(d) != 3 for d in descriptors):
        raise ImageDecodeError(name, "PALETTE COLOR image without complete palette colour lookup table descriptors")
    bits = {int(d[2]) for d in descriptors}
    if not bits <= {8, 16} or len(bits) != 1:
        raise ImageDecodeError(name, f"palette colour lookup tables of {sorted(bits)} bits are not supported")
    return bits.pop()


def _codestream_kind(syntax: UID) -> str | None:
    if syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes or syntax.startswith("1.2.840.10008.1.2.4.5") \
            or syntax.startswith("1.2.840.10008.1.2.4.6"):
        return "jpeg"  # baseline, extended, lossless, (retired) hierarchical/progressive, JPEG-LS
    if syntax in JPEG2000TransferSyntaxes:
        return "j2k"  # JPEG 2000 and HTJ2K
    if syntax in RLETransferSyntaxes:
        return "rle"
    return None


def _check_codestreams(ds: Dataset, syntax: UID, name: str, rows: int, columns: int, frames: int, samples: int,
                       allocated: int) -> None:
    """Hold every compressed frame's own header (JPEG/JPEG-LS SOF, JPEG 2000 SIZ, RLE segment table) against
    Rows, Columns, SamplesPerPixel and BitsAllocated before any decoder runs: decoders size their output from the
    codestream, so a frame saying 30000 x 30000 in a file whose header (checked against the pixel limits) says
    64 x 64 would otherwise allocate gigabytes. The fragments are only split into frames, nothing is decoded.

    Raises ImageDecodeError naming the frame and the attribute(s) that disagree (dimensions only, no text of the
    file)."""
    kind = _codestream_kind(syntax)
    if kind is None or not syntax.is_compressed:
        return
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    found = 0
    try:
        for index, fragments in enumerate(generate_fragmented_frames(ds.PixelData, number_of_frames=frames,
                                                                     extended_offsets=offsets)):
            if index >= frames:
                break
            found = index + 1
            frame = fragments[0] if len(fragments) == 1 else b"".join(fragments)
            where = f"frame {index + 1}" if frames > 1 else "the frame"
            if kind == "rle":
                segments = rle_segment_count(frame)
                expected = samples * allocated // 8
                if segments != expected:
                    raise ImageDecodeError(
                        name, f"RLE segment table of {where} has {segments} segments, SamplesPerPixel x BitsAllocated/8 "
                        f"= {expected}: does not match SamplesPerPixel/BitsAllocated; not decoded")
                continue
            header = frame_header(kind, frame)
            wrong = [attr for attr, mine, theirs in (("Columns", header.width, columns), ("Rows", header.height, rows),
                                                     ("SamplesPerPixel", header.components, samples))
                     if mine != theirs]
            if header.precision > allocated:
                wrong.append("BitsAllocated")
            if wrong:
                raise ImageDecodeError(
                    name, f"the {header.kind} of {where} says {header.width} x {header.height} pixels, "
                    f"{header.components} components of {header.precision} bits; the DICOM header says Columns "
                    f"{columns}, Rows {rows}, SamplesPerPixel {samples}, BitsAllocated {allocated}: "
                    f"{', '.join(wrong)} disagree; not decoded")
    except ImageDecodeError:
        raise
    except CodestreamError as exc:
        raise ImageDecodeError(name, f"compressed transfer syntax {syntax.name} ({syntax}) could not be decoded: "
                                     f"corrupt or unsupported codestream header ({exc})") from None
    except Exception as exc:  # pydicom's fragment parser on damaged item tags (ValueError, struct.error, ...)
        raise ImageDecodeError(name, f"{syntax.name} pixel data: damaged encapsulation ({type(exc).__name__})") from None
    if found < frames:
        raise ImageDecodeError(name, f"{syntax.name} pixel data holds {found} frames, NumberOfFrames says {frames}; "
                                     "not decoded")


@_quiet
def read_image_dataset(data: bytes | bytearray | memoryview, name: str, *, header_only: bool = False,
                       max_inflated_bytes: int = MAX_INFLATED_BYTES) -> Dataset:
    """A DICOM object parsed as :func:`decode_dicom` parses it, for readers that need the dataset itself (the MRI
    series reader): a deflated body inflated within ``max_inflated_bytes``, sequence items counted before
    parsing, and (unless ``header_only``) every compressed frame's own header held against Rows, Columns,
    SamplesPerPixel and BitsAllocated before any decoder runs (:func:`_check_codestreams`). Nothing is decoded.

    Raises:
        ImageDecodeError: unreadable, a bound exceeded, or a codestream that disagrees with the header (naming
            the attribute, no text of the file).
    """
    ds = _read_dataset(data, name, header_only=header_only, max_inflated_bytes=max_inflated_bytes)
    if not header_only and "PixelData" in ds:
        syntax = UID(ds.file_meta.TransferSyntaxUID)
        _check_codestreams(ds, syntax, name, _positive(ds, "Rows", name), _positive(ds, "Columns", name),
                           _positive(ds, "NumberOfFrames", name, default=1), int(ds.get("SamplesPerPixel", 1) or 1),
                           _positive(ds, "BitsAllocated", name))
    return ds


@_quiet
def decode_dicom(data: bytes | bytearray | memoryview, name: str, *,
                 max_inflated_bytes: int = MAX_INFLATED_BYTES) -> MedicalImage:
    """Decode a DICOM image object to display-oriented float pixels; see ``decode_image``.

    Returns ``MedicalImage`` with pixels float32 (H, W, C), or (F, H, W, C) when NumberOfFrames = F > 1, in
    [0, 1] = (stored value + offset) / (2**BitsStored - 1) — offset 2**(BitsStored-1) for signed samples
    (PixelRepresentation=1), else 0; bits above BitsStored ignored —, MONOCHROME1 inverted so higher is brighter,
    YBR_* converted to RGB, PALETTE COLOR looked up to RGB (8 or 16 bits as the palette holds them);
    ``meta.dicom`` the header summary and ``header`` the dataset without PixelData (Explicit VR Little Endian
    Part 10 bytes). Any transfer syntax that pydicom's handlers (with the pylibjpeg plugins) decode is accepted.

    Raises NotAnImageObject for objects without an image (SR, waveform, RT plan, presentation state, ...);
    ImageDecodeError for unreadable data, missing image attributes, 1-bit or 32-bit samples, float pixel data,
    signed colour, unsupported photometrics, and pixel data that cannot be decoded (naming the transfer syntax).
    """
    ds = _read_dataset(data, name, max_inflated_bytes=max_inflated_bytes)
    _require_image(ds, name)
    if "PixelData" not in ds:
        raise ImageDecodeError(name, "float pixel data (FloatPixelData / DoubleFloatPixelData) is not supported")
    rows, columns = _positive(ds, "Rows", name), _positive(ds, "Columns", name)
    frames = _positive(ds, "NumberOfFrames", name, default=1)
    allocated, stored_bits = _positive(ds, "BitsAllocated", name), _positive(ds, "BitsStored", name)
    if ds.get("PhotometricInterpretation") in (None, ""):
        raise ImageDecodeError(name, "DICOM image is missing the required attribute PhotometricInterpretation")
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if allocated not in (8, 16) or not 1 <= stored_bits <= allocated:
        raise ImageDecodeError(
            name, f"unsupported DICOM sample layout (BitsAllocated={allocated}, BitsStored={stored_bits}; "
            "only 8- and 16-bit samples are supported)"
        )
    source_photometric = str(ds.PhotometricInterpretation).strip()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if source_photometric in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"):
        expected_samples = 1
    elif source_photometric == "RGB" or source_photometric.startswith("YBR_"):
        expected_samples = 3
    else:
        raise ImageDecodeError(name, f"DICOM PhotometricInterpretation {source_photometric!r} is not supported yet")
    if samples != expected_samples:
        raise ImageDecodeError(name, f"SamplesPerPixel={samples} does not match {source_photometric}")
    if signed and expected_samples == 3:
        raise ImageDecodeError(name, f"signed {source_photometric} colour samples are not supported")

    syntax = UID(ds.file_meta.TransferSyntaxUID)
    _check_codestreams(ds, syntax, name, rows, columns, frames, samples, allocated)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = ds.pixel_array  # YBR_* come back as RGB (pydicom's as_rgb default)
            if source_photometric == "PALETTE COLOR":
                stored_bits = _palette_bits(ds, name)
                array = apply_color_lut(array, ds)
                if stored_bits == 16 and not (array & 0xFF).any():
                    # 8-bit colours in 16-bit entries (x * 256, as most writers store them): keep 8 bits, exactly,
                    # which is also what 8-bit-only IODs (US, SC) allow for RGB.
                    array, stored_bits = (array >> 8).astype(np.uint8), 8
    except (ImageDecodeError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # also the Rust plugins' pyo3 PanicException, which is no Exception (a damaged
        # RLE frame made pylibjpeg-rle panic "index out of bounds": it escaped every `except Exception` up to Ray)
        if syntax.is_compressed:
            if _decoder_available(syntax):
                cause = "corrupt or unsupported codestream"
            else:
                cause = "no pixel-data decoder for it is installed (pylibjpeg plugins, gdcm)"
            raise ImageDecodeError(
                name,
                f"compressed transfer syntax {syntax.name} ({syntax}) could not be decoded: {cause} "
                f"({type(exc).__name__}: {exc})",
            ) from exc
        raise ImageDecodeError(name, f"corrupt DICOM pixel data ({type(exc).__name__}: {exc})") from exc
    if source_photometric == "PALETTE COLOR":
        photometric, channels, allocated, signed = "RGB", 3, stored_bits, False
    elif expected_samples == 3:
        photometric, channels = "RGB", 3
    else:
        photometric, channels = source_photometric, 1
    expected = ((frames,) if frames > 1 else ()) + (rows, columns) + ((3,) if channels == 3 else ())
    if array.shape != expected:
        raise ImageDecodeError(name, f"DICOM pixel array has shape {array.shape}, expected {expected}")

    maxval = (1 << stored_bits) - 1
    # Bits above BitsStored carry no image information (historically overlays); the standard says ignore them.
    # Masking also turns sign-extended negatives into their BitsStored-bit two's complement, and flipping the
    # sign bit maps that to value + 2**(BitsStored-1): signed [-2**(b-1), 2**(b-1)) -> offset [0, 2**b).
    # Working on the unsigned view of the same bits keeps it at 1-2 bytes per sample (no int32 copy).
    # (same byte order as pydicom returned: big-endian sources come back as '>i2')
    unsigned = array.view(f"{array.dtype.byteorder}u{array.itemsize}") if array.dtype.kind == "i" else array
    stored = unsigned & unsigned.dtype.type(maxval)
    if signed:
        stored ^= stored.dtype.type(1 << (stored_bits - 1))
    if photometric == "MONOCHROME1":
        stored = stored.dtype.type(maxval) - stored  # integer inversion: a MONOCHROME2 twin decodes alike
    pixels = stored.astype(np.float32).reshape(((frames,) if frames > 1 else ()) + (rows, columns, channels))
    pixels /= np.float32(maxval)

    dtype = ("int" if signed else "uint") + ("8" if allocated == 8 else "16")
    meta = ImageMeta(
        format="dicom",
        dtype=dtype,
        bits_stored=stored_bits,
        channels=channels,
        photometric=photometric,
        patient_id=str(ds.PatientID) if ds.get("PatientID") not in (None, "") else None,
        text={},
        dicom=_summary(ds),
        frames=frames,
    )
    return MedicalImage(pixels=pixels, meta=meta, header=_header_bytes(ds))


def _compress(ds: Dataset, array: np.ndarray, compression: str) -> None:
    """Encapsulate ``array`` (the uncompressed PixelData of ``ds``) losslessly, in place.

    JPEG 2000 colour is coded with the reversible colour transform and labelled YBR_RCT, as Part 3 demands for
    JPEG 2000 colour in IODs such as US (decoders return RGB again, bit for bit). Raises ValueError for a
    JPEG 2000 frame under 32 pixels on a side (OpenJPEG's six resolution levels need 32)."""
    syntax = _COMPRESSION_SYNTAX[compression]
    options: dict[str, Any] = {}
    if compression == "jpeg2000-lossless":
        if min(int(ds.Rows), int(ds.Columns)) < 32:
            raise ValueError(
                f"JPEG 2000 lossless needs frames of at least 32 x 32 pixels, got {ds.Rows} x {ds.Columns}; "
                "use dicom_compression none or rle for images this small"
            )
        if int(ds.SamplesPerPixel) == 3:
            ds.PhotometricInterpretation = "YBR_RCT"
            options["use_mct"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.compress(syntax, array, generate_instance_uid=False, **options)


def _scale_spacing(ds: Dataset, keyword: str, scale: float) -> None:
    """Divide the spacing ``keyword`` of a derived object by ``scale``. A source value that is not a number (a
    decimal comma, letters) cannot be scaled: the derived object leaves the attribute out rather than state the
    source's spacing for the finer grid (the source summary lists it under ``ignored_attributes``)."""
    try:
        values = _floats(ds.get(keyword))
    except (ValueError, TypeError, OverflowError):
        delattr(ds, keyword)
        return
    if values:
        setattr(ds, keyword, [format_number_as_ds(v / scale) for v in values])


def _update_functional_groups(ds: Dataset, scale: float) -> None:
    """Enhanced (multi-frame functional group) objects: PixelMeasuresSequence PixelSpacing divided by ``scale``
    and FrameType value 1 DERIVED, in the shared group and in every per-frame group."""
    groups = list(ds.get("SharedFunctionalGroupsSequence", [])) + list(ds.get("PerFrameFunctionalGroupsSequence", []))
    for group in groups:
        for measures in group.get("PixelMeasuresSequence", []):
            _scale_spacing(measures, "PixelSpacing", scale)
        for elem in group:
            if elem.VR == "SQ" and elem.keyword.endswith("FrameTypeSequence"):
                for item in elem.value:
                    if "FrameType" in item:
                        item.FrameType = ["DERIVED"] + [str(v) for v in list(item.FrameType)[1:]]


def _code_item(value: str, meaning: str, scheme: str = "DCM") -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _format_scale(scale: float) -> str:
    return f"{scale:g}"


@_quiet
def encode_dicom(
    stored: np.ndarray,
    meta: ImageMeta,
    header: bytes,
    *,
    scale: float = 1.0,
    provenance: Mapping[str, str] | None = None,
    compression: str = "none",
) -> bytes:
    """Write a derived (super-resolved) DICOM object from its source header and new stored values.

    ``stored``: meta.dtype (uint8/uint16/int8/int16) (H', W', C) — (F, H', W', C) for a multi-frame meta —
    stored values, already in the file's sense (MONOCHROME1 re-inverted, signed values signed), within
    BitsStored bits. ``header``: ``MedicalImage.header`` of the source. ``scale``: factor by which the pixel grid
    got finer (PixelSpacing / ImagerPixelSpacing, and PixelSpacing in the shared and per-frame functional groups'
    PixelMeasuresSequence, are divided by it). ``compression``: "none" (Explicit VR Little Endian), "rle" (RLE
    Lossless) or "jpeg2000-lossless" (JPEG 2000 Lossless Only); all three keep every stored value.

    The result keeps the Study, Patient and equipment modules, the modality LUT and VOI window; it gets a new
    Series (deterministic from the source SeriesInstanceUID and the model hash in ``provenance``) and a new SOP
    Instance (deterministic from the source SOPInstanceUID, model hash and scale, so a retried task writes the
    same object), ImageType DERIVED\\SECONDARY (and FrameType DERIVED in functional groups), a
    DerivationDescription, a SourceImageSequence reference to the source and a ContributingEquipmentSequence entry
    for medsr-dist. PixelRepresentation, BitsStored, NumberOfFrames and rescale are the source's; a YBR or
    PALETTE COLOR source is written as RGB (PlanarConfiguration 0, palette tables removed).
    """
    provenance = dict(provenance or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(header), force=True)
    if compression != "none" and compression not in _COMPRESSION_SYNTAX:
        raise ValueError(f"DICOM compression must be none, {' or '.join(_COMPRESSION_SYNTAX)}, got {compression!r}")
    if stored.ndim == 3:
        stored = stored[None]
    frames, height, width, channels = stored.shape
    model = provenance.get(PROVENANCE_MODEL, "unknown model")
    model_hash = provenance.get(PROVENANCE_MODEL_SHA256, "")
    scale_text = provenance.get(PROVENANCE_SCALE, _format_scale(scale))

    source_sop_class = ds.get("SOPClassUID")
    source_sop = ds.get("SOPInstanceUID")
    source_series = ds.get("SeriesInstanceUID") or source_sop or ""
    series_uid = generate_uid(entropy_srcs=[str(source_series), model_hash or model])
    # every parameter that changes the pixels (tile, backend, precision…) changes the instance
    params = provenance.get("medsr:params", "")
    sop_uid = generate_uid(entropy_srcs=[str(source_sop or source_series), model_hash or model, scale_text, params])
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_uid
    if "StudyInstanceUID" not in ds:  # a derived object must sit in a study; keep it stable per source
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(source_series), "study"])

    image_type = [str(v) for v in list(ds.get("ImageType", []))]
    # Enhanced (functional group) IODs fix value 2 to PRIMARY; elsewhere a derived image is DERIVED\SECONDARY.
    enhanced = "SharedFunctionalGroupsSequence" in ds and len(image_type) >= 2
    ds.ImageType = ["DERIVED", image_type[1] if enhanced else "SECONDARY"] + image_type[2:]
    description = (
        f"Super-resolution x{scale_text} by model {model}"
        + (f" (sha256 {model_hash})" if model_hash else "")
        + "; "
        + provenance.get(PROVENANCE_NOTE, "enhanced image, not a new acquisition")
    )
    ds.DerivationDescription = description[:1024]  # ST limit
    base = str(ds.get("SeriesDescription", "") or "").strip()
    suffix = f" [{_DERIVED_SUFFIX_TAG} x{scale_text}]"
    ds.SeriesDescription = (base[: 64 - len(suffix)] + suffix).strip()

    if source_sop is not None and source_sop_class is not None:
        reference = Dataset()
        reference.ReferencedSOPClassUID = source_sop_class
        reference.ReferencedSOPInstanceUID = source_sop
        reference.PurposeOfReferenceCodeSequence = Sequence(
            [_code_item("121322", "Source image for image processing operation")]
        )
        ds.SourceImageSequence = Sequence([reference])
    equipment = Dataset()
    equipment.PurposeOfReferenceCodeSequence = Sequence([_code_item("109103", "Modifying Equipment")])
    equipment.Manufacturer = "medsr-dist"
    equipment.ManufacturerModelName = str(model)[:64]
    if model_hash:
        equipment.SoftwareVersions = model_hash[:64]
    equipment.ContributionDescription = description[:1024]
    ds.ContributingEquipmentSequence = Sequence(list(ds.get("ContributingEquipmentSequence", [])) + [equipment])

    for keyword in _SPACING_KEYWORDS:
        _scale_spacing(ds, keyword, scale)
    for keyword in _STALE_PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    for tag in [t for t in ds.keys() if 0x6000 <= t.group <= 0x601E and t.group % 2 == 0]:
        del ds[tag]  # overlay planes are sized for the old matrix

    _update_functional_groups(ds, scale)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR":
        for tag in [t for t in ds.keys() if t.group == 0x0028 and 0x1100 <= t.element <= 0x1223]:
            del ds[tag]  # palette descriptors, UID and tables: the derived object is RGB

    allocated = 8 if meta.dtype in ("uint8", "int8") else 16
    ds.Rows, ds.Columns = height, width
    ds.SamplesPerPixel = channels
    ds.PhotometricInterpretation = meta.photometric
    if channels == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = allocated
    ds.BitsStored = meta.bits_stored
    ds.HighBit = meta.bits_stored - 1
    ds.PixelRepresentation = 1 if meta.signed else 0
    if frames > 1 or "NumberOfFrames" in ds:  # kept where the source has it (some IODs require it even for 1)
        ds.NumberOfFrames = frames
    little = stored.astype(stored.dtype.newbyteorder("<"), copy=False)
    array = np.ascontiguousarray(little if frames > 1 else little[0])
    if channels == 1:
        array = array[..., 0]
    payload = array.tobytes()
    if len(payload) % 2:
        payload += b"\x00"
    ds.PixelData = payload
    ds["PixelData"].VR = "OW" if allocated == 16 else "OB"

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", source_sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.preamble = b"\x00" * 128
    if compression != "none":
        _compress(ds, array, compression)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Builders for sample data and tests.


def build_radiograph_dataset(
    image: np.ndarray,
    *,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    patient_id: str = "00000001",
    patient_name: str | None = None,
    modality: str = "DX",
    pixel_spacing_mm: float = 0.143,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    uid_key: str = "",
    series_description: str = "CHEST PA",
    instance_number: int = 1,
) -> Dataset:
    """A plausible single- or multi-frame projection radiograph dataset (DX or CR) around ``image``.

    ``image``: float (H, W) — or (F, H, W) for a multi-frame object — in [0, 1], display-oriented (bone bright).
    Stored values are ``rint(image * (2**bits_stored - 1))``; for MONOCHROME1 they are stored inverted
    (``max - value``), as detectors that write MONOCHROME1 do, so both photometrics display alike.
    BitsAllocated is 8 for ``bits_stored == 8`` and 16 otherwise; RescaleSlope 1 / Intercept 0; the window
    spans the 1st..99th percentile of the stored values. UIDs that are not given are derived deterministically
    from ``patient_id`` and ``uid_key`` (so sample archives are reproducible byte for byte).
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3) or not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image must be float (H, W) or (F, H, W), got {image.dtype} {image.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if not 1 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be in 1..16, got {bits_stored}")
    if modality not in ("DX", "CR"):
        raise ValueError(f"modality must be DX or CR, got {modality!r}")
    allocated = 8 if bits_stored <= 8 else 16
    maxval = (1 << bits_stored) - 1
    stored = np.rint(np.clip(image.astype(np.float64), 0.0, 1.0) * maxval).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = np.uint16(maxval) - stored
    low, high = np.percentile(stored, [1.0, 99.0])

    def uid(kind: str) -> UID:
        return generate_uid(entropy_srcs=["medsr-dist sample", patient_id, uid_key, kind])

    sop_class = DigitalXRayImageStorageForPresentation if modality == "DX" else ComputedRadiographyImageStorage
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or uid("sop")
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "medsr-dist synthetic"
    ds.StudyDescription = "CHEST"
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name or f"SAMPLE^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyInstanceUID = study_uid or uid("study")
    ds.SeriesInstanceUID = series_uid or uid("series")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ["L", "F"]
    if modality == "DX":  # the DX Image, DX Anatomy Imaged, DX Detector and DX Positioning modules
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "U"  # a chest: unpaired
        ds.BurnedInAnnotation = "NO"
        ds.AnatomicRegionSequence = Sequence([_code_item("51185008", "Chest", "SCT")])
        ds.ViewCodeSequence = Sequence([_code_item("399348003", "postero-anterior", "SCT")])
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
        ds.PositionerType = "NONE"
        ds.AcquisitionContextSequence = Sequence([])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if image.ndim == 3:
        ds.NumberOfFrames = image.shape[0]
    ds.Rows, ds.Columns = image.shape[-2:]
    spacing = format_number_as_ds(float(pixel_spacing_mm))
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = str(int(round((low + high) / 2.0)))
    ds.WindowWidth = str(int(max(round(high - low), 1)))
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    payload = stored.astype("<u2" if allocated == 16 else np.uint8).tobytes()
    if len(payload) % 2:
        payload += b"\x00"
    ds.PixelData = payload
    ds["PixelData"].VR = "OW" if allocated == 16 else "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def dataset_to_bytes(ds: Dataset, *, preamble: bool = True, implicit_vr: bool = False) -> bytes:
    """Serialise ``ds``: a Part 10 file (preamble, ``DICM``, file meta), or with ``preamble=False`` the bare
    dataset only (no preamble, no file meta), as old archives hold them. ``implicit_vr`` picks Implicit VR
    Little Endian instead of Explicit VR Little Endian. ``ds`` itself is not modified."""
    out = Dataset()
    for elem in ds:
        out.add(elem)
    buf = io.BytesIO()
    if preamble:
        out.file_meta = FileMetaDataset()
        for elem in ds.get("file_meta", FileMetaDataset()):
            out.file_meta.add(elem)
        out.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
        out.preamble = b"\x00" * 128
        pydicom.dcmwrite(buf, out, enforce_file_format=True)
    else:
        pydicom.dcmwrite(buf, out, implicit_vr=implicit_vr, little_endian=True)
    return buf.getvalue()
