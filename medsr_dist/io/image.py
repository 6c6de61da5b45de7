"""Decode and encode medical and ordinary images (PNG, JPEG, TIFF, DICOM) without losing their form.

``decode_image`` turns file bytes into a :class:`MedicalImage`: float32 pixels (H, W, C) in [0, 1], RGB(A)
order, display-oriented (higher is brighter), plus an :class:`ImageMeta` that remembers how the pixels were
stored (format, sample type, bits, channels, photometric, text, DICOM header summary). ``encode_image`` writes
new pixels — usually super-resolved, so of another size — back in that same form: 16-bit stays 16-bit, grey
stays grey, MONOCHROME1 stays MONOCHROME1, DICOM becomes a valid derived object of the same study. Provenance
(which model made the image) is written as PNG tEXt/iTXt, TIFF ImageDescription JSON, a JPEG COM segment or
DICOM derivation attributes, and text metadata is read back into ``ImageMeta.text``.

The format is detected from the content (magic bytes), never from the file name.
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
    "ImageMeta",
    "MedicalImage",
    "FORMATS",
    "detect_format",
    "decode_image",
    "encode_image",
    "output_extension",
]

FORMATS = ("png", "jpeg", "tiff", "dicom")
_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "dicom": ".dcm"}
_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2", "RGB", "RGBA")
_CHANNELS_FOR = {"MONOCHROME1": 1, "MONOCHROME2": 1, "RGB": 3, "RGBA": 4}
_MAXVAL = {"uint8": 255, "uint16": 65535}
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


@dataclass
class ImageMeta:
    """How an image was stored, so that a derived image can be written in the same form.

    format: "png" | "jpeg" | "tiff" | "dicom"; dtype: stored sample type "uint8" | "uint16";
    bits_stored: significant bits (DICOM BitsStored; 8 or 16 elsewhere); channels: 1, 3 or 4 as stored;
    photometric: "MONOCHROME1" (stored inverted: low value = bright) | "MONOCHROME2" | "RGB" | "RGBA";
    patient_id: DICOM PatientID, else None; text: text metadata of the file (PNG tEXt/zTXt/iTXt, TIFF
    ImageDescription — a JSON object there is unpacked into its keys —, JPEG COM); dicom: JSON-ready summary of
    the DICOM header (rescale slope/intercept, window centre/width lists, pixel spacing in mm [row, column],
    UIDs, modality, ...; see ``medsr_dist.io.dicom``), else None.
    """

    format: str
    dtype: str
    bits_stored: int
    channels: int
    photometric: str
    patient_id: str | None = None
    text: dict[str, str] = field(default_factory=dict)
    dicom: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.dtype not in _MAXVAL:
            raise ValueError(f"dtype must be uint8 or uint16, got {self.dtype!r}")
        if self.photometric not in _PHOTOMETRICS:
            raise ValueError(f"photometric must be one of {_PHOTOMETRICS}, got {self.photometric!r}")
        if self.channels != _CHANNELS_FOR[self.photometric]:
            raise ValueError(f"{self.photometric} has {_CHANNELS_FOR[self.photometric]} channels, not {self.channels}")
        limit = 8 if self.dtype == "uint8" else 16
        if not 1 <= self.bits_stored <= limit:
            raise ValueError(f"bits_stored {self.bits_stored} does not fit {self.dtype}")

    @property
    def maxval(self) -> int:
        """The stored value that means 1.0: ``2**bits_stored - 1`` for DICOM, the dtype maximum otherwise."""
        return (1 << self.bits_stored) - 1 if self.format == "dicom" else _MAXVAL[self.dtype]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ImageMeta:
        return cls(**json.loads(text))


@dataclass
class MedicalImage:
    """Display-ready pixels with the metadata needed to write a derived image in the source's form.

    pixels: float32 (H, W, C), C = meta.channels in {1, 3, 4}, range [0, 1], RGB(A) order, higher = brighter
    (MONOCHROME1 already inverted). header: DICOM only — the source dataset without PixelData as Explicit VR
    Little Endian Part 10 bytes, for ``encode_image``; None for other formats.
    """

    pixels: np.ndarray
    meta: ImageMeta
    header: bytes | None = None

    def __post_init__(self) -> None:
        if self.pixels.dtype != np.float32 or self.pixels.ndim != 3 or self.pixels.shape[2] != self.meta.channels:
            raise ValueError(
                f"pixels must be float32 (H, W, {self.meta.channels}), got {self.pixels.dtype} {self.pixels.shape}"
            )


# ----------------------------------------------------------------------------------------------------------------
# Format detection


def detect_format(data: bytes | bytearray | memoryview) -> str | None:
    """"png" | "jpeg" | "tiff" | "dicom" from the leading bytes, or None when none matches."""
    head = bytes(memoryview(data)[:132])
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

    ``name`` is only used in error messages (the file name or key). Pixels are float32 (H, W, C) in [0, 1]:
    stored value / 255 or 65535 for PNG/JPEG/TIFF, / (2**BitsStored - 1) for DICOM; RGB(A) order; MONOCHROME1
    (DICOM, TIFF min-is-white) inverted to higher = brighter; JPEG EXIF orientation applied. Grey+alpha PNG/TIFF
    come back as RGBA. ``data`` is never modified.

    Raises ImageDecodeError (naming ``name`` and the reason) for empty, truncated, corrupt, unrecognised or
    unsupported input (multi-frame DICOM, multi-page TIFF, signed/float samples, compressed DICOM without a
    decoder, ...).
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
) -> bytes:
    """Encode ``pixels`` in the form described by ``meta`` (usually the source image's meta).

    pixels: float (H', W', C) with C = meta.channels (or (H', W') when C = 1) in [0, 1] (clipped), RGB(A),
    display-oriented; H', W' may differ from the source (super-resolution by ``scale``). Values become
    ``rint(p * maxval)`` in meta.dtype (maxval 255 / 65535, DICOM ``2**bits_stored - 1``); MONOCHROME1 is
    re-inverted. PNG/TIFF are lossless, JPEG uses quality 95. ``provenance`` (str -> str) is merged over
    ``meta.text`` and written as PNG tEXt/iTXt chunks, a TIFF ImageDescription JSON object or a JPEG COM JSON
    object; for DICOM (``header`` = the source ``MedicalImage.header``, required) it becomes the derived
    object's DerivationDescription and equipment entry, and the pixel spacing is divided by ``scale``.

    Raises ValueError for a channel-count mismatch, non-finite pixels, or a DICOM meta without header.
    """
    array = np.asarray(pixels)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] != meta.channels or min(array.shape[:2]) < 1:
        raise ValueError(f"pixels must be (H, W, {meta.channels}) for {meta.photometric}, got {array.shape}")
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

    return encode_dicom(stored, meta, header, scale=scale, provenance=provenance)


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
