"""Every class of file a real hospital archive holds: what ``decode_image`` / ``probe_image`` / ``encode_image``
make of it.

Sources are pydicom's own test files (real objects from many vendors and toolkits) plus files built here for the
classes pydicom does not ship (dual-personality preamble, bare datasets, palette colour, 12-bit JPEG, enhanced
multi-frame with functional groups, ...). Derived objects are checked with dciodvfy (dicom3tools) where it is
installed; with ``CI`` set it must be.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
import subprocess
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID

from medsr_dist.data.synthetic import make_radiograph
from medsr_dist.io.dicom import build_radiograph_dataset, dataset_to_bytes
from medsr_dist.io.image import (
    ImageDecodeError,
    ImageMeta,
    ImageProbe,
    MedicalImage,
    NotAnImageObject,
    decode_image,
    detect_format,
    encode_image,
    probe_image,
)

PROVENANCE = {"medsr:model": "test-model", "medsr:model_sha256": "cd" * 32, "medsr:scale": "2"}
DCIODVFY = shutil.which("dciodvfy")


def pydicom_file(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def upscale(pixels: np.ndarray, factor: int = 2) -> np.ndarray:
    """Nearest-neighbour enlargement of (H, W, C) or (F, H, W, C): every source value survives at [::f, ::f]."""
    return np.repeat(np.repeat(pixels, factor, axis=-3), factor, axis=-2)


def derive(data: bytes, name: str, compression: str = "none", factor: int = 2) -> tuple[MedicalImage, bytes]:
    image = decode_image(data, name)
    out = encode_image(upscale(image.pixels, factor), image.meta, image.header, scale=factor,
                       provenance=PROVENANCE, dicom_compression=compression)
    return image, out


def read(data: bytes) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data))


# ----------------------------------------------------------------------------------------------------------------
# Non-image objects: their own exception, so the job can count them as `ignored`, not `error`

NON_IMAGE = {
    "test-SR.dcm": "Comprehensive SR Storage",
    "reportsi.dcm": "Basic Text SR Storage",
    "waveform_ecg.dcm": "12-lead ECG Waveform Storage",
    "rtplan.dcm": "RT Plan Storage",
    "rtstruct.dcm": "RT Structure Set Storage",
    "rtdose.dcm": "RT Dose Storage",  # has PixelData, but a dose grid is not an image to super-resolve
    "liver_1frame.dcm": "Segmentation Storage",  # has PixelData: 1-bit labels
    "ExplVR_BigEndNoMeta.dcm": "RT Ion Plan Storage",  # bare big-endian dataset, no preamble or meta
}


@pytest.mark.parametrize("name", sorted(NON_IMAGE))
def test_non_image_objects_raise_not_an_image_object_naming_the_sop_class(name):
    data = pydicom_file(name)
    for read_header in (decode_image, probe_image):
        with pytest.raises(NotAnImageObject) as caught:
            read_header(data, name)
        error = caught.value
        assert error.name == name and error.sop_class_name == NON_IMAGE[name]
        assert error.sop_class_uid == str(read(data).SOPClassUID) if b"DICM" in data[128:132] else error.sop_class_uid
        assert UID(error.sop_class_uid).name == NON_IMAGE[name]
        assert str(error).startswith(f"{name}: not an image object ({NON_IMAGE[name]}, SOP class ")
        assert isinstance(error, ValueError)


def test_a_presentation_state_is_not_an_image_either():
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State Storage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "PR"
    ds.PatientID = "PLANTED-ID-4711"
    ds.PatientName = "PLANTED^NAME"
    with pytest.raises(NotAnImageObject, match="Grayscale Softcopy Presentation State Storage") as caught:
        decode_image(dataset_to_bytes(ds), "pr.dcm")
    assert "PLANTED" not in str(caught.value)


def test_not_an_image_object_survives_pickling_between_workers():
    error = NotAnImageObject("sr.dcm", "1.2.840.10008.5.1.4.1.1.88.33", "Comprehensive SR Storage")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is NotAnImageObject
    assert (again.name, again.sop_class_uid, again.sop_class_name, str(again)) == (
        error.name, error.sop_class_uid, error.sop_class_name, str(error))


def test_an_image_object_without_pixel_data_is_an_error_not_a_non_image():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    with pytest.raises(ImageDecodeError, match="CT Image Storage object has no PixelData") as caught:
        decode_image(part10(ds), "stripped.dcm")
    assert not isinstance(caught.value, NotAnImageObject)


# ----------------------------------------------------------------------------------------------------------------
# Header-only probe: pixel limits can be enforced before anything is decoded


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@pytest.fixture(scope="module")
def png_bomb() -> bytes:
    """A real 20000 x 20000 8-bit grey PNG of zeros (~390 kB; 400 MB decoded, 6.4 GB as float32 x4 output)."""
    side, rows_per_block = 20000, 500
    compressor = zlib.compressobj(9)
    block = bytes(side + 1) * rows_per_block  # filter byte 0 + a row of zeros
    idat = b"".join([compressor.compress(block) for _ in range(side // rows_per_block)] + [compressor.flush()])
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def test_probe_reads_a_png_bomb_from_its_header_without_decompressing(png_bomb):
    import tracemalloc

    assert len(png_bomb) < 1_000_000
    tracemalloc.start()
    try:
        probe = probe_image(png_bomb, "bomb.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert probe == ImageProbe("png", 20000, 20000, 1, 1, 8)
    assert probe.pixels == 400_000_000
    assert peak < 1_000_000  # the IDAT stream was never inflated


def test_probe_matches_what_decode_returns_for_every_format():
    rgb16 = (np.arange(6 * 10 * 3).reshape(6, 10, 3) * 300 % 65536).astype(np.float32) / 65535
    cases = {
        "a.png": encode_image(rgb16, ImageMeta("png", "uint16", 16, 3, "RGB")),
        "a.jpg": encode_image(rgb16, ImageMeta("jpeg", "uint8", 8, 3, "RGB")),
        "a.tif": encode_image(rgb16[..., :1], ImageMeta("tiff", "uint16", 16, 1, "MONOCHROME2")),
        "ct.dcm": pydicom_file("CT_small.dcm"),
        "j2k.dcm": pydicom_file("MR_small_jp2klossless.dcm"),
        "cine.dcm": pydicom_file("examples_ybr_color.dcm"),
        "palette.dcm": pydicom_file("examples_palette.dcm"),
    }
    for name, data in cases.items():
        probe = probe_image(data, name)
        image = decode_image(data, name)
        assert probe.format == image.meta.format, name
        assert (probe.frames, probe.height, probe.width, probe.channels) == (
            image.meta.frames, *image.pixels.shape[-3:]), name
    assert probe_image(cases["cine.dcm"], "cine.dcm") == ImageProbe("dicom", 240, 320, 30, 3, 8)
    assert probe_image(cases["a.png"], "a.png").bits == 16


def test_probe_of_a_large_dicom_reads_no_pixel_data():
    import tracemalloc

    ds = build_radiograph_dataset(np.zeros((8, 1024, 1024), np.float32), bits_stored=12)  # 16 MiB of pixels
    data = dataset_to_bytes(ds)
    tracemalloc.start()
    try:
        probe = probe_image(data, "tomo.dcm")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert probe == ImageProbe("dicom", 1024, 1024, 8, 1, 16)
    assert peak < len(data) // 8


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "corrupt PNG"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 9, "no frame header"),
    (b"II*\x00" + b"\xff" * 12, "TIFF has no image pages"),
    (b"MM\x00*" + b"\x00\x00\x00\x08" + b"\x00", "corrupt TIFF header"),
    (b"hello world, not an image", "not a recognised image format"),
])
def test_probe_refuses_unreadable_headers_naming_the_file(data, reason):
    with pytest.raises(ImageDecodeError, match=reason) as caught:
        probe_image(data, "bad.bin")
    assert str(caught.value).startswith("bad.bin: ")


# ----------------------------------------------------------------------------------------------------------------
# The frames contract between io and the nightly job


def test_image_meta_json_without_frames_still_loads_and_new_fields_round_trip():
    old = '{"channels": 1, "dicom": null, "dtype": "uint16", "format": "png", "bits_stored": 16, ' \
          '"patient_id": null, "photometric": "MONOCHROME2", "text": {}}'
    assert ImageMeta.from_json(old).frames == 1
    meta = ImageMeta("dicom", "int16", 12, 1, "MONOCHROME2", frames=5)
    assert ImageMeta.from_json(meta.to_json()) == meta
    assert (meta.signed, meta.offset, meta.maxval) == (True, 2048, 4095)
    assert meta.pixel_shape(7, 9) == (5, 7, 9, 1)
    with pytest.raises(ValueError, match="int16"):
        ImageMeta("png", "int16", 16, 1, "MONOCHROME2")
    with pytest.raises(ValueError, match="only DICOM"):
        ImageMeta("tiff", "uint16", 16, 1, "MONOCHROME2", frames=2)
    with pytest.raises(ValueError, match=r"\(5, H, W, 1\)"):
        MedicalImage(np.zeros((4, 7, 9, 1), np.float32), meta)
