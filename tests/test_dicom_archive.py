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
from pydicom.sequence import Sequence
from pydicom.uid import UID

from medsr_dist.data.synthetic import make_radiograph
from medsr_dist.io.dicom import build_radiograph_dataset, dataset_to_bytes, read_image_dataset
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


# ----------------------------------------------------------------------------------------------------------------
# dciodvfy: derived objects are valid DICOM (no errors beyond a pydicom sample's own, none at all from valid ones)


def dciodvfy_errors(data: bytes, tmp_path: Path, label: str, kinds: tuple[str, ...] = ("Error",)) -> set[str]:
    path = tmp_path / f"{label}.dcm"
    path.write_bytes(data)
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return {line for line in (result.stdout + result.stderr).splitlines() if line.startswith(kinds)}


def source_errors(data: bytes, tmp_path: Path) -> set[str]:
    """dciodvfy's errors for a source; for one it cannot read (Deflate), those of the same dataset plain."""
    errors = dciodvfy_errors(data, tmp_path, "source")
    if any("read failed" in e for e in errors):
        ds = read(data)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        errors |= dciodvfy_errors(part10(ds), tmp_path, "source-plain")
    return errors


def dciodvfy_available() -> bool:
    """Whether the dciodvfy checks can run; on CI (``CI`` set) a missing dciodvfy fails the test instead."""
    if DCIODVFY is None and os.environ.get("CI"):
        pytest.fail("dciodvfy (dicom3tools) is missing on CI: .ci/run installs it")
    return DCIODVFY is not None


@pytest.fixture
def dciodvfy():
    if not dciodvfy_available():
        pytest.skip("dciodvfy not installed (Debian: apt-get install -y dicom3tools)")
    return DCIODVFY


# Every image object pydicom ships, by class. Each decodes, enhances (x2 nearest) and writes a derived object.
PYDICOM_IMAGES = {
    # signed (PixelRepresentation=1) CT and MR, in every transfer syntax pydicom has them
    "CT_small.dcm": "signed CT, Explicit VR LE",
    "MR_small.dcm": "signed MR, Explicit VR LE",
    "MR_small_implicit.dcm": "Implicit VR LE",
    "MR_small_bigendian.dcm": "Explicit VR Big Endian",
    "MR_small_expb.dcm": "Explicit VR Big Endian",
    "MR_small_padded.dcm": "trailing padding",
    "MR_small_RLE.dcm": "RLE Lossless",
    "MR_small_jp2klossless.dcm": "JPEG 2000 Lossless",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS Lossless",
    "693_J2KI.dcm": "signed 14-bit CT, JPEG 2000 (lossy)",
    "J2K_pixelrep_mismatch.dcm": "signed CT whose J2K codestream says unsigned",
    "JPEG2000.dcm": "JPEG 2000, NumberOfFrames=1",
    "JPGExtended.dcm": "12-bit JPEG Extended (Process 2 and 4)",
    "JPEGLSNearLossless_08.dcm": "JPEG-LS near-lossless 8-bit",
    "JPEGLSNearLossless_16.dcm": "JPEG-LS near-lossless 16-bit",
    "image_dfl.dcm": "Deflated Explicit VR LE",
    "examples_overlay.dcm": "12-bit MR with overlay planes",
    # colour
    "SC_rgb_rle.dcm": "RGB, RLE",
    "SC_rgb_rle_16bit.dcm": "16-bit RGB, RLE",
    "SC_rgb_rle_2frame.dcm": "RGB 2 frames, RLE",
    "SC_rgb_rle_16bit_2frame.dcm": "16-bit RGB 2 frames, RLE",
    "SC_rgb_dcmtk_+eb+cr.dcm": "RGB JPEG baseline",
    "SC_rgb_dcmtk_+eb+cy+n1.dcm": "YBR_FULL JPEG baseline",
    "SC_rgb_dcmtk_+eb+cy+n2.dcm": "YBR_FULL JPEG baseline",
    "SC_rgb_dcmtk_+eb+cy+np.dcm": "YBR_FULL_422 JPEG baseline",
    "SC_rgb_dcmtk_+eb+cy+s2.dcm": "YBR_FULL_422 JPEG baseline",
    "SC_rgb_dcmtk_+eb+cy+s4.dcm": "YBR_FULL JPEG baseline",
    "SC_rgb_jpeg_dcmtk.dcm": "YBR_FULL JPEG baseline",
    "SC_rgb_jpeg_lossy_gdcm.dcm": "YBR_FULL JPEG baseline",
    "SC_rgb_jpeg_gdcm.dcm": "RGB JPEG Lossless SV1",
    "SC_rgb_gdcm_KY.dcm": "RGB JPEG 2000",
    "GDCMJ2K_TextGBR.dcm": "YBR_RCT JPEG 2000 lossless",
    "examples_jpeg2k.dcm": "YBR_RCT JPEG 2000 lossless ultrasound",
    "SC_rgb_jls_lossy_line.dcm": "RGB JPEG-LS near-lossless",
    "SC_rgb_small_odd.dcm": "3x3 RGB",
    "SC_rgb_small_odd_big_endian.dcm": "3x3 RGB big endian",
    "SC_rgb_small_odd_jpeg.dcm": "3x3 YBR_FULL JPEG",
    "SC_ybr_full_422_uncompressed.dcm": "YBR_FULL_422 uncompressed",
    "SC_jpeg_no_color_transform.dcm": "RGB JPEG without colour transform",
    "ExplVR_BigEnd.dcm": "RGB ultrasound big endian",
    "examples_rgb_color.dcm": "RGB ultrasound",
    "examples_ybr_color.dcm": "30-frame YBR_FULL_422 JPEG ultrasound cine",
    "examples_palette.dcm": "PALETTE COLOR ultrasound",
}


@pytest.mark.parametrize("name", sorted(PYDICOM_IMAGES))
def test_every_pydicom_image_object_gives_a_valid_derived_object(name, tmp_path, dciodvfy):
    data = pydicom_file(name)
    image, out = derive(data, name)
    derived = read(out)
    assert derived.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    again = decode_image(out, "derived.dcm")
    np.testing.assert_array_equal(again.pixels[..., ::2, ::2, :], image.pixels)  # nothing lost on the way out
    assert (again.meta.dtype, again.meta.bits_stored, again.meta.frames) == (
        image.meta.dtype, image.meta.bits_stored, image.meta.frames)
    assert set(derived.ImageType[:2]) == {"DERIVED", "SECONDARY"}
    new = dciodvfy_errors(out, tmp_path, "derived") - source_errors(data, tmp_path)
    assert not new, f"{name} ({PYDICOM_IMAGES[name]}): derived object adds dciodvfy errors {sorted(new)}"


# Sources that are valid DICOM: their derived objects must be entirely dciodvfy-clean.
VALID_PYDICOM_SOURCES = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                         "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm", "examples_overlay.dcm",
                         "SC_rgb_rle.dcm", "SC_rgb_rle_16bit.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_gdcm_KY.dcm",
                         "SC_rgb_dcmtk_+eb+cy+np.dcm", "J2K_pixelrep_mismatch.dcm"]


@pytest.mark.parametrize("compression", ["none", "rle", "jpeg2000-lossless"])
def test_derived_objects_of_valid_sources_are_dciodvfy_clean_in_every_output_syntax(compression, tmp_path, dciodvfy):
    for name in VALID_PYDICOM_SOURCES:
        data = pydicom_file(name)
        assert source_errors(data, tmp_path) == set(), name
        _, out = derive(data, name, compression)
        assert dciodvfy_errors(out, tmp_path, "derived") == set(), (name, compression)
        both = ("Error", "Warning")
        new_warnings = dciodvfy_errors(out, tmp_path, "derived", both) - dciodvfy_errors(data, tmp_path, "src", both)
        assert not new_warnings, (name, compression)


# ----------------------------------------------------------------------------------------------------------------
# Signed pixel data


def test_signed_ct_decodes_its_negative_values_and_the_derived_object_keeps_hounsfield_units():
    data = pydicom_file("CT_small.dcm")
    source = read(data)
    raw = np.frombuffer(source.PixelData, "<i2").reshape(128, 128)  # read independently of pydicom's handlers
    image, out = derive(data, "ct.dcm")
    assert (image.meta.dtype, image.meta.bits_stored, image.meta.signed, image.meta.offset) == ("int16", 16, True, 32768)
    np.testing.assert_array_equal(image.pixels[..., 0], (raw.astype(np.float32) + 32768) / 65535)
    derived = read(out)
    assert (derived.PixelRepresentation, derived.BitsAllocated, derived.BitsStored, derived.HighBit) == (1, 16, 16, 15)
    assert (derived.RescaleSlope, derived.RescaleIntercept) == (source.RescaleSlope, source.RescaleIntercept)
    np.testing.assert_array_equal(derived.pixel_array[::2, ::2], raw)
    hounsfield = raw * float(source.RescaleSlope) + float(source.RescaleIntercept)
    np.testing.assert_array_equal(pydicom.pixels.apply_modality_lut(derived.pixel_array, derived)[1::2, 1::2], hounsfield)
    assert [float(v) for v in derived.PixelSpacing] == pytest.approx([float(v) / 2 for v in source.PixelSpacing])


def test_signed_values_below_sixteen_bits_are_sign_extended_and_written_back_exactly():
    rng = np.random.default_rng(3)
    values = rng.integers(-2048, 2048, (40, 36)).astype(np.int16)
    values[0, :4] = [-2048, -1, 0, 2047]
    ds = build_radiograph_dataset(np.zeros((40, 36), np.float32), bits_stored=12)
    ds.PixelRepresentation = 1
    ds.PixelData = values.tobytes()  # two's complement in 16 bits, sign-extended above bit 11
    image, out = derive(dataset_to_bytes(ds), "signed12.dcm")
    assert image.meta.dtype == "int16" and image.meta.maxval == 4095
    np.testing.assert_array_equal(np.rint(image.pixels[..., 0] * 4095) - 2048, values)
    derived = read(out)
    assert (derived.PixelRepresentation, derived.BitsStored) == (1, 12)
    np.testing.assert_array_equal(derived.pixel_array[::2, ::2], values)


def test_signed_monochrome1_inverts_around_the_signed_range():
    values = np.array([[-2048, -1], [0, 2047]], np.int16)
    ds = build_radiograph_dataset(np.zeros((2, 2), np.float32), bits_stored=12, photometric="MONOCHROME1")
    ds.PixelRepresentation = 1
    ds.PixelData = values.tobytes()
    image = decode_image(dataset_to_bytes(ds), "m1.dcm")
    np.testing.assert_array_equal(image.pixels[..., 0], (2047 - values.astype(np.float32)) / 4095)  # -2048 brightest
    derived = read(encode_image(image.pixels, image.meta, image.header))
    np.testing.assert_array_equal(derived.pixel_array, values)


# ----------------------------------------------------------------------------------------------------------------
# Transfer syntaxes: every codec pydicom ships agrees with the uncompressed original


def test_every_transfer_syntax_of_one_mr_decodes_to_the_same_pixels():
    reference = decode_image(pydicom_file("MR_small.dcm"), "MR_small.dcm").pixels
    for name in ("MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_RLE.dcm",
                 "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm"):
        np.testing.assert_array_equal(decode_image(pydicom_file(name), name).pixels, reference, err_msg=name)


def _encapsulated(ds: Dataset, frames: list[bytes], syntax: str, lossy: bool) -> bytes:
    ds.PixelData = pydicom.encaps.encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = syntax
    if lossy:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = "4"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    return part10(ds)


@pytest.mark.parametrize("syntax, predictor", [(pydicom.uid.JPEGLosslessSV1, 1), (pydicom.uid.JPEGLossless, 6)])
def test_jpeg_lossless_signed_ct_the_usual_pacs_lossless_decodes_exactly(syntax, predictor, tmp_path):
    """Process 14 with selection value 1 (1.2.840.10008.1.2.4.70) and with another predictor (…4.57)."""
    import imagecodecs

    source = read(pydicom_file("CT_small.dcm"))
    raw = source.pixel_array
    jpeg = imagecodecs.jpeg8_encode(raw.view(np.uint16), lossless=True, predictor=predictor, bitspersample=16)
    assert b"\xff\xc3" in jpeg  # SOF3: lossless
    data = _encapsulated(source, [jpeg], syntax, lossy=False)
    image, out = derive(data, "ll.dcm")
    np.testing.assert_array_equal(read(out).pixel_array[::2, ::2], raw)
    if dciodvfy_available():
        assert dciodvfy_errors(data, tmp_path, "src") == set()
        assert dciodvfy_errors(out, tmp_path, "out") == set()


def test_twelve_bit_jpeg_extended_built_here_decodes_to_twelve_bits(tmp_path):
    import imagecodecs

    truth = np.rint(make_radiograph(8, 64) * 4095).astype(np.uint16)
    jpeg = imagecodecs.jpeg8_encode(truth, level=95, bitspersample=12)
    assert b"\xff\xc1" in jpeg  # SOF1: extended sequential, 12-bit
    ds = build_radiograph_dataset(truth.astype(np.float32) / 4095, bits_stored=12)
    data = _encapsulated(ds, [jpeg], pydicom.uid.JPEGExtended12Bit, lossy=True)
    image, out = derive(data, "jpeg12.dcm")
    assert (image.meta.dtype, image.meta.bits_stored) == ("uint16", 12)
    stored = np.rint(image.pixels[..., 0] * 4095)
    assert stored.max() > 255 and np.abs(stored - truth).max() <= 48  # 12-bit, lossy within JPEG error
    derived = read(out)
    assert derived.LossyImageCompression == "01"  # once lossy, always marked lossy
    if dciodvfy_available():
        assert dciodvfy_errors(data, tmp_path, "src") == set()
        assert dciodvfy_errors(out, tmp_path, "out") == set()


@pytest.mark.parametrize("compression, syntax", [("rle", pydicom.uid.RLELossless),
                                                 ("jpeg2000-lossless", pydicom.uid.JPEG2000Lossless)])
@pytest.mark.parametrize("name", ["CT_small.dcm", "examples_overlay.dcm", "SC_rgb_rle_16bit_2frame.dcm",
                                  "examples_palette.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm"])
def test_lossless_output_compression_round_trips_bit_exactly(name, compression, syntax):
    data = pydicom_file(name)
    image, plain = derive(data, name, "none")
    _, packed = derive(data, name, compression)
    derived = read(packed)
    assert derived.file_meta.TransferSyntaxUID == syntax
    assert len(packed) < len(plain)
    np.testing.assert_array_equal(derived.pixel_array, read(plain).pixel_array)
    np.testing.assert_array_equal(decode_image(packed, "packed.dcm").pixels, decode_image(plain, "plain.dcm").pixels)
    assert derived.SOPInstanceUID == read(plain).SOPInstanceUID  # the syntax does not make another instance
    if image.meta.channels == 3:
        assert derived.PhotometricInterpretation == ("RGB" if compression == "rle" else "YBR_RCT")


def test_unknown_or_lossy_output_compression_is_refused():
    image = decode_image(pydicom_file("CT_small.dcm"), "ct.dcm")
    for choice in ("jpeg", "jpeg2000", "lossy"):
        with pytest.raises(ValueError, match="dicom_compression must be one of"):
            encode_image(image.pixels, image.meta, image.header, dicom_compression=choice)


def test_jpeg2000_output_of_a_tiny_image_is_refused_clearly():
    image = decode_image(pydicom_file("SC_rgb_small_odd.dcm"), "odd.dcm")
    with pytest.raises(ValueError, match="at least 32 x 32"):
        encode_image(image.pixels, image.meta, image.header, dicom_compression="jpeg2000-lossless")


# ----------------------------------------------------------------------------------------------------------------
# Colour


def test_ybr_sources_are_converted_to_rgb_and_written_as_rgb():
    truth = decode_image(pydicom_file("SC_rgb_rle.dcm"), "rgb.dcm").pixels  # the same picture, uncompressed RGB
    for name in ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm",
                 "SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_dcmtk_+eb+cr.dcm"):
        image, out = derive(pydicom_file(name), name)
        assert image.meta.photometric == "RGB"
        assert np.abs(image.pixels - truth).mean() < 4 / 255, name  # unconverted YBR would be ~100/255 off
        derived = read(out)
        assert (derived.PhotometricInterpretation, derived.PlanarConfiguration, derived.SamplesPerPixel) == ("RGB", 0, 3)


def test_lossy_jpeg2000_ybr_ict_colour_decodes_to_rgb():
    source = read(pydicom_file("SC_rgb_rle.dcm"))
    truth = decode_image(pydicom_file("SC_rgb_rle.dcm"), "rgb.dcm").pixels
    source.decompress(generate_instance_uid=False)
    rgb = source.pixel_array
    source.PhotometricInterpretation = "YBR_ICT"  # irreversible colour transform, as lossy J2K writers use it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source.compress(pydicom.uid.JPEG2000, rgb, j2k_cr=[5], generate_instance_uid=False)
    image, out = derive(part10(source), "ict.dcm")
    assert image.meta.photometric == "RGB" and np.abs(image.pixels - truth).mean() < 2 / 255
    assert read(out).PhotometricInterpretation == "RGB"


def _palette_dataset() -> Dataset:
    """8-bit indices through 16-bit palette tables with full 16-bit precision (not 8-bit values x 256)."""
    rng = np.random.default_rng(5)
    index = rng.integers(0, 256, (48, 40)).astype(np.uint8)
    ds = build_radiograph_dataset(np.zeros((48, 40), np.float32), bits_stored=8)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    for keyword in [e.keyword for e in ds if e.keyword.startswith(("Window", "Rescale", "Presentation", "Detector",
                                                                  "Positioner", "Imager", "PixelIntensity"))]:
        delattr(ds, keyword)
    for keyword in ("AcquisitionContextSequence", "ViewCodeSequence", "AnatomicRegionSequence", "ImageLaterality",
                    "BurnedInAnnotation"):
        delattr(ds, keyword)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ramp = np.arange(256, dtype=np.int64)
    for colour, table in (("Red", ramp * 257), ("Green", 65535 - ramp * 251), ("Blue", (ramp * 40503 + 13) % 65536)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", table.astype("<u2").tobytes())
    ds.PixelData = index.tobytes()
    return ds


def test_palette_colour_is_looked_up_to_rgb_and_written_without_the_palette(tmp_path):
    ds = _palette_dataset()
    data = dataset_to_bytes(ds)
    image, out = derive(data, "palette.dcm")
    expected = pydicom.pixels.apply_color_lut(np.frombuffer(ds.PixelData, np.uint8).reshape(48, 40), ds)
    assert (image.meta.photometric, image.meta.dtype, image.meta.bits_stored) == ("RGB", "uint16", 16)
    np.testing.assert_array_equal(image.pixels, expected.astype(np.float32) / 65535)
    derived = read(out)
    assert (derived.PhotometricInterpretation, derived.SamplesPerPixel, derived.PlanarConfiguration) == ("RGB", 3, 0)
    assert not [e.keyword for e in derived if "Palette" in e.keyword]
    np.testing.assert_array_equal(derived.pixel_array[::2, ::2], expected)
    # pydicom's ultrasound palette holds 8-bit colours as x * 256: kept as exact 8-bit RGB, as US requires
    us = decode_image(pydicom_file("examples_palette.dcm"), "us.dcm")
    assert (us.meta.dtype, us.meta.bits_stored) == ("uint8", 8)
    if dciodvfy_available():
        assert dciodvfy_errors(data, tmp_path, "src") == set()
        assert dciodvfy_errors(out, tmp_path, "out") == set()


# ----------------------------------------------------------------------------------------------------------------
# Multi-frame


def test_multi_frame_cine_enhances_every_frame_into_one_object():
    data = pydicom_file("examples_ybr_color.dcm")
    image, out = derive(data, "cine.dcm")
    assert image.meta.frames == 30 and image.pixels.shape == (30, 240, 320, 3)
    frames = image.pixels.reshape(30, -1).mean(axis=1)
    assert len(np.unique(frames)) > 1  # frames are decoded one by one, not one frame repeated
    derived = read(out)
    assert (derived.NumberOfFrames, derived.Rows, derived.Columns, derived.PhotometricInterpretation) == (
        30, 480, 640, "RGB")
    assert derived.pixel_array.shape == (30, 480, 640, 3)


def _legacy_enhanced_ct(per_frame_measures: bool) -> bytes:
    """A Legacy Converted Enhanced CT (functional groups) of three signed CT slices, built by highdicom."""
    import copy

    import highdicom

    base = read(pydicom_file("CT_small.dcm"))
    slices = []
    for i in range(3):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["medsr-dist test slice", str(i)])
        ds.InstanceNumber = i + 1
        position = [float(v) for v in ds.ImagePositionPatient]
        position[2] += 5.0 * i
        ds.ImagePositionPatient = position
        ds.SliceLocation = position[2]
        ds.PixelData = (ds.pixel_array + 10 * i).astype(np.int16).tobytes()
        slices.append(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enhanced = highdicom.legacy.LegacyConvertedEnhancedCTImage(
            slices, series_instance_uid=pydicom.uid.generate_uid(entropy_srcs=["medsr-dist test series"]),
            series_number=7, sop_instance_uid=pydicom.uid.generate_uid(entropy_srcs=["medsr-dist test enhanced"]),
            instance_number=1)
    enhanced.Laterality = ""  # Type 2C that dciodvfy asks for on this IOD
    if "ReferencedSeriesSequence" in enhanced:
        del enhanced.ReferencedSeriesSequence  # highdicom's Common Instance Reference, flagged by dciodvfy
    if per_frame_measures:  # the other valid placement: PixelMeasures in every per-frame group
        measures = enhanced.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
        del enhanced.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
        for group in enhanced.PerFrameFunctionalGroupsSequence:
            group.PixelMeasuresSequence = copy.deepcopy(measures)
    return part10(enhanced)


@pytest.mark.parametrize("per_frame_measures", [False, True])
def test_enhanced_multi_frame_ct_updates_functional_group_pixel_measures(per_frame_measures, tmp_path):
    data = _legacy_enhanced_ct(per_frame_measures)
    source = read(data)
    image, out = derive(data, "enhanced-ct.dcm")
    assert image.meta.frames == 3 and image.meta.dtype == "int16" and image.pixels.shape == (3, 128, 128, 1)
    derived = read(out)
    assert derived.NumberOfFrames == 3 and derived.PixelRepresentation == 1
    np.testing.assert_array_equal(derived.pixel_array[:, ::2, ::2], source.pixel_array)
    groups = ([derived.SharedFunctionalGroupsSequence[0]] if not per_frame_measures
              else list(derived.PerFrameFunctionalGroupsSequence))
    old = [float(v) for v in (source.SharedFunctionalGroupsSequence[0] if not per_frame_measures
                              else source.PerFrameFunctionalGroupsSequence[0]).PixelMeasuresSequence[0].PixelSpacing]
    for group in groups:
        assert [float(v) for v in group.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx([v / 2 for v in old])
    frame_type = derived.SharedFunctionalGroupsSequence[0].CTImageFrameTypeSequence[0].FrameType
    assert frame_type[0] == "DERIVED"
    if dciodvfy_available():
        assert dciodvfy_errors(data, tmp_path, "src") == set()
        assert dciodvfy_errors(out, tmp_path, "out") == set()


# ----------------------------------------------------------------------------------------------------------------
# How the file is laid out: dual personality, bare datasets


def _dual_personality(ds: Dataset) -> bytes:
    """A Part 10 file whose preamble is a little-endian TIFF header + IFD pointing at the DICOM pixel data, so the
    same bytes open as a TIFF (what several vendors' toolkits write)."""
    plain = dataset_to_bytes(ds)
    at = plain.index(b"\xe0\x7f\x10\x00OW\x00\x00") + 12  # value of (7FE0,0010) OW, explicit VR LE
    rows, columns = int(ds.Rows), int(ds.Columns)
    entries = [(256, 3, columns), (257, 3, rows), (258, 3, 16), (259, 3, 1), (262, 3, 1), (273, 4, at),
               (277, 3, 1), (278, 3, rows), (279, 4, rows * columns * 2)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in entries) + struct.pack("<I", 0)
    preamble = (b"II*\x00" + struct.pack("<I", 8) + ifd).ljust(128, b"\x00")
    assert len(preamble) == 128
    return preamble + plain[128:]


def test_dicom_with_a_tiff_preamble_is_read_as_dicom(tmp_path):
    ds = build_radiograph_dataset(make_radiograph(11, 40), bits_stored=12)
    data = _dual_personality(ds)
    as_tiff = tifffile.imread(io.BytesIO(data))  # it really is a TIFF too
    reference = decode_image(dataset_to_bytes(ds), "plain.dcm")
    np.testing.assert_array_equal(as_tiff, np.rint(reference.pixels[..., 0] * 4095).astype(np.uint16))
    assert detect_format(data) == "dicom"
    image, out = derive(data, "dual.dcm")
    np.testing.assert_array_equal(image.pixels, reference.pixels)
    assert probe_image(data, "dual.dcm").format == "dicom"
    assert read(out).preamble == b"\x00" * 128  # the derived object does not pretend to be a TIFF
    if dciodvfy_available():
        assert dciodvfy_errors(out, tmp_path, "out") == set()


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_bare_datasets_without_preamble_or_meta_are_recognised(implicit_vr):
    source = read(pydicom_file("CT_small.dcm"))
    reference = decode_image(pydicom_file("CT_small.dcm"), "ct.dcm")
    bare = dataset_to_bytes(source, preamble=False, implicit_vr=implicit_vr)
    assert bare[:2] == b"\x08\x00" and b"DICM" not in bare[:132]
    assert detect_format(bare) == "dicom"
    image = decode_image(bare, "bare.dcm")
    np.testing.assert_array_equal(image.pixels, reference.pixels)
    assert probe_image(bare, "bare.dcm") == probe_image(pydicom_file("CT_small.dcm"), "ct.dcm")


def test_file_meta_without_the_preamble_is_recognised():
    whole = pydicom_file("CT_small.dcm")
    headless = whole[132:]  # starts with (0002,0000) UL: no preamble, no DICM
    assert headless[:6] == b"\x02\x00\x00\x00UL"
    np.testing.assert_array_equal(decode_image(headless, "headless.dcm").pixels, decode_image(whole, "ct.dcm").pixels)


def test_bytes_that_merely_start_like_a_dataset_are_not_taken_for_one():
    for junk in (b"\x08\x00\x05\x00" + b"\xff" * 60, b"\x08\x00\x16\x00UI\x04\x001.2\x00"):
        with pytest.raises(ImageDecodeError, match="not a DICOM dataset|not a recognised image format|corrupt DICOM"):
            decode_image(junk, "junk.bin")


def test_truncated_and_undecodable_images_are_errors_with_reasons():
    cases = {"MR_truncated.dcm": "pixel data is less than expected",
             "SC_rgb_rle_32bit.dcm": "BitsAllocated=32",
             "JPEG-lossy.dcm": "JPEG Extended"}  # a known-bad 12-bit JPEG stream that libjpeg refuses
    for name, reason in cases.items():
        with pytest.raises(ImageDecodeError, match=reason) as caught:
            decode_image(pydicom_file(name), name)
        assert not isinstance(caught.value, NotAnImageObject)


def test_error_texts_never_carry_patient_identifiers():
    ds = build_radiograph_dataset(make_radiograph(2, 32), bits_stored=12, patient_id="PLANTED-ID-0815",
                                  patient_name="PLANTED^PATIENT")
    ds.PatientBirthDate = "19010101"
    ds.AccessionNumber = "PLANTED-ACC-42"
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = "PLANTED-OTHER-7"
    good = dataset_to_bytes(ds)
    broken = {"truncated": good[:-100], "bits": None, "sop": None}
    ds.BitsAllocated = 32
    broken["bits"] = dataset_to_bytes(ds)
    ds.BitsAllocated = 16
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    broken["sop"] = dataset_to_bytes(ds)
    del ds.PixelData
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SOPClassUID = "PLANTED-ID-0815"  # not a UID: never echoed
        broken["not-a-uid"] = dataset_to_bytes(ds)
    for label, data in broken.items():
        for call in (decode_image, probe_image):
            try:
                call(data, f"{label}.dcm")
            except ImageDecodeError as error:
                text = str(error) + repr(error.__reduce__())
                assert "PLANTED" not in text and "19010101" not in text, (label, text)


def test_single_image_consumers_refuse_multi_frame_objects_by_name():
    from medsr_dist.io.image import single_frame_pixels

    cine = decode_image(pydicom_file("SC_rgb_rle_2frame.dcm"), "cine.dcm")
    with pytest.raises(ImageDecodeError, match=r"cine\.dcm: multi-frame image \(2 frames\) is not supported for training"):
        single_frame_pixels(cine, "cine.dcm", "training")
    ct = decode_image(pydicom_file("CT_small.dcm"), "ct.dcm")
    assert single_frame_pixels(ct, "ct.dcm", "training") is ct.pixels


def test_pydicom_never_logs_or_warns_element_values(caplog, recwarn):
    """pydicom quotes malformed values (here a PatientID pasted into a UI element) in its warnings and logs."""
    import logging

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = build_radiograph_dataset(make_radiograph(2, 32), bits_stored=12, patient_id="PLANTED-ID-0815")
        ds.PatientBirthDate = "PLANTED-1901"
        ds.StudyInstanceUID = "PLANTED-ID-0815"
        good = dataset_to_bytes(ds)
        ds.SOPClassUID = "PLANTED-ID-0815"
        del ds.PixelData
        bad = dataset_to_bytes(ds)
    recwarn.clear()
    with caplog.at_level(logging.DEBUG):
        image = decode_image(good, "a.dcm")
        encode_image(image.pixels, image.meta, image.header, dicom_compression="rle")
        probe_image(good, "a.dcm")
        read_image_dataset(good, "a.dcm")  # the MRI series reader's and phi_values' way in
        read_image_dataset(good, "a.dcm", header_only=True)
        with pytest.raises(NotAnImageObject):
            decode_image(bad, "b.dcm")
    assert "PLANTED" not in caplog.text
    assert not [w for w in recwarn if "PLANTED" in str(w.message)]
