"""Headers of compressed codestreams, parsed without decoding: JPEG (SOF0..SOF15), JPEG-LS (SOF55), JPEG 2000 /
HTJ2K (SIZ, raw codestream or JP2 box-wrapped) and DICOM RLE (the 64-byte segment table).

A decoder sizes its output from the codestream's own header, not from the container's (DICOM Rows/Columns, a
TIFF page's ImageWidth/ImageLength), so a file whose container says 64 x 64 but whose codestream says 30000 x 30000
passes every header limit and then allocates gigabytes. The DICOM and TIFF readers (:mod:`medsr_dist.io.dicom`,
:mod:`medsr_dist.io.raster`) parse each frame's header here and hold it against the container **before** any
decoder runs. Pure Python and ``struct`` only: no codec is imported.

Every parser raises :class:`CodestreamError` (a ValueError) with a reason that quotes only structural numbers
(dimensions, counts, offsets), never text from the file.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["CodestreamError", "FrameHeader", "jpeg_frame_header", "j2k_frame_header", "rle_segment_count",
           "frame_header"]

#: JPEG markers in C0..CF that are not frame headers: DHT (C4), JPG (C8), DAC (CC).
_NOT_SOF = (0xC4, 0xC8, 0xCC)
_SOF55 = 0xF7  # JPEG-LS frame header (ISO 14495-1)
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
#: Largest number of JPEG marker segments / JP2 boxes walked before the frame header: real files have tens.
MAX_SEGMENTS = 1024


class CodestreamError(ValueError):
    """A codestream header that is missing, truncated or malformed. ``str()`` is the reason."""


@dataclass(frozen=True)
class FrameHeader:
    """What a codestream's header says: ``kind`` ("JPEG SOF<n>", "JPEG-LS SOF55", "JPEG 2000 SIZ"), pixels per
    row and rows, components (samples per pixel) and precision (bits per sample, the largest over components)."""

    kind: str
    width: int
    height: int
    components: int
    precision: int


def jpeg_frame_header(data: bytes | memoryview) -> FrameHeader:
    """The frame header of a JPEG or JPEG-LS stream (SOI, then marker segments up to the first SOFn / SOF55).

    Raises CodestreamError: no SOI, no frame header before the scan data, a truncated segment, a height of 0
    (defined later by a DNL marker, which a size check cannot see), or too many segments."""
    view = memoryview(data)
    end = len(view)
    if end < 4 or view[0] != 0xFF or view[1] != 0xD8:
        raise CodestreamError("not a JPEG stream (no SOI marker)")
    pos = 2
    for _ in range(MAX_SEGMENTS):
        while pos < end and view[pos] == 0xFF and pos + 1 < end and view[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 4 > end or view[pos] != 0xFF:
            break
        marker = view[pos + 1]
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI / SOS before any frame header
            break
        (length,) = struct.unpack(">H", view[pos + 2 : pos + 4])
        if length < 2:
            raise CodestreamError(f"JPEG marker segment at byte {pos} has length {length}")
        if (0xC0 <= marker <= 0xCF and marker not in _NOT_SOF) or marker == _SOF55:
            if length < 8 or pos + 10 > end:
                raise CodestreamError("truncated JPEG frame header")
            precision, height, width, components = struct.unpack(">BHHB", view[pos + 4 : pos + 10])
            kind = "JPEG-LS SOF55" if marker == _SOF55 else f"JPEG SOF{marker - 0xC0}"
            if height == 0 or width == 0 or components == 0:
                raise CodestreamError(f"{kind} frame header says {width} x {height} pixels, {components} components "
                                      "(a height defined later by DNL is not supported)")
            return FrameHeader(kind, width, height, components, precision)
        pos += 2 + length
    raise CodestreamError("JPEG stream with no frame header (SOFn) before its scan data")


def _j2k_codestream_offset(view: memoryview) -> int:
    """Offset of the raw codestream (SOC marker) in ``view``: 0 for a raw codestream, else inside the JP2 'jp2c'
    box."""
    if bytes(view[:2]) == b"\xff\x4f":
        return 0
    if bytes(view[:12]) != _JP2_SIGNATURE:
        raise CodestreamError("not a JPEG 2000 codestream (no SOC marker, no JP2 signature box)")
    pos, end = 0, len(view)
    for _ in range(MAX_SEGMENTS):
        if pos + 8 > end:
            break
        length, box = struct.unpack(">I4s", view[pos : pos + 8])
        header = 8
        if length == 1:
            if pos + 16 > end:
                break
            (length,) = struct.unpack(">Q", view[pos + 8 : pos + 16])
            header = 16
        if box == b"jp2c":
            return pos + header
        if length == 0 or length < header:  # 0: box runs to the end of the file, and it is not the codestream
            break
        pos += length
    raise CodestreamError("JP2 file without a contiguous codestream box (jp2c)")


def j2k_frame_header(data: bytes | memoryview) -> FrameHeader:
    """The image and component sizes of a JPEG 2000 / HTJ2K codestream's SIZ marker segment (which must follow
    SOC), raw or in a JP2 file. Width and height are the reference grid's Xsiz - XOsiz and Ysiz - YOsiz."""
    view = memoryview(data)
    start = _j2k_codestream_offset(view)
    siz = start + 2
    if bytes(view[start : start + 2]) != b"\xff\x4f" or bytes(view[siz : siz + 2]) != b"\xff\x51":
        raise CodestreamError("JPEG 2000 codestream does not start with SOC followed by SIZ")
    if siz + 40 > len(view):
        raise CodestreamError("truncated JPEG 2000 SIZ marker segment")
    length, _rsiz, xsiz, ysiz, xosiz, yosiz, _xt, _yt, _xto, _yto, components = struct.unpack(
        ">HHIIIIIIIIH", view[siz + 2 : siz + 40])
    if length != 38 + 3 * components or siz + 2 + length > len(view):
        raise CodestreamError(f"JPEG 2000 SIZ marker segment of length {length} does not fit {components} components")
    if xsiz <= xosiz or ysiz <= yosiz or components == 0:
        raise CodestreamError(f"JPEG 2000 SIZ says an empty image ({components} components)")
    precision = max((view[siz + 40 + 3 * c] & 0x7F) + 1 for c in range(components))
    return FrameHeader("JPEG 2000 SIZ", xsiz - xosiz, ysiz - yosiz, components, precision)


def rle_segment_count(data: bytes | memoryview) -> int:
    """The number of segments in a DICOM RLE frame (PS3.5 Annex G: a 64-byte header of 16 little-endian 32-bit
    numbers, the count then up to 15 offsets), after checking that the first offset is 64, the offsets increase
    and all lie inside the frame."""
    view = memoryview(data)
    if len(view) < 64:
        raise CodestreamError(f"RLE frame of {len(view)} bytes is shorter than its 64-byte header")
    count, *offsets = struct.unpack("<16I", view[:64])
    if not 1 <= count <= 15:
        raise CodestreamError(f"RLE header says {count} segments (1 to 15 allowed)")
    used = offsets[:count]
    if used[0] != 64 or any(b <= a for a, b in zip(used, used[1:])) or used[-1] >= len(view):
        raise CodestreamError("RLE header's segment offsets are not increasing offsets inside the frame")
    return count


def frame_header(kind: str, data: bytes | memoryview) -> FrameHeader:
    """``kind``: "jpeg" (JPEG and JPEG-LS) or "j2k" (JPEG 2000, HTJ2K)."""
    if kind == "jpeg":
        return jpeg_frame_header(data)
    if kind == "j2k":
        return j2k_frame_header(data)
    raise ValueError(f"unknown codestream kind {kind!r}")
