"""Decode and encode medical and ordinary images (PNG, JPEG, TIFF, DICOM) without losing their form.

``decode_image`` turns file bytes into a :class:`MedicalImage`: float32 pixels (H, W, C) — (F, H, W, C) for a
multi-frame DICOM object — in [0, 1], RGB(A) order, display-oriented (higher is brighter), plus an
:class:`ImageMeta` that remembers how the pixels were stored (format, sample type, signedness, bits, channels,
frames, photometric, text, DICOM header summary). ``encode_image`` writes
new pixels — usually super-resolved, so of another size — back in that same form: 16-bit stays 16-bit, grey
stays grey, MONOCHROME1 stays MONOCHROME1, DICOM becomes a valid derived object of the same study. Provenance
(which model made the image) is written as PNG tEXt/iTXt, TIFF ImageDescription JSON, a JPEG COM segment or
DICOM derivation attributes, and text metadata is read back into ``ImageMeta.text``.

The format is detected from the content (magic bytes), never from the file name. :func:`probe_image` reads only
the header (dimensions, frames, channels, bits) so that pixel limits can be enforced before anything is decoded.
DICOM objects that hold no image (structured reports, waveforms, RT plans, presentation states, ...) raise
:class:`NotAnImageObject`, so that callers can count them apart from broken files.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import tifffile

__all__ = [
    "ImageDecodeError",
    "NotAnImageObject",
    "ImageMeta",
    "ImageProbe",
    "MedicalImage",
    "FORMATS",
    "detect_format",
    "decode_image",
    "probe_image",
    "single_frame_pixels",
    "encode_image",
    "output_extension",
]

FORMATS = ("png", "jpeg", "tiff", "dicom")
_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "dicom": ".dcm"}
_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2", "RGB", "RGBA")
_CHANNELS_FOR = {"MONOCHROME1": 1, "MONOCHROME2": 1, "RGB": 3, "RGBA": 4}
_MAXVAL = {"uint8": 255, "uint16": 65535}
_SIGNED_DTYPES = ("int8", "int16")  # DICOM PixelRepresentation=1 only
DICOM_COMPRESSIONS = ("none", "rle", "jpeg2000-lossless")
JPEG_QUALITY = 95

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class ImageDecodeError(ValueError):
    """Bytes that cannot be decoded into a supported image. ``str()`` is ``"<name>: <reason>"``."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self):  # keep it picklable across Ray workers
        return (type(self), (self.name, self.reason))


class NotAnImageObject(ImageDecodeError):
    """A readable DICOM object that holds no image to enhance (SR, waveform, RT plan/dose/structure set,
    presentation state, segmentation, encapsulated document, ...): not an error of the file, a different kind
    of object. Callers give it its own status (the nightly job: ``ignored``) instead of counting it as an error.

    Attributes: ``name`` (file name or key), ``sop_class_uid`` ("" when the object has none), ``sop_class_name``
    (pydicom's name of the SOP class, or the UID itself when unknown, "unknown" when absent), ``reason``.
    ``str()`` is ``"<name>: not an image object (<sop_class_name>, SOP class <uid>): <detail>"``; it never holds
    patient identifiers. It is an ImageDecodeError (so a ValueError): code that only knows ImageDecodeError still
    refuses it cleanly — catch NotAnImageObject first where it must be told apart. Picklable.
    """

    def __init__(self, name: str, sop_class_uid: str, sop_class_name: str, detail: str = "not an image SOP class"):
        label = f"{sop_class_name}, SOP class {sop_class_uid}" if sop_class_uid else "no SOP class"
        super().__init__(name, f"not an image object ({label}): {detail}")
        self.sop_class_uid = sop_class_uid
        self.sop_class_name = sop_class_name
        self.detail = detail

    def __reduce__(self):
        return (type(self), (self.name, self.sop_class_uid, self.sop_class_name, self.detail))


@dataclass
class ImageMeta:
    """How an image was stored, so that a derived image can be written in the same form.

    format: "png" | "jpeg" | "tiff" | "dicom"; dtype: stored sample type "uint8" | "uint16", or for signed DICOM
    pixel data (PixelRepresentation=1: CT, some MR) "int8" | "int16"; bits_stored: significant bits (DICOM
    BitsStored; 8 or 16 elsewhere); channels: 1, 3 or 4 as decoded (colour DICOM of any photometric is RGB);
    photometric: "MONOCHROME1" (stored inverted: low value = bright) | "MONOCHROME2" | "RGB" | "RGBA";
    patient_id: DICOM PatientID, else None; text: text metadata of the file (PNG tEXt/zTXt/iTXt, TIFF
    ImageDescription — a JSON object there is unpacked into its keys —, JPEG COM); dicom: JSON-ready summary of
    the DICOM header (rescale slope/intercept, window centre/width lists, pixel spacing in mm [row, column],
    UIDs, modality, ...; see ``medsr_dist.io.dicom``), else None; frames: number of frames (DICOM
    NumberOfFrames; 1 for every other format) — pixels are (F, H, W, C) when frames > 1.

    Signed samples are mapped into [0, 1] by ``(value + offset) / maxval`` with ``offset = 2**(bits_stored-1)``,
    so ``rint(p * maxval) - offset`` recovers every stored value exactly (see :attr:`offset`).
    """

    format: str
    dtype: str
    bits_stored: int
    channels: int
    photometric: str
    patient_id: str | None = None
    text: dict[str, str] = field(default_factory=dict)
    dicom: dict[str, Any] | None = None
    frames: int = 1

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.dtype not in _MAXVAL and not (self.dtype in _SIGNED_DTYPES and self.format == "dicom"):
            raise ValueError(f"dtype must be uint8 or uint16 (int8/int16 for DICOM only), got {self.dtype!r}")
        if self.photometric not in _PHOTOMETRICS:
            raise ValueError(f"photometric must be one of {_PHOTOMETRICS}, got {self.photometric!r}")
        if self.channels != _CHANNELS_FOR[self.photometric]:
            raise ValueError(f"{self.photometric} has {_CHANNELS_FOR[self.photometric]} channels, not {self.channels}")
        limit = 8 if self.dtype in ("uint8", "int8") else 16
        if not 1 <= self.bits_stored <= limit:
            raise ValueError(f"bits_stored {self.bits_stored} does not fit {self.dtype}")
        if isinstance(self.frames, bool) or not isinstance(self.frames, (int, np.integer)) or self.frames < 1:
            raise ValueError(f"frames must be a positive integer, got {self.frames!r}")
        self.frames = int(self.frames)  # a numpy count stays JSON-serialisable
        if self.frames > 1 and self.format != "dicom":
            raise ValueError(f"only DICOM images have several frames, not {self.format}")

    @property
    def signed(self) -> bool:
        """True for signed stored samples (DICOM PixelRepresentation=1)."""
        return self.dtype in _SIGNED_DTYPES

    @property
    def offset(self) -> int:
        """Added to a stored value before normalising: ``2**(bits_stored-1)`` when signed, else 0."""
        return 1 << (self.bits_stored - 1) if self.signed else 0

    @property
    def maxval(self) -> int:
        """The (offset) stored value that means 1.0: ``2**bits_stored - 1`` for DICOM, the dtype maximum
        otherwise. ``rint(p * maxval)`` is always in [0, maxval] <= 65535, so it fits uint16 for every form."""
        return (1 << self.bits_stored) - 1 if self.format == "dicom" else _MAXVAL[self.dtype]

    def pixel_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The ``MedicalImage.pixels`` shape of an image of this form: (H, W, C), or (F, H, W, C) if frames > 1."""
        return ((self.frames,) if self.frames > 1 else ()) + (height, width, self.channels)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ImageMeta:
        """Inverse of :meth:`to_json`; JSON written before a field existed gets that field's default."""
        return cls(**json.loads(text))


@dataclass(frozen=True)
class ImageProbe:
    """What an image's header says, read without decoding any pixel data (see :func:`probe_image`).

    format: as :data:`FORMATS`; height, width: pixels per frame as stored (JPEG EXIF orientation not applied);
    frames: DICOM NumberOfFrames, TIFF page count, else 1; channels: samples per pixel as ``decode_image`` will
    return them (PNG palette -> 3, grey+alpha -> 4, DICOM PALETTE COLOR / YBR -> 3); bits: bits per stored sample
    (DICOM BitsAllocated, PNG/TIFF bit depth, JPEG sample precision).
    """

    format: str
    height: int
    width: int
    frames: int
    channels: int
    bits: int

    @property
    def pixels(self) -> int:
        """Pixels of all frames together: frames * height * width."""
        return self.frames * self.height * self.width


@dataclass
class MedicalImage:
    """Display-ready pixels with the metadata needed to write a derived image in the source's form.

    pixels: float32 (H, W, C) — (F, H, W, C) with F = meta.frames when meta.frames > 1 —, C = meta.channels in
    {1, 3, 4}, range [0, 1], RGB(A) order, higher = brighter (MONOCHROME1 already inverted; signed samples offset
    as described in :class:`ImageMeta`). header: DICOM only — the source dataset without PixelData as Explicit VR
    Little Endian Part 10 bytes, for ``encode_image``; None for other formats.
    """

    pixels: np.ndarray
    meta: ImageMeta
    header: bytes | None = None

    def __post_init__(self) -> None:
        frames = self.meta.frames
        ok = self.pixels.dtype == np.float32 and self.pixels.shape[-1:] == (self.meta.channels,)
        ok = ok and (self.pixels.ndim == 3 if frames == 1 else (self.pixels.ndim == 4 and self.pixels.shape[0] == frames))
        if not ok:
            layout = f"(H, W, {self.meta.channels})" if frames == 1 else f"({frames}, H, W, {self.meta.channels})"
            raise ValueError(f"pixels must be float32 {layout}, got {self.pixels.dtype} {self.pixels.shape}")


# ----------------------------------------------------------------------------------------------------------------
# Format detection


def detect_format(data: bytes | bytearray | memoryview) -> str | None:
    """"png" | "jpeg" | "tiff" | "dicom" from the leading bytes, or None when none matches.

    ``DICM`` at offset 128 wins over anything in the 128-byte preamble (dual-personality DICOM/TIFF files hold a
    TIFF header there); DICOM without preamble (bare implicit- or explicit-VR datasets) is recognised by its first
    element (:func:`medsr_dist.io.dicom.looks_like_dicom`)."""
    head = bytes(memoryview(data)[:132])
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in _TIFF_MAGICS:
        return "tiff"
    from medsr_dist.io.dicom import looks_like_dicom  # pydicom is only imported when DICOM may be involved

    if looks_like_dicom(head):
        return "dicom"
    return None


def decode_image(data: bytes | bytearray | memoryview, name: str) -> MedicalImage:
    """Decode image file bytes (PNG, JPEG, TIFF or DICOM, detected by content) into a :class:`MedicalImage`.

    ``name`` is only used in error messages (the file name or key). Pixels are float32 (H, W, C) in [0, 1] —
    (F, H, W, C) for multi-frame DICOM —: stored value / 255 or 65535 for PNG/JPEG/TIFF, (value + offset) /
    (2**BitsStored - 1) for DICOM (offset 2**(BitsStored-1) for signed samples, else 0); RGB(A) order;
    MONOCHROME1 (DICOM, TIFF min-is-white) inverted to higher = brighter; DICOM YBR and PALETTE COLOR converted
    to RGB; JPEG EXIF orientation applied. Grey+alpha PNG/TIFF come back as RGBA. ``data`` is never modified.

    Raises NotAnImageObject for DICOM objects without an image (SR, waveform, RT plan, ...), ImageDecodeError
    (naming ``name`` and the reason) for empty, truncated, corrupt, unrecognised or unsupported input (multi-page
    TIFF, float samples, 32-bit or 1-bit DICOM, ...). Reasons never hold patient identifiers.
    """
    if len(memoryview(data)) == 0:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    kind = detect_format(data)
    if kind == "png":
        return _decode_png(data, name)
    if kind == "jpeg":
        return _decode_jpeg(data, name)
    if kind == "tiff":
        return _decode_tiff(data, name)
    if kind == "dicom":
        from medsr_dist.io.dicom import decode_dicom

        return decode_dicom(data, name)
    head = bytes(memoryview(data)[:8])
    raise ImageDecodeError(
        name, f"not a recognised image format (PNG, JPEG, TIFF or DICOM); file starts with {head!r}"
    )


def probe_image(data: bytes | bytearray | memoryview, name: str) -> ImageProbe:
    """Read an image's dimensions from its header alone — PNG IHDR, JPEG SOFn, TIFF page tags, DICOM Rows,
    Columns, NumberOfFrames, SamplesPerPixel — without decoding (or decompressing) any pixel data, so a caller
    can refuse a decompression bomb before allocating for it. Costs O(header), plus for DICOM a scan over the
    encapsulated fragments' item tags.

    Raises NotAnImageObject for a DICOM object without an image, ImageDecodeError (naming ``name``) for empty,
    unrecognised or unreadable headers. A successful probe does not promise that ``decode_image`` succeeds.
    """
    view = memoryview(data)
    if len(view) == 0:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    kind = detect_format(view)
    if kind == "png":
        return _probe_png(bytes(view[:64]), name)
    if kind == "jpeg":
        return _probe_jpeg(view, name)
    if kind == "tiff":
        return _probe_tiff(data if isinstance(data, bytes) else bytes(view), name)  # bytes: shared, not copied
    if kind == "dicom":
        from medsr_dist.io.dicom import probe_dicom

        return probe_dicom(data, name)
    raise ImageDecodeError(
        name, f"not a recognised image format (PNG, JPEG, TIFF or DICOM); file starts with {bytes(view[:8])!r}"
    )


def _probe_png(head: bytes, name: str) -> ImageProbe:
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise ImageDecodeError(name, "corrupt PNG: no IHDR chunk at the start")
    length, = struct.unpack(">I", head[8:12])
    if length != 13 or zlib.crc32(head[12:29]) & 0xFFFFFFFF != struct.unpack(">I", head[29:33])[0]:
        raise ImageDecodeError(name, "corrupt PNG: damaged IHDR chunk")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    channels = {0: 1, 2: 3, 3: 3, 4: 4, 6: 4}.get(colour)  # grey+alpha decodes as RGBA, palette as RGB
    if channels is None or width == 0 or height == 0:
        raise ImageDecodeError(name, f"corrupt PNG: IHDR says {width}x{height}, colour type {colour}")
    return ImageProbe("png", height, width, 1, channels, 16 if depth == 16 else 8)


def _probe_jpeg(view: memoryview, name: str) -> ImageProbe:
    # Walk the marker segments up to the first SOFn; only segment headers are touched.
    pos, end = 2, len(view)
    while pos + 4 <= end:
        if view[pos] != 0xFF:
            break
        marker = view[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            break
        (length,) = struct.unpack(">H", view[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 10 > end:
                break
            precision, height, width, components = struct.unpack(">BHHB", view[pos + 4 : pos + 10])
            if height == 0 or width == 0:
                raise ImageDecodeError(name, f"JPEG frame header says {width}x{height} (DNL height is not supported)")
            return ImageProbe("jpeg", height, width, 1, components, precision)
        pos += 2 + length
    raise ImageDecodeError(name, "corrupt JPEG: no frame header (SOFn) before the image data")


def _probe_tiff(raw: bytes, name: str) -> ImageProbe:
    try:
        with tifffile.TiffFile(io.BytesIO(raw)) as tif:
            pages = len(tif.pages)
            if pages == 0:
                raise ImageDecodeError(name, "TIFF has no image pages")
            page = tif.pages.first
            height, width = int(page.imagelength), int(page.imagewidth)
            depth = int(getattr(page, "imagedepth", 1) or 1)
            samples, bits = int(page.samplesperpixel), int(page.bitspersample)
            extrasamples = len(page.extrasamples)
            photometric = int(page.photometric)
    except ImageDecodeError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged headers
        raise ImageDecodeError(name, f"corrupt TIFF header ({type(exc).__name__}: {exc})") from exc
    channels = samples
    if photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE) and samples == 2:
        channels = 4  # grey+alpha decodes as RGBA
    elif photometric == tifffile.PHOTOMETRIC.PALETTE or (photometric == tifffile.PHOTOMETRIC.YCBCR and not extrasamples):
        channels = 3
    return ImageProbe("tiff", height, width, pages * depth, channels, bits)


def single_frame_pixels(image: MedicalImage, name: str, purpose: str) -> np.ndarray:
    """``image.pixels`` (H, W, C) of a single-frame image, for consumers that take one 2-D image (training
    preparation, evaluation, previews). Raises ImageDecodeError naming ``name`` and ``purpose`` for a multi-frame
    one rather than letting an (F, H, W, C) array be misread as (H, W, C)."""
    if image.meta.frames > 1:
        raise ImageDecodeError(
            name, f"multi-frame image ({image.meta.frames} frames) is not supported for {purpose} yet; "
            "the nightly enhance job takes it"
        )
    return image.pixels


def output_extension(meta: ImageMeta | str) -> str:
    """File extension for writing an image of ``meta``'s form (or a format name): .png .jpg .tif .dcm."""
    kind = meta if isinstance(meta, str) else meta.format
    try:
        return _EXTENSIONS[kind]
    except KeyError:
        raise ValueError(f"unknown image format {kind!r}; expected one of {FORMATS}") from None


def encode_image(
    pixels: np.ndarray,
    meta: ImageMeta,
    header: bytes | None = None,
    *,
    scale: float = 1.0,
    provenance: Mapping[str, str] | None = None,
    dicom_compression: str = "none",
) -> bytes:
    """Encode ``pixels`` in the form described by ``meta`` (usually the source image's meta).

    pixels: float (H', W', C) with C = meta.channels (or (H', W') when C = 1) in [0, 1] (clipped), RGB(A),
    display-oriented — (F, H', W', C) with F = meta.frames for a multi-frame DICOM meta —; H', W' may differ from
    the source (super-resolution by ``scale``). Values become ``rint(p * maxval) - offset`` in meta.dtype (maxval
    255 / 65535, DICOM ``2**bits_stored - 1``; offset ``2**(bits_stored-1)`` for signed DICOM, else 0), exactly
    inverting ``decode_image``; MONOCHROME1 is re-inverted. PNG/TIFF are lossless, JPEG uses quality 95.
    ``provenance`` (str -> str) is merged over ``meta.text`` and written as PNG tEXt/iTXt chunks, a TIFF
    ImageDescription JSON object or a JPEG COM JSON object; for DICOM (``header`` = the source
    ``MedicalImage.header``, required) it becomes the derived object's DerivationDescription and equipment entry,
    and the pixel spacing (also in functional groups) is divided by ``scale``. ``dicom_compression`` (DICOM only):
    "none" (Explicit VR Little Endian), "rle" (RLE Lossless) or "jpeg2000-lossless" — never lossy.

    Raises ValueError for a shape or channel-count mismatch, non-finite pixels, a DICOM meta without header or an
    unknown ``dicom_compression``.
    """
    array = np.asarray(pixels)
    if meta.frames > 1:
        if array.ndim == 3 and meta.channels == 1:
            array = array[..., None]
        if array.ndim != 4 or array.shape[0] != meta.frames or array.shape[3] != meta.channels or min(array.shape[1:3]) < 1:
            raise ValueError(
                f"pixels must be ({meta.frames}, H, W, {meta.channels}) for a {meta.frames}-frame {meta.photometric} "
                f"image, got {array.shape}"
            )
    else:
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] != meta.channels or min(array.shape[:2]) < 1:
            raise ValueError(f"pixels must be (H, W, {meta.channels}) for {meta.photometric}, got {array.shape}")
    if dicom_compression not in DICOM_COMPRESSIONS:
        raise ValueError(f"dicom_compression must be one of {DICOM_COMPRESSIONS}, got {dicom_compression!r}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"pixels must be floating point in [0, 1], got {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError("pixels contain NaN or infinity")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if meta.format == "dicom" and header is None:
        raise ValueError("writing DICOM needs the source dataset header (MedicalImage.header)")
    text = {**meta.text, **dict(provenance or {})}

    maxval = meta.maxval
    stored = np.rint(np.clip(array.astype(np.float32, copy=False), 0.0, 1.0) * np.float32(maxval))
    if meta.signed:  # offset values in [0, maxval] -> signed stored values; MONOCHROME1 inverts before the shift
        offset_values = stored.astype(np.int32)
        if meta.photometric == "MONOCHROME1":
            offset_values = maxval - offset_values
        stored = (offset_values - meta.offset).astype(meta.dtype)
    else:
        stored = stored.astype(meta.dtype)
        if meta.photometric == "MONOCHROME1":
            stored = np.asarray(maxval, dtype=meta.dtype) - stored

    if meta.format == "png":
        return _encode_png(stored, text)
    if meta.format == "jpeg":
        return _encode_jpeg(stored, text)
    if meta.format == "tiff":
        return _encode_tiff(stored, meta, text)
    from medsr_dist.io.dicom import encode_dicom

    return encode_dicom(stored, meta, header, scale=scale, provenance=provenance, compression=dicom_compression)


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers


def _from_cv2(array: np.ndarray, name: str) -> np.ndarray:
    """OpenCV (H, W[, C]) BGR(A) -> (H, W, C) RGB(A) with C in {1, 3, 4}."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.shape[2] == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    if array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA)
    if array.shape[2] == 1:
        return array
    raise ImageDecodeError(name, f"unsupported channel count {array.shape[2]}")


def _to_cv2(stored: np.ndarray) -> np.ndarray:
    if stored.shape[2] == 1:
        return stored[:, :, 0]
    if stored.shape[2] == 3:
        return cv2.cvtColor(stored, cv2.COLOR_RGB2BGR)
    return cv2.cvtColor(stored, cv2.COLOR_RGBA2BGRA)


def _normalise(stored: np.ndarray, maxval: int) -> np.ndarray:
    return stored.astype(np.float32) / np.float32(maxval)


def _photometric_for(channels: int) -> str:
    return {1: "MONOCHROME2", 3: "RGB", 4: "RGBA"}[channels]


def _text_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _image(stored: np.ndarray, fmt: str, name: str, text: dict[str, str], photometric: str | None = None):
    if stored.dtype not in (np.uint8, np.uint16):
        raise ImageDecodeError(name, f"unsupported sample type {stored.dtype} (only 8- and 16-bit unsigned)")
    dtype = stored.dtype.name
    photometric = photometric or _photometric_for(stored.shape[2])
    if photometric == "MONOCHROME1":
        stored = np.asarray(_MAXVAL[dtype], dtype=stored.dtype) - stored
    meta = ImageMeta(
        format=fmt,
        dtype=dtype,
        bits_stored=8 if dtype == "uint8" else 16,
        channels=stored.shape[2],
        photometric=photometric,
        text=text,
    )
    return MedicalImage(pixels=_normalise(stored, _MAXVAL[dtype]), meta=meta)


# ----------------------------------------------------------------------------------------------------------------
# PNG


def _png_chunks(data: bytes, name: str) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk up to IEND; raises on truncation or a CRC mismatch."""
    chunks, pos, end = [], len(_PNG_SIGNATURE), len(data)
    while True:
        if pos + 8 > end:
            raise ImageDecodeError(name, f"truncated PNG: data ends at byte {end} before the IEND chunk")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        if pos + 12 + length > end:
            raise ImageDecodeError(
                name, f"truncated PNG: chunk {ctype!r} needs {length} bytes but the data ends at byte {end}"
            )
        payload = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(ctype + payload) & 0xFFFFFFFF != crc:
            raise ImageDecodeError(name, f"corrupt PNG: CRC mismatch in chunk {ctype!r} at byte {pos}")
        chunks.append((ctype, payload))
        pos += 12 + length
        if ctype == b"IEND":
            return chunks


def _png_text(chunks: list[tuple[bytes, bytes]]) -> dict[str, str]:
    text: dict[str, str] = {}
    for ctype, payload in chunks:
        try:
            if ctype == b"tEXt":
                key, _, value = payload.partition(b"\x00")
                text[key.decode("latin-1")] = value.decode("latin-1")
            elif ctype == b"zTXt":
                key, _, rest = payload.partition(b"\x00")
                text[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
            elif ctype == b"iTXt":
                key, _, rest = payload.partition(b"\x00")
                compressed, rest = rest[0], rest[2:]
                _language, _, rest = rest.partition(b"\x00")
                _translated, _, value = rest.partition(b"\x00")
                if compressed:
                    value = zlib.decompress(value)
                text[key.decode("latin-1")] = value.decode("utf-8")
        except (zlib.error, UnicodeDecodeError, IndexError):
            continue  # a damaged text chunk does not make the image unreadable
    return text


def _decode_png(data, name: str) -> MedicalImage:
    raw = bytes(data)
    chunks = _png_chunks(raw, name)
    if not chunks or chunks[0][0] != b"IHDR":
        raise ImageDecodeError(name, "corrupt PNG: first chunk is not IHDR")
    array = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ImageDecodeError(name, "corrupt PNG: the image data could not be decoded")
    return _image(_from_cv2(array, name), "png", name, _png_text(chunks))


def _png_text_chunk(key: str, value: str) -> bytes:
    try:
        keyword = key.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"PNG text keyword must be Latin-1: {key!r}") from None
    if not 1 <= len(keyword) <= 79 or b"\x00" in keyword:
        raise ValueError(f"PNG text keyword must be 1..79 Latin-1 characters: {key!r}")
    try:
        ctype, payload = b"tEXt", keyword + b"\x00" + value.encode("latin-1")
    except UnicodeEncodeError:  # iTXt carries UTF-8: flag 0 (uncompressed), method 0, empty language/translation
        ctype, payload = b"iTXt", keyword + b"\x00\x00\x00\x00\x00" + value.encode("utf-8")
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def _encode_png(stored: np.ndarray, text: Mapping[str, str]) -> bytes:
    ok, buf = cv2.imencode(".png", _to_cv2(stored))
    if not ok:
        raise ValueError(f"OpenCV could not encode a PNG of shape {stored.shape} {stored.dtype}")
    png = buf.tobytes()
    if not text:
        return png
    iend = len(png) - 12  # OpenCV ends every PNG with the 12-byte IEND chunk
    if png[iend + 4 : iend + 8] != b"IEND":
        raise ValueError("OpenCV wrote a PNG that does not end with IEND; cannot add text chunks")
    extra = b"".join(_png_text_chunk(k, _text_value(v)) for k, v in text.items())
    return png[:iend] + extra + png[iend:]


# ----------------------------------------------------------------------------------------------------------------
# JPEG


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of the header segments between SOI and SOS (start = the 0xFF of the marker)."""
    segments, pos, end = [], 2, len(data)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        segments.append((marker, pos, pos + 2 + length))
        if marker in (0xDA, 0xD9):  # start of scan / end of image: header is over
            break
        pos += 2 + length
    return segments


def _jpeg_text(data: bytes) -> dict[str, str]:
    text: dict[str, str] = {}
    comments = []
    for marker, start, end in _jpeg_segments(data):
        if marker != 0xFE:
            continue
        body = data[start + 4 : end]
        try:
            value = body.decode("utf-8")
        except UnicodeDecodeError:
            value = body.decode("latin-1")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            text.update({str(k): _text_value(v) for k, v in parsed.items()})
        else:
            comments.append(value)
    if comments:
        text["comment"] = "\n".join(comments)
    return text


def _decode_jpeg(data, name: str) -> MedicalImage:
    raw = bytes(data)
    if raw.rfind(b"\xff\xd9") < 0:
        raise ImageDecodeError(name, "truncated JPEG: no end-of-image marker")
    # ANYCOLOR keeps grey as one channel and, unlike UNCHANGED, applies the EXIF orientation.
    array = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_ANYCOLOR)
    if array is None:
        raise ImageDecodeError(name, "corrupt JPEG: the image data could not be decoded")
    return _image(_from_cv2(array, name), "jpeg", name, _jpeg_text(raw))


def _encode_jpeg(stored: np.ndarray, text: Mapping[str, str]) -> bytes:
    if stored.dtype != np.uint8 or stored.shape[2] not in (1, 3):
        raise ValueError(f"JPEG holds 8-bit grey or RGB, got {stored.dtype} with {stored.shape[2]} channels")
    ok, buf = cv2.imencode(".jpg", _to_cv2(stored), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError(f"OpenCV could not encode a JPEG of shape {stored.shape}")
    jpeg = buf.tobytes()
    if not text:
        return jpeg
    body = json.dumps({k: _text_value(v) for k, v in text.items()}, ensure_ascii=False, sort_keys=True)
    body_bytes = body.encode("utf-8")
    if len(body_bytes) > 65533:
        raise ValueError(f"JPEG comment would be {len(body_bytes)} bytes; a COM segment holds at most 65533")
    # After the APPn segments (JFIF must stay first), before the tables.
    insert_at = 2
    for marker, _start, end in _jpeg_segments(jpeg):
        if 0xE0 <= marker <= 0xEF:
            insert_at = end
        else:
            break
    segment = b"\xff\xfe" + struct.pack(">H", len(body_bytes) + 2) + body_bytes
    return jpeg[:insert_at] + segment + jpeg[insert_at:]


# ----------------------------------------------------------------------------------------------------------------
# TIFF


def _tiff_text(description: str | None) -> dict[str, str]:
    if not description:
        return {}
    try:
        parsed = json.loads(description)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        if set(parsed) <= {"shape"}:  # tifffile's own shape record, not user text
            return {}
        return {str(k): _text_value(v) for k, v in parsed.items()}
    return {"ImageDescription": description}


def _decode_tiff(data, name: str) -> MedicalImage:
    try:
        with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
            pages = len(tif.pages)
            if pages == 0:
                raise ImageDecodeError(name, "TIFF has no image pages")
            if pages > 1:
                raise ImageDecodeError(name, f"multi-page TIFF ({pages} pages) is not supported yet")
            page = tif.pages.first
            photometric = int(page.photometric)
            compression = int(page.compression)
            extrasamples = tuple(int(e) for e in page.extrasamples)
            axes = page.axes
            description = page.description
            array = page.asarray()
    except ImageDecodeError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files or missing codecs
        raise ImageDecodeError(name, f"corrupt or unsupported TIFF ({type(exc).__name__}: {exc})") from exc
    if array.dtype == np.bool_ or array.dtype.kind != "u":
        raise ImageDecodeError(name, f"unsupported TIFF sample type {array.dtype} (only 8- and 16-bit unsigned)")
    if array.ndim == 3 and axes.startswith("S"):
        array = np.moveaxis(array, 0, -1)  # planar configuration "separate"
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ImageDecodeError(name, f"unsupported TIFF layout {axes} {array.shape}")
    channels = array.shape[2]
    if photometric == tifffile.PHOTOMETRIC.MINISWHITE and channels == 1:
        tone = "MONOCHROME1"
    elif photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE) and channels == 2:
        if photometric == tifffile.PHOTOMETRIC.MINISWHITE:
            top = np.iinfo(array.dtype).max
            array = np.concatenate([top - array[..., :1], array[..., 1:]], axis=2)
        array = np.concatenate([array[..., :1]] * 3 + [array[..., 1:]], axis=2)  # grey+alpha -> RGBA
        tone = "RGBA"
    elif photometric == tifffile.PHOTOMETRIC.MINISBLACK and channels == 1:
        tone = "MONOCHROME2"
    elif photometric == tifffile.PHOTOMETRIC.YCBCR and compression == tifffile.COMPRESSION.JPEG and channels == 3:
        tone = "RGB"  # scanners' YCbCr JPEG pages: libjpeg (via imagecodecs) already converted them to RGB
    elif photometric == tifffile.PHOTOMETRIC.RGB and channels in (3, 4):
        tone = "RGB" if channels == 3 else "RGBA"
        if channels == 4 and not extrasamples:
            raise ImageDecodeError(name, "TIFF RGB with a fourth sample that is not marked as alpha")
    else:
        try:
            label = tifffile.PHOTOMETRIC(photometric).name
        except ValueError:
            label = str(photometric)
        raise ImageDecodeError(name, f"TIFF photometric {label} with {channels} samples is not supported yet")
    return _image(np.ascontiguousarray(array), "tiff", name, _tiff_text(description), tone)


def _encode_tiff(stored: np.ndarray, meta: ImageMeta, text: Mapping[str, str]) -> bytes:
    kwargs: dict[str, Any] = {}
    if meta.photometric in ("MONOCHROME1", "MONOCHROME2"):
        data = stored[:, :, 0]
        kwargs["photometric"] = "miniswhite" if meta.photometric == "MONOCHROME1" else "minisblack"
    else:
        data = stored
        kwargs["photometric"] = "rgb"
        if stored.shape[2] == 4:
            kwargs["extrasamples"] = ["unassalpha"]
    if text:
        # ImageDescription is an ASCII tag: JSON \u escapes keep non-ASCII text exact.
        kwargs["description"] = json.dumps({k: _text_value(v) for k, v in text.items()}, ensure_ascii=True)
    buf = io.BytesIO()
    # Deflate is lossless, decodable by libtiff and by tifffile without extra codecs.
    tifffile.imwrite(buf, data, compression="zlib", metadata=None, **kwargs)
    return buf.getvalue()
