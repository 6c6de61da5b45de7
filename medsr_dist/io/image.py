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

import functools
from collections.abc import Mapping

import numpy as np

from medsr_dist.io.dicom import MAX_INFLATED_BYTES, decode_dicom, encode_dicom, looks_like_dicom, probe_dicom
from medsr_dist.io.medical_image import (
    FORMATS,
    ImageDecodeError,
    ImageMeta,
    ImageProbe,
    MedicalImage,
    NotAnImageObject,
)
from medsr_dist.io.raster import (
    PNG_SIGNATURE,
    TIFF_MAGICS,
    decode_jpeg,
    decode_png,
    decode_tiff,
    encode_jpeg,
    encode_png,
    encode_tiff,
    probe_jpeg,
    probe_png,
    probe_tiff,
)

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

_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "dicom": ".dcm"}
DICOM_COMPRESSIONS = ("none", "rle", "jpeg2000-lossless")

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
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in TIFF_MAGICS:
        return "tiff"
    if looks_like_dicom(head):
        return "dicom"
    return None


def _clear_errors(function):
    """Whatever a parser or codec raises for damaged bytes (pydicom, tifffile, OpenCV and the pylibjpeg plugins
    raise ValueError, KeyError, struct.error, cv2.error, RuntimeError, the Rust plugins' PanicException (a
    BaseException) ... — fuzzing finds new ones) leaves as an
    ImageDecodeError naming the file and the original exception class only (its text may quote a header value),
    so every caller refuses bad input as bad input (an error row, a 4xx) and never as a failure worth retrying.
    MemoryError and RecursionError pass unchanged: they are the last line of defence's business."""

    @functools.wraps(function)
    def wrapper(data, name: str, *args, **kwargs):
        try:
            return function(data, name, *args, **kwargs)
        except (ImageDecodeError, MemoryError, RecursionError, KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - see the docstring; pyo3's PanicException is no Exception
            raise ImageDecodeError(name, f"corrupt or unsupported file (the decoder raised {type(exc).__name__})") \
                from exc

    return wrapper


@_clear_errors
def decode_image(data: bytes | bytearray | memoryview, name: str, *,
                 max_inflated_bytes: int = MAX_INFLATED_BYTES) -> MedicalImage:
    """Decode image file bytes (PNG, JPEG, TIFF or DICOM, detected by content) into a :class:`MedicalImage`.

    ``name`` is only used in error messages (the file name or key). Pixels are float32 (H, W, C) in [0, 1] —
    (F, H, W, C) for multi-frame DICOM —: stored value / 255 or 65535 for PNG/JPEG/TIFF, (value + offset) /
    (2**BitsStored - 1) for DICOM (offset 2**(BitsStored-1) for signed samples, else 0); RGB(A) order;
    MONOCHROME1 (DICOM, TIFF min-is-white) inverted to higher = brighter; DICOM YBR and PALETTE COLOR converted
    to RGB; JPEG EXIF orientation applied. Grey+alpha PNG/TIFF come back as RGBA. ``data`` is never modified.

    Raises NotAnImageObject for DICOM objects without an image (SR, waveform, RT plan, ...), ImageDecodeError
    (naming ``name`` and the reason) for empty, truncated, corrupt, unrecognised or unsupported input (multi-page
    TIFF, float samples, 32-bit or 1-bit DICOM, ...). Reasons never hold patient identifiers.

    Bounded before any decoder runs: every compressed frame's own header (JPEG/JPEG-LS SOF, JPEG 2000 SIZ, RLE
    segment table; JPEG strips/tiles of a TIFF page) must agree with the container's dimensions
    (:mod:`medsr_dist.io.codestream`), a Deflated DICOM body is inflated to at most ``max_inflated_bytes`` (and
    :data:`~medsr_dist.io.dicom.MAX_INFLATE_RATIO` times its size), and a DICOM header with more than
    :data:`~medsr_dist.io.dicom.MAX_DICOM_ITEMS` sequence items is refused unparsed.
    """
    if len(memoryview(data)) == 0:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    kind = detect_format(data)
    if kind == "png":
        return decode_png(data, name)
    if kind == "jpeg":
        return decode_jpeg(data, name)
    if kind == "tiff":
        return decode_tiff(data, name)
    if kind == "dicom":
        return decode_dicom(data, name, max_inflated_bytes=max_inflated_bytes)
    head = bytes(memoryview(data)[:8])
    raise ImageDecodeError(
        name, f"not a recognised image format (PNG, JPEG, TIFF or DICOM); file starts with {head!r}"
    )


@_clear_errors
def probe_image(data: bytes | bytearray | memoryview, name: str, *,
                max_inflated_bytes: int = MAX_INFLATED_BYTES) -> ImageProbe:
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
        return probe_png(bytes(view[:64]), name)
    if kind == "jpeg":
        return probe_jpeg(view, name)
    if kind == "tiff":
        return probe_tiff(data if isinstance(data, bytes) else bytes(view), name)  # bytes: shared, not copied
    if kind == "dicom":  # a deflated body is inflated (within max_inflated_bytes) to reach its header
        return probe_dicom(data, name, max_inflated_bytes=max_inflated_bytes)
    raise ImageDecodeError(
        name, f"not a recognised image format (PNG, JPEG, TIFF or DICOM); file starts with {bytes(view[:8])!r}"
    )





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
        return encode_png(stored, text)
    if meta.format == "jpeg":
        return encode_jpeg(stored, text)
    if meta.format == "tiff":
        return encode_tiff(stored, meta, text)
    return encode_dicom(stored, meta, header, scale=scale, provenance=provenance, compression=dicom_compression)


# ----------------------------------------------------------------------------------------------------------------
