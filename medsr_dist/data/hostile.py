"""Small crafted files of every hostile class medsr-dist must refuse cheaply (issue #24), for the regression tests
(tests/test_hostile_files.py), the fuzz seeds and ``jobs/bench_hostile.py``.

Each builder returns the file's bytes, made from an honest file (pydicom's test files, OpenCV, tifffile) with one
structural lie patched in, so every other part of the file stays what a real archive would hold. ``size`` is what
the lie claims; tests use a few thousand pixels (harmless even on the code before the fix), the bench the issue's
30000 (gigabytes for a decoder that believes it).
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import tifffile
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medsr_dist.io.dicom import build_radiograph_dataset, dataset_to_bytes

__all__ = ["HOSTILE_CLASSES", "tiff_ifd_loop", "dicom_j2k_lie", "dicom_jpeg_lie", "dicom_jpeg_ls_lie",
           "dicom_rle_lie", "tiff_jpeg_strip_lie", "dicom_deflate_bomb", "dicom_sequence_flood", "png_text_bomb",
           "dicom_malformed_numbers"]


def _testdata(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def tiff_ifd_loop(pages: int = 102) -> bytes:
    """A TIFF of ``pages`` 1x1 pages whose last IFD points back to the first."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((pages, 1, 1), np.uint8), photometric="minisblack", metadata=None)
    data = bytearray(buf.getvalue())
    first = offset = struct.unpack_from("<I", data, 4)[0]
    while True:
        entries = struct.unpack_from("<H", data, offset)[0]
        next_at = offset + 2 + 12 * entries
        offset = struct.unpack_from("<I", data, next_at)[0]
        if offset == 0:
            struct.pack_into("<I", data, next_at, first)
            return bytes(data)


def _patch_sof(data: bytearray, markers: tuple[int, ...], size: int) -> bytes:
    """The first frame header among ``markers`` in ``data`` says ``size`` x ``size`` (height, width at +5/+7)."""
    for pos in range(len(data) - 1):
        if data[pos] == 0xFF and data[pos + 1] in markers:
            struct.pack_into(">HH", data, pos + 5, size, size)
            return bytes(data)
    raise ValueError("no frame header found")


def dicom_j2k_lie(size: int = 30000) -> bytes:
    """pydicom's MR_small_jp2klossless.dcm (64 x 64) whose JPEG 2000 SIZ (image and tile) says ``size`` x ``size``."""
    data = bytearray(_testdata("MR_small_jp2klossless.dcm"))
    siz = data.find(b"\xff\x4f\xff\x51") + 2
    struct.pack_into(">II", data, siz + 6, size, size)  # Xsiz, Ysiz
    struct.pack_into(">II", data, siz + 22, size, size)  # XTsiz, YTsiz
    return bytes(data)


def dicom_jpeg_lie(size: int = 30000) -> bytes:
    """pydicom's SC_rgb_jpeg_dcmtk.dcm (baseline JPEG, 100 x 100 RGB) whose SOF0 says ``size`` x ``size``."""
    return _patch_sof(bytearray(_testdata("SC_rgb_jpeg_dcmtk.dcm")), (0xC0,), size)


def dicom_jpeg_ls_lie(size: int = 30000) -> bytes:
    """pydicom's MR_small_jpeg_ls_lossless.dcm (64 x 64) whose JPEG-LS SOF55 says ``size`` x ``size``."""
    return _patch_sof(bytearray(_testdata("MR_small_jpeg_ls_lossless.dcm")), (0xF7,), size)


def dicom_rle_lie() -> bytes:
    """pydicom's MR_small_RLE.dcm (16-bit grey: 2 segments per frame) whose RLE header says 1 segment."""
    data = bytearray(_testdata("MR_small_RLE.dcm"))
    header = data.find(struct.pack("<II", 2, 64))
    struct.pack_into("<I", data, header, 1)
    return bytes(data)


def tiff_jpeg_strip_lie(size: int = 30000) -> bytes:
    """A 64 x 64 grey TIFF, one JPEG strip, whose strip's SOF says ``size`` x ``size``."""
    buf = io.BytesIO()
    image = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    tifffile.imwrite(buf, image, photometric="minisblack", compression="jpeg", metadata=None)
    return _patch_sof(bytearray(buf.getvalue()), (0xC0, 0xC1), size)


def _small_dataset() -> Dataset:
    return build_radiograph_dataset(np.full((8, 8), 0.5, np.float32), bits_stored=8)


def dicom_deflate_bomb(body_bytes: int = 256 * 1024) -> bytes:
    """A Deflated Explicit VR Little Endian file whose ~``body_bytes`` deflated body inflates ~1000:1 (an OB
    private element of zeros before a tiny 8 x 8 image)."""
    ds = _small_dataset()
    ds.add_new(0x00091010, "OB", b"\x00" * (body_bytes * 1000))  # private element: ~1000:1 in deflate
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.preamble = b"\x00" * 128
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def dicom_sequence_flood(items: int = 262_144) -> bytes:
    """An 8 x 8 image with a private undefined-length sequence of ``items`` empty items (8 bytes each: ~2 MiB for
    262k), which a parser must walk item by item."""
    data = dataset_to_bytes(_small_dataset())
    item = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # item tag, length 0
    end = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # sequence delimitation item
    element = struct.pack("<HH2sHI", 0x0009, 0x1010, b"SQ", 0, 0xFFFFFFFF) + item * items + end
    at = data.find(b"\x10\x00\x10\x00PN")  # before PatientName (0010,0010): tags stay ascending
    return data[:at] + element + data[at:]


def png_text_bomb(text_bytes: int = 16 << 20) -> bytes:
    """An 8 x 8 PNG with a zTXt chunk of ``text_bytes`` inflated text in ~1/1000 of that."""
    _ok, encoded = cv2.imencode(".png", np.full((8, 8), 100, np.uint8))
    data = encoded.tobytes()
    payload = b"bomb\x00\x00" + zlib.compress(b"A" * text_bytes, 9)
    chunk = struct.pack(">I", len(payload)) + b"zTXt" + payload + struct.pack(">I", zlib.crc32(b"zTXt" + payload))
    return data[:-12] + chunk + data[-12:]


def dicom_malformed_numbers() -> bytes:
    """An 8 x 8 image whose PixelSpacing has decimal commas and whose SeriesNumber holds letters."""
    data = dataset_to_bytes(_small_dataset())

    def patched(data: bytes, tag: bytes, vr: bytes, value: bytes) -> bytes:
        at = data.find(tag + vr)
        length = int.from_bytes(data[at + 6 : at + 8], "little")
        return data[: at + 8] + value[:length].ljust(length, b" ") + data[at + 8 + length :]

    data = patched(data, b"\x28\x00\x30\x00", b"DS", b"0,1\\0,1")
    return patched(data, b"\x20\x00\x11\x00", b"IS", b"1a")


#: {class name: builder with its default (bench-size) lie}, in the order of docs/RELIABILITY.md's table.
HOSTILE_CLASSES = {
    "tiff-ifd-loop": tiff_ifd_loop,
    "dicom-j2k-siz-lie": dicom_j2k_lie,
    "dicom-jpeg-sof-lie": dicom_jpeg_lie,
    "dicom-jpeg-ls-sof55-lie": dicom_jpeg_ls_lie,
    "dicom-rle-segment-lie": dicom_rle_lie,
    "tiff-jpeg-strip-lie": tiff_jpeg_strip_lie,
    "dicom-deflate-bomb": dicom_deflate_bomb,
    "dicom-sequence-flood": dicom_sequence_flood,
    "png-ztxt-bomb": png_text_bomb,
    "dicom-malformed-ds-is": dicom_malformed_numbers,
}


# ----------------------------------------------------------------------------------------------------------------
# Fuzzing: seeds and mutations shared by tests/test_fuzz_decoders.py (hypothesis) and jobs/fuzz_decoders.py.

#: pydicom test files seeding the fuzzers: one or more per transfer syntax medsr-dist reads.
FUZZ_DICOM_SEEDS = ("CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
                    "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_jpeg_gdcm.dcm", "JPGExtended.dcm", "MR_small_jpeg_ls_lossless.dcm",
                    "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm", "examples_ybr_color.dcm",
                    "examples_palette.dcm")
#: Values a mutation writes over 1, 2 or 4 bytes: sizes, counts and offsets at their edges.
_INTERESTING = (0, 1, 2, 3, 7, 8, 15, 16, 64, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 30000, 0x7FFFFFFF, 0xFFFFFFFF)


def fuzz_seeds() -> dict[str, bytes]:
    """{name: bytes} of small honest files of every format: pydicom's test files (:data:`FUZZ_DICOM_SEEDS`), PNG 8/16-bit
    and palette, JPEG grey/colour, TIFF deflate and JPEG-strip pages, and the samples' own DICOM."""
    seeds = {name: _testdata(name) for name in FUZZ_DICOM_SEEDS}
    grey = (np.arange(24 * 32).reshape(24, 32) % 251).astype(np.uint8)
    colour = np.stack([grey, grey[::-1], 255 - grey], axis=-1)
    seeds["grey8.png"] = cv2.imencode(".png", grey)[1].tobytes()
    seeds["grey16.png"] = cv2.imencode(".png", grey.astype(np.uint16) * 257)[1].tobytes()
    seeds["colour.jpg"] = cv2.imencode(".jpg", colour)[1].tobytes()
    seeds["grey.jpg"] = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    for name, kwargs in {"deflate.tif": {"compression": "zlib"}, "jpeg.tif": {"compression": "jpeg"},
                         "tiled.tif": {"tile": (16, 16)}}.items():
        buf = io.BytesIO()
        tifffile.imwrite(buf, grey, photometric="minisblack", metadata=None, **kwargs)
        seeds[name] = buf.getvalue()
    seeds["sample.dcm"] = dataset_to_bytes(_small_dataset())
    seeds["bare.dcm"] = dataset_to_bytes(_small_dataset(), preamble=False, implicit_vr=True)
    return seeds


def mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    """``data`` with each ``(kind, where, value)`` applied in turn: kind 0 flips the bits of one byte, 1-3 write
    an interesting value (:data:`_INTERESTING`) over 1, 2 or 4 bytes in either byte order, 4 truncates, 5 deletes a
    short run, 6 duplicates a short run. ``where`` is taken modulo the length."""
    out = bytearray(data)
    for kind, where, value in ops:
        if not out:
            break
        at = where % len(out)
        kind %= 7
        if kind == 0:
            out[at] ^= (value % 255) + 1
        elif kind in (1, 2, 3):
            width = (1, 2, 4)[kind - 1]
            number = _INTERESTING[value % len(_INTERESTING)] & ((1 << (8 * width)) - 1)
            out[at : at + width] = number.to_bytes(width, "big" if value & 0x100 else "little")
        elif kind == 4:
            del out[max(at, 1):]
        elif kind == 5:
            del out[at : at + 1 + value % 64]
        else:
            out[at:at] = out[at : at + 1 + value % 64]
    return bytes(out)
