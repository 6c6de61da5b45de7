"""PNG, JPEG and TIFF codecs of medsr-dist image I/O: header probes, decoders and encoders.

Called through the format dispatch in :mod:`medsr_dist.io.image` (``decode_image``, ``probe_image``,
``encode_image``), which documents the pixel contract: decoders return a :class:`MedicalImage` with float32
(H, W, C) pixels in [0, 1], RGB(A), higher = brighter; encoders take *stored* samples (uint8/uint16 (H, W, C),
MONOCHROME1 already re-inverted) and write the text metadata (PNG tEXt/iTXt, JPEG COM JSON, TIFF
ImageDescription JSON).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import tifffile

from medsr_dist.io.codestream import CodestreamError, frame_header
from medsr_dist.io.medical_image import MAXVAL, ImageDecodeError, ImageMeta, ImageProbe, MedicalImage

JPEG_QUALITY = 95
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: IFDs (pages) a TIFF may chain before it is refused unread: far more than any page count medsr-dist reads
#: (one), few enough that walking them costs microseconds.
MAX_TIFF_IFDS = 1024
#: Longest PNG text value kept (after inflating zTXt/iTXt), and most text kept per file, in bytes: provenance and
#: scanner notes are far shorter; longer text is dropped rather than inflated without bound into memory and outputs.
MAX_PNG_TEXT_BYTES = 64 * 1024
MAX_PNG_TEXT_TOTAL = 256 * 1024


def probe_png(head: bytes, name: str) -> ImageProbe:
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


def probe_jpeg(view: memoryview, name: str) -> ImageProbe:
    """The first frame header (SOFn / SOF55) of a JPEG file, walking only marker segment headers."""
    try:
        header = frame_header("jpeg", view)
    except CodestreamError as exc:
        raise ImageDecodeError(name, f"corrupt JPEG: {exc}") from None
    return ImageProbe("jpeg", header.height, header.width, 1, header.components, header.precision)


def count_tiff_ifds(raw: bytes, name: str, max_ifds: int = MAX_TIFF_IFDS) -> int:
    """The number of IFDs (pages) in the TIFF ``raw``, walking the chain of IFD offsets itself (classic and
    BigTIFF) before tifffile does: tifffile follows the chain to its end and recognises a loop only after about
    100 IFDs, so a few hundred crafted bytes whose last IFD points back to an earlier one made it spin, its memory
    growing, for ever. An offset outside the file ends the chain there (tifffile warns and stops too).

    Raises:
        ImageDecodeError: the chain returns to an IFD it has visited, or has more than ``max_ifds`` IFDs.
    """
    order = "<" if raw[:2] == b"II" else ">"
    big = len(raw) >= 16 and raw[2:4] in (b"+\x00", b"\x00+")
    offset_format, count_format, entry_size = (order + "Q", order + "Q", 20) if big else (order + "I", order + "H", 12)
    offset_size, count_size = struct.calcsize(offset_format), struct.calcsize(count_format)
    start = 8 if big else 4
    if len(raw) < start + offset_size:
        raise ImageDecodeError(name, "corrupt TIFF header: truncated before the first IFD offset")
    offset, = struct.unpack_from(offset_format, raw, start)
    seen: dict[int, int] = {}  # IFD offset -> its index in the chain
    while offset and offset + count_size <= len(raw):
        if offset in seen:
            raise ImageDecodeError(name, f"corrupt TIFF: IFD {len(seen) - 1} points back to IFD {seen[offset]} "
                                         "(a loop in the IFD chain)")
        if len(seen) == max_ifds:
            raise ImageDecodeError(name, f"TIFF with more than {max_ifds} IFDs (pages): refused unread")
        seen[offset] = len(seen)
        entries, = struct.unpack_from(count_format, raw, offset)
        next_at = offset + count_size + entries * entry_size
        if next_at + offset_size > len(raw):
            break
        offset, = struct.unpack_from(offset_format, raw, next_at)
    return len(seen)


def probe_tiff(raw: bytes, name: str) -> ImageProbe:
    count_tiff_ifds(raw, name)
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
        stored = np.asarray(MAXVAL[dtype], dtype=stored.dtype) - stored
    meta = ImageMeta(
        format=fmt,
        dtype=dtype,
        bits_stored=8 if dtype == "uint8" else 16,
        channels=stored.shape[2],
        photometric=photometric,
        text=text,
    )
    return MedicalImage(pixels=_normalise(stored, MAXVAL[dtype]), meta=meta)


# ----------------------------------------------------------------------------------------------------------------
# PNG


def _png_chunks(data: bytes, name: str) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk up to IEND; raises on truncation or a CRC mismatch."""
    chunks, pos, end = [], len(PNG_SIGNATURE), len(data)
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


class _TextTooLong(ValueError):
    pass


def _inflate_text(compressed: bytes) -> bytes:
    """A compressed PNG text value, inflated to at most :data:`MAX_PNG_TEXT_BYTES` (a zTXt of a few KiB can
    inflate to many MiB, and the text is copied into the output's metadata)."""
    inflater = zlib.decompressobj()
    value = inflater.decompress(compressed, MAX_PNG_TEXT_BYTES + 1)
    if len(value) > MAX_PNG_TEXT_BYTES:
        raise _TextTooLong
    return value


def _png_text(chunks: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) as {keyword: value}; a damaged chunk, or a value longer than
    :data:`MAX_PNG_TEXT_BYTES` (inflated), is dropped, and so is any chunk past :data:`MAX_PNG_TEXT_TOTAL` bytes of
    text: neither makes the image unreadable, and neither is carried into an output."""
    text: dict[str, str] = {}
    total = 0
    for ctype, payload in chunks:
        try:
            if ctype == b"tEXt":
                key, _, value = payload.partition(b"\x00")
            elif ctype == b"zTXt":
                key, _, rest = payload.partition(b"\x00")
                value = _inflate_text(rest[1:])
            elif ctype == b"iTXt":
                key, _, rest = payload.partition(b"\x00")
                compressed, rest = rest[0], rest[2:]
                _language, _, rest = rest.partition(b"\x00")
                _translated, _, value = rest.partition(b"\x00")
                if compressed:
                    value = _inflate_text(value)
            else:
                continue
            if len(value) > MAX_PNG_TEXT_BYTES or total + len(value) > MAX_PNG_TEXT_TOTAL:
                continue
            text[key.decode("latin-1")] = value.decode("utf-8" if ctype == b"iTXt" else "latin-1")
            total += len(value)
        except (zlib.error, UnicodeDecodeError, IndexError, _TextTooLong):
            continue  # a damaged or oversized text chunk does not make the image unreadable
    return text


def decode_png(data, name: str) -> MedicalImage:
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


def encode_png(stored: np.ndarray, text: Mapping[str, str]) -> bytes:
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


def decode_jpeg(data, name: str) -> MedicalImage:
    raw = bytes(data)
    if raw.rfind(b"\xff\xd9") < 0:
        raise ImageDecodeError(name, "truncated JPEG: no end-of-image marker")
    # ANYCOLOR keeps grey as one channel and, unlike UNCHANGED, applies the EXIF orientation.
    array = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_ANYCOLOR)
    if array is None:
        raise ImageDecodeError(name, "corrupt JPEG: the image data could not be decoded")
    return _image(_from_cv2(array, name), "jpeg", name, _jpeg_text(raw))


def encode_jpeg(stored: np.ndarray, text: Mapping[str, str]) -> bytes:
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


#: TIFF compressions whose strips/tiles are codestreams with their own size header: JPEG, JPEG 2000 (Aperio's and
#: the registered one).
_TIFF_CODESTREAMS = {7: "jpeg", 33003: "j2k", 33005: "j2k", 34712: "j2k"}


def _check_tiff_codestreams(page, raw: bytes, name: str) -> None:
    """Hold each JPEG / JPEG 2000 strip's or tile's own frame header against the page: a strip is ImageWidth wide
    and at most RowsPerStrip high, a tile TileWidth x TileLength, with SamplesPerPixel components (1 when planar)
    of at most BitsPerSample bits. A decoder sizes its buffer from the codestream, so a 64 x 64 page whose strip
    says 30000 x 30000 would allocate gigabytes (and tifffile even returns a 'successful' 64 x 64 crop of it)."""
    kind = _TIFF_CODESTREAMS.get(int(page.compression))
    if kind is None:
        return
    if page.is_tiled:
        width, height, what = int(page.tilewidth), int(page.tilelength), "tile"
    else:
        width, height, what = int(page.imagewidth), int(page.rowsperstrip or page.imagelength), "strip"
    samples, bits = int(page.samplesperpixel), int(page.bitspersample)
    for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
        if not count:
            continue
        try:
            header = frame_header(kind, memoryview(raw)[offset : offset + count])
        except CodestreamError as exc:
            raise ImageDecodeError(name, f"TIFF {what} {index}: {exc}; not decoded") from None
        wrong = []
        if header.width != width:
            wrong.append("TileWidth" if page.is_tiled else "ImageWidth")
        if header.height > height or (page.is_tiled and header.height != height):
            wrong.append("TileLength" if page.is_tiled else "RowsPerStrip/ImageLength")
        if header.components not in (samples, 1):
            wrong.append("SamplesPerPixel")
        if header.precision > bits:
            wrong.append("BitsPerSample")
        if wrong:
            raise ImageDecodeError(name, f"TIFF {what} {index}: its {header.kind} says {header.width} x {header.height} "
                                         f"pixels, {header.components} components of {header.precision} bits, the "
                                         f"page {width} x {height}, {samples} samples of {bits} bits: "
                                         f"{', '.join(wrong)} disagree; not decoded")


def decode_tiff(data, name: str) -> MedicalImage:
    data = bytes(data)
    count_tiff_ifds(data, name)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
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
            _check_tiff_codestreams(page, data, name)
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


def encode_tiff(stored: np.ndarray, meta: ImageMeta, text: Mapping[str, str]) -> bytes:
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
