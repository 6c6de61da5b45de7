"""Image I/O: every supported form decodes to display floats and is written back in the same form.

Source files are made with independent writers (OpenCV, tifffile, pydicom) and outputs are checked with
independent readers, so the tests do not merely agree with themselves.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass

import cv2
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from medsr_dist.data.hostile import tiff_ifd_loop
from medsr_dist.data.synthetic import make_corrupt_files, make_radiograph
from medsr_dist.io.dicom import build_radiograph_dataset, dataset_to_bytes
from medsr_dist.io.raster import count_tiff_ifds
from medsr_dist.io.image import (
    ImageDecodeError,
    ImageMeta,
    MedicalImage,
    decode_image,
    encode_image,
    output_extension,
    probe_image,
)

H, W = 40, 48
PROVENANCE = {
    "medsr:model": "realesrgan-x2-cxr",
    "medsr:model_sha256": "9f2c" + "0" * 60,
    "medsr:scale": "2",
    "medsr:source": "s3://bucket/in/00000001_000.png",
    "medsr:note": "enhanced image, not a new acquisition",
}


@dataclass(frozen=True)
class Form:
    id: str
    format: str
    dtype: str
    bits: int
    channels: int
    photometric: str

    @property
    def lossless(self) -> bool:
        return self.format != "jpeg"

    @property
    def maxval(self) -> int:
        return (1 << self.bits) - 1 if self.format == "dicom" else np.iinfo(self.dtype).max


FORMS = [
    Form("png8-gray", "png", "uint8", 8, 1, "MONOCHROME2"),
    Form("png8-rgb", "png", "uint8", 8, 3, "RGB"),
    Form("png8-rgba", "png", "uint8", 8, 4, "RGBA"),
    Form("png16-gray", "png", "uint16", 16, 1, "MONOCHROME2"),
    Form("png16-rgb", "png", "uint16", 16, 3, "RGB"),
    Form("png16-rgba", "png", "uint16", 16, 4, "RGBA"),
    Form("tiff8-gray", "tiff", "uint8", 8, 1, "MONOCHROME2"),
    Form("tiff8-rgb", "tiff", "uint8", 8, 3, "RGB"),
    Form("tiff16-gray", "tiff", "uint16", 16, 1, "MONOCHROME2"),
    Form("tiff16-rgb", "tiff", "uint16", 16, 3, "RGB"),
    Form("tiff16-rgba", "tiff", "uint16", 16, 4, "RGBA"),
    Form("tiff16-miniswhite", "tiff", "uint16", 16, 1, "MONOCHROME1"),
    Form("jpeg-gray", "jpeg", "uint8", 8, 1, "MONOCHROME2"),
    Form("jpeg-rgb", "jpeg", "uint8", 8, 3, "RGB"),
    Form("dicom-mono2-12", "dicom", "uint16", 12, 1, "MONOCHROME2"),
    Form("dicom-mono1-12", "dicom", "uint16", 12, 1, "MONOCHROME1"),
    Form("dicom-mono2-16", "dicom", "uint16", 16, 1, "MONOCHROME2"),
    Form("dicom-mono1-16", "dicom", "uint16", 16, 1, "MONOCHROME1"),
    Form("dicom-mono2-8", "dicom", "uint8", 8, 1, "MONOCHROME2"),
    Form("dicom-rgb-8", "dicom", "uint8", 8, 3, "RGB"),
]
LOSSLESS = [f for f in FORMS if f.lossless]


def stored_values(form: Form, seed: int = 0) -> np.ndarray:
    """Stored sample values (H, W, C) as they sit in the file: a radiograph ramp plus noise, full range."""
    rng = np.random.default_rng(seed)
    base = make_radiograph(seed, 64)[:H, :W, None]
    values = base * 0.8 + rng.random((H, W, form.channels)) * 0.2
    stored = np.rint(values * form.maxval).astype(form.dtype)
    stored[0, 0] = form.maxval  # both extremes present
    stored[0, 1] = 0
    if form.channels == 4:
        stored[..., 3] = np.linspace(0, form.maxval, W).round().astype(form.dtype)[None, :]
    return stored


def to_bgr(stored: np.ndarray) -> np.ndarray:
    if stored.shape[2] == 1:
        return stored[:, :, 0]
    code = cv2.COLOR_RGB2BGR if stored.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
    return cv2.cvtColor(stored, code)


def dicom_bytes(stored: np.ndarray, form: Form, **kwargs) -> bytes:
    """A DICOM file holding exactly ``stored`` (file-sense values) in the form's layout."""
    ds = build_radiograph_dataset(np.zeros(stored.shape[:2], np.float32), bits_stored=form.bits, **kwargs)
    ds.PhotometricInterpretation = form.photometric
    if form.channels == 3:
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
    ds.PixelData = stored.astype("<u2" if form.dtype == "uint16" else np.uint8).tobytes()
    return dataset_to_bytes(ds)


def write_source(form: Form, stored: np.ndarray) -> bytes:
    """Encode ``stored`` with a writer independent of medsr_dist."""
    if form.format == "png":
        return cv2.imencode(".png", to_bgr(stored))[1].tobytes()
    if form.format == "jpeg":
        return cv2.imencode(".jpg", to_bgr(stored), [cv2.IMWRITE_JPEG_QUALITY, 98])[1].tobytes()
    if form.format == "tiff":
        buf = io.BytesIO()
        if form.channels == 1:
            tone = "miniswhite" if form.photometric == "MONOCHROME1" else "minisblack"
            tifffile.imwrite(buf, stored[:, :, 0], photometric=tone)
        else:
            extra = {"extrasamples": ["unassalpha"]} if form.channels == 4 else {}
            tifffile.imwrite(buf, stored, photometric="rgb", **extra)
        return buf.getvalue()
    return dicom_bytes(stored, form)


def read_independently(form: Form, data: bytes) -> np.ndarray:
    """Stored values (H, W, C) of an encoded file, read without medsr_dist."""
    if form.format in ("png", "jpeg"):
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if array.ndim == 2:
            return array[:, :, None]
        code = cv2.COLOR_BGR2RGB if array.shape[2] == 3 else cv2.COLOR_BGRA2RGBA
        return cv2.cvtColor(array, code)
    if form.format == "tiff":
        array = tifffile.imread(io.BytesIO(data))
        return array[:, :, None] if array.ndim == 2 else array
    array = pydicom.dcmread(io.BytesIO(data)).pixel_array
    return array[:, :, None] if array.ndim == 2 else array


def display(form: Form, stored: np.ndarray) -> np.ndarray:
    """What decode must return for ``stored``: float32 in [0, 1], MONOCHROME1 inverted."""
    if form.photometric == "MONOCHROME1":
        stored = form.maxval - stored.astype(np.int64)
    return stored.astype(np.float32) / np.float32(form.maxval)


@pytest.fixture(params=FORMS, ids=lambda f: f.id)
def form(request) -> Form:
    return request.param


@pytest.fixture(params=LOSSLESS, ids=lambda f: f.id)
def lossless_form(request) -> Form:
    return request.param


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def test_decode_reports_how_the_image_is_stored(form):
    image = decode_image(write_source(form, stored_values(form)), f"sample.{form.format}")
    assert (image.meta.format, image.meta.dtype, image.meta.bits_stored) == (form.format, form.dtype, form.bits)
    assert (image.meta.channels, image.meta.photometric) == (form.channels, form.photometric)
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (H, W, form.channels)
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
    assert (image.header is not None) == (form.format == "dicom")


def test_decode_normalises_stored_values_by_the_stored_maximum(lossless_form):
    form = lossless_form
    stored = stored_values(form)
    image = decode_image(write_source(form, stored), "sample")
    np.testing.assert_array_equal(image.pixels, display(form, stored))


def test_colour_comes_back_in_rgb_order_not_bgr():
    stored = np.zeros((4, 4, 3), np.uint8)
    stored[..., 0] = 255  # pure red
    png = cv2.imencode(".png", cv2.cvtColor(stored, cv2.COLOR_RGB2BGR))[1].tobytes()
    pixels = decode_image(png, "red.png").pixels
    assert pixels[..., 0].min() == 1.0 and pixels[..., 1:].max() == 0.0


def test_format_is_detected_from_content_not_from_the_name():
    png = write_source(FORMS[0], stored_values(FORMS[0]))
    dcm = write_source(FORMS[14], stored_values(FORMS[14]))
    assert decode_image(png, "misnamed.dcm").meta.format == "png"
    assert decode_image(dcm, "misnamed.png").meta.format == "dicom"


def test_decode_never_modifies_the_input_buffer(form):
    data = bytearray(write_source(form, stored_values(form)))
    snapshot = bytes(data)
    decode_image(data, "sample")
    decode_image(memoryview(data), "sample")
    assert bytes(data) == snapshot


def test_jpeg_exif_orientation_is_applied():
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # a bright band on the left of the stored raster
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", exif=exif, quality=95)
    pixels = decode_image(buf.getvalue(), "rotated.jpg").pixels
    assert pixels.shape == (40, 20, 3)
    assert pixels[:10].mean() > 0.9 and pixels[20:].mean() < 0.1  # the band is now on top


# ----------------------------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_keeps_the_form_and_every_value(lossless_form):
    form = lossless_form
    stored = stored_values(form)
    first = decode_image(write_source(form, stored), "in")
    encoded = encode_image(first.pixels, first.meta, first.header)
    second = decode_image(encoded, "out")
    for attribute in ("format", "dtype", "bits_stored", "channels", "photometric"):
        assert getattr(second.meta, attribute) == getattr(first.meta, attribute)
    np.testing.assert_array_equal(second.pixels, first.pixels)
    np.testing.assert_array_equal(read_independently(form, encoded), stored)


@pytest.mark.parametrize("form", [f for f in FORMS if f.format == "jpeg"], ids=lambda f: f.id)
def test_jpeg_round_trip_keeps_the_form_and_is_close(form):
    first = decode_image(write_source(form, stored_values(form)), "in.jpg")
    encoded = encode_image(first.pixels, first.meta)
    second = decode_image(encoded, "out.jpg")
    kept = (second.meta.format, second.meta.channels, second.meta.photometric)
    assert kept == ("jpeg", form.channels, form.photometric)
    assert np.abs(second.pixels - first.pixels).mean() < 3 / 255


@pytest.mark.parametrize("form", [f for f in FORMS if f.dtype == "uint16"], ids=lambda f: f.id)
def test_sixteen_bit_values_are_not_squashed_to_eight(form):
    stored = stored_values(form)
    first = decode_image(write_source(form, stored), "in")
    upscaled = cv2.resize(first.pixels, (2 * W, 2 * H), interpolation=cv2.INTER_NEAREST).reshape(2 * H, 2 * W, -1)
    encoded = encode_image(upscaled, first.meta, first.header, scale=2.0)
    written = read_independently(form, encoded)
    assert written.dtype == np.uint16 and written.shape == (2 * H, 2 * W, form.channels)
    assert written.max() > 255
    np.testing.assert_array_equal(written[::2, ::2], stored)


def test_encode_rounds_and_clips_out_of_range_values():
    meta = ImageMeta("png", "uint16", 16, 1, "MONOCHROME2")
    pixels = np.array([[-0.5, 0.0, 0.5, 1.0, 1.7]], np.float32)[:, :, None]
    written = read_independently(FORMS[3], encode_image(pixels, meta))
    assert written[0, :, 0].tolist() == [0, 0, 32768, 65535, 65535]


def test_encode_refuses_pixels_that_do_not_fit_the_form():
    gray = ImageMeta("png", "uint8", 8, 1, "MONOCHROME2")
    with pytest.raises(ValueError, match="channels|\\(H, W, 1\\)"):
        encode_image(np.zeros((4, 4, 3), np.float32), gray)
    with pytest.raises(ValueError, match="NaN"):
        encode_image(np.full((4, 4, 1), np.nan, np.float32), gray)
    dicom = ImageMeta("dicom", "uint16", 12, 1, "MONOCHROME2")
    with pytest.raises(ValueError, match="header"):
        encode_image(np.zeros((4, 4, 1), np.float32), dicom, header=None)


def test_meta_json_round_trips_exactly(form):
    meta = decode_image(write_source(form, stored_values(form)), "sample").meta
    text = meta.to_json()
    assert isinstance(json.loads(text), dict)
    assert ImageMeta.from_json(text) == meta


def test_output_extension_names_the_written_format():
    assert [output_extension(f) for f in ("png", "jpeg", "tiff", "dicom")] == [".png", ".jpg", ".tif", ".dcm"]
    meta = ImageMeta("dicom", "uint16", 12, 1, "MONOCHROME1")
    assert output_extension(meta) == ".dcm"


# ----------------------------------------------------------------------------------------------------------------
# Provenance and text metadata


@pytest.mark.parametrize(
    "form", [f for f in FORMS if f.format in ("png", "tiff", "jpeg")], ids=lambda f: f.id
)
def test_provenance_is_written_into_the_file_and_read_back(form):
    first = decode_image(write_source(form, stored_values(form)), "in")
    provenance = {**PROVENANCE, "medsr:operator": "Zoë Ñúñez — ✓"}  # beyond Latin-1 too
    encoded = encode_image(first.pixels, first.meta, provenance=provenance)
    assert decode_image(encoded, "out").meta.text == provenance
    # ... and in the place other tools look for it.
    if form.format == "png":
        assert Image.open(io.BytesIO(encoded)).text == provenance  # PIL checks the chunk CRCs
    elif form.format == "jpeg":
        assert json.loads(Image.open(io.BytesIO(encoded)).info["comment"].decode("utf-8")) == provenance
    else:
        assert json.loads(tifffile.TiffFile(io.BytesIO(encoded)).pages[0].description) == provenance


def test_existing_png_text_is_read_and_carried_into_the_output():
    source = Image.fromarray(np.zeros((8, 8), np.uint8))
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Source", "CR reader 7")
    info.add_itxt("Description", "Thorax p.a., Schädel frei")
    buf = io.BytesIO()
    source.save(buf, "PNG", pnginfo=info)
    first = decode_image(buf.getvalue(), "in.png")
    assert first.meta.text == {"Source": "CR reader 7", "Description": "Thorax p.a., Schädel frei"}
    second = decode_image(encode_image(first.pixels, first.meta, provenance=PROVENANCE), "out.png")
    assert second.meta.text == {**first.meta.text, **PROVENANCE}


def test_plain_tiff_description_and_jpeg_comment_become_text():
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((8, 8), np.uint16), description="slide 4, stain H&E", metadata=None)
    assert decode_image(buf.getvalue(), "in.tif").meta.text == {"ImageDescription": "slide 4, stain H&E"}
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "JPEG", comment=b"scanned at 300 dpi")
    assert decode_image(buf.getvalue(), "in.jpg").meta.text == {"comment": "scanned at 300 dpi"}


# ----------------------------------------------------------------------------------------------------------------
# DICOM specifics


def test_monochrome1_is_inverted_on_decode_and_re_inverted_on_encode():
    image = make_radiograph(3, 64)  # bone bright
    mono1 = dataset_to_bytes(build_radiograph_dataset(image, bits_stored=16, photometric="MONOCHROME1"))
    mono2 = dataset_to_bytes(build_radiograph_dataset(image, bits_stored=16, photometric="MONOCHROME2"))
    raw1 = pydicom.dcmread(io.BytesIO(mono1)).pixel_array
    raw2 = pydicom.dcmread(io.BytesIO(mono2)).pixel_array
    np.testing.assert_array_equal(raw1, 65535 - raw2)  # MONOCHROME1 stores bone as low values

    a, b = decode_image(mono1, "mono1.dcm"), decode_image(mono2, "mono2.dcm")
    np.testing.assert_array_equal(a.pixels, b.pixels)  # ... yet both display alike
    np.testing.assert_allclose(a.pixels[:, :, 0], image, atol=0.5 / 65535)
    assert (a.meta.photometric, b.meta.photometric) == ("MONOCHROME1", "MONOCHROME2")

    out = pydicom.dcmread(io.BytesIO(encode_image(a.pixels, a.meta, a.header)))
    assert out.PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_array_equal(out.pixel_array, raw1)


def test_decoded_dicom_keeps_the_clinical_header_in_meta_and_header():
    ds = build_radiograph_dataset(make_radiograph(1, 64), bits_stored=12, patient_id="00000042")
    ds.RescaleSlope, ds.RescaleIntercept = "2.5", "-1024"
    ds.WindowCenter, ds.WindowWidth = ["1500", "2000"], ["3000", "1000"]
    image = decode_image(dataset_to_bytes(ds), "ct-like.dcm")
    summary = image.meta.dicom
    assert image.meta.patient_id == "00000042"
    assert (summary["rescale_slope"], summary["rescale_intercept"]) == (2.5, -1024.0)
    assert (summary["window_center"], summary["window_width"]) == ([1500.0, 2000.0], [3000.0, 1000.0])
    assert summary["pixel_spacing"] == summary["imager_pixel_spacing"] == [0.143, 0.143]
    assert summary["study_instance_uid"] == ds.StudyInstanceUID and summary["modality"] == "DX"
    header = pydicom.dcmread(io.BytesIO(image.header))
    assert "PixelData" not in header
    assert header.PatientID == "00000042" and header.SOPInstanceUID == ds.SOPInstanceUID


def derive(source: bytes, provenance=PROVENANCE, scale: float = 2.0) -> tuple[MedicalImage, pydicom.Dataset]:
    image = decode_image(source, "source.dcm")
    h, w, _ = image.pixels.shape
    upscaled = cv2.resize(image.pixels, (int(w * scale), int(h * scale)), interpolation=cv2.INTER_CUBIC)
    encoded = encode_image(upscaled[:, :, None], image.meta, image.header, scale=scale, provenance=provenance)
    return image, pydicom.dcmread(io.BytesIO(encoded))  # no force: a proper Part 10 file


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_super_resolved_dicom_is_a_derived_object_of_the_same_study(photometric):
    ds = build_radiograph_dataset(
        make_radiograph(2, 64), bits_stored=12, photometric=photometric, patient_id="00000007", patient_name="DOE^JANE"
    )
    ds.SeriesDescription = "CHEST PA"
    _, out = derive(dataset_to_bytes(ds))

    assert out.SOPInstanceUID != ds.SOPInstanceUID and out.SeriesInstanceUID != ds.SeriesInstanceUID
    assert out.StudyInstanceUID == ds.StudyInstanceUID
    assert (out.PatientID, str(out.PatientName)) == ("00000007", "DOE^JANE")
    assert out.SOPClassUID == ds.SOPClassUID
    assert list(out.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert "realesrgan-x2-cxr" in out.DerivationDescription
    assert PROVENANCE["medsr:model_sha256"] in out.DerivationDescription
    assert "x2" in out.DerivationDescription
    assert out.SeriesDescription.startswith("CHEST PA") and out.SeriesDescription != "CHEST PA"
    assert (out.Rows, out.Columns) == (128, 128) and out.pixel_array.shape == (128, 128)
    assert [float(v) for v in out.PixelSpacing] == [0.0715, 0.0715]
    assert [float(v) for v in out.ImagerPixelSpacing] == [0.0715, 0.0715]
    assert (out.BitsAllocated, out.BitsStored, out.HighBit, out.PixelRepresentation) == (16, 12, 11, 0)
    assert out.pixel_array.max() <= 4095
    assert out.PhotometricInterpretation == photometric
    assert (out.WindowCenter, out.WindowWidth) == (ds.WindowCenter, ds.WindowWidth)
    assert (out.RescaleSlope, out.RescaleIntercept) == (ds.RescaleSlope, ds.RescaleIntercept)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    reference = out.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == ds.SOPClassUID


def test_derived_uids_give_one_new_series_per_source_series_and_model():
    image = make_radiograph(4, 32)
    first = build_radiograph_dataset(image, series_uid="1.2.3.4", sop_uid="1.2.3.4.1", study_uid="1.2.3")
    second = build_radiograph_dataset(image, series_uid="1.2.3.4", sop_uid="1.2.3.4.2", study_uid="1.2.3")
    _, a = derive(dataset_to_bytes(first))
    _, b = derive(dataset_to_bytes(second))
    _, a_again = derive(dataset_to_bytes(first))
    _, other_model = derive(dataset_to_bytes(first), {**PROVENANCE, "medsr:model_sha256": "ab" * 32})
    assert a.SeriesInstanceUID == b.SeriesInstanceUID  # same input series, same model -> same new series
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert a.SOPInstanceUID == a_again.SOPInstanceUID  # a retried task writes the same object
    assert other_model.SeriesInstanceUID != a.SeriesInstanceUID


def test_preamble_less_and_implicit_vr_dicom_are_accepted():
    ds = build_radiograph_dataset(make_radiograph(5, 48), bits_stored=12)
    reference = decode_image(dataset_to_bytes(ds), "part10.dcm")
    for data in (dataset_to_bytes(ds, implicit_vr=True), dataset_to_bytes(ds, preamble=False, implicit_vr=True)):
        image = decode_image(data, "old.dcm")
        np.testing.assert_array_equal(image.pixels, reference.pixels)
        out = pydicom.dcmread(io.BytesIO(encode_image(image.pixels, image.meta, image.header)))
        assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_multi_frame_dicom_decodes_every_frame_and_writes_one_multi_frame_object():
    frames = np.stack([make_radiograph(i, 32) for i in range(3)])
    data = dataset_to_bytes(build_radiograph_dataset(frames, bits_stored=12))
    image = decode_image(data, "cine.dcm")
    assert image.meta.frames == 3 and image.pixels.shape == (3, 32, 32, 1)
    np.testing.assert_array_equal(image.pixels[..., 0], np.rint(frames * 4095).astype(np.float32) / 4095)
    out = pydicom.dcmread(io.BytesIO(encode_image(np.repeat(np.repeat(image.pixels, 2, 1), 2, 2), image.meta,
                                                  image.header, scale=2)))
    assert (out.NumberOfFrames, out.Rows, out.Columns) == (3, 64, 64)
    np.testing.assert_array_equal(out.pixel_array[:, ::2, ::2], np.rint(frames * 4095).astype(np.uint16))
    with pytest.raises(ValueError, match=r"\(3, H, W, 1\)"):
        encode_image(image.pixels[0], image.meta, image.header)  # one frame of three is not the object


def test_compressed_dicom_that_pydicom_can_decode_is_accepted_and_written_uncompressed():
    ds = build_radiograph_dataset(make_radiograph(6, 32), bits_stored=12)
    reference = decode_image(dataset_to_bytes(ds), "plain.dcm")
    ds.compress(RLELossless)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    image = decode_image(buf.getvalue(), "rle.dcm")
    np.testing.assert_array_equal(image.pixels, reference.pixels)
    out = pydicom.dcmread(io.BytesIO(encode_image(image.pixels, image.meta, image.header)))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


@pytest.mark.parametrize("syntax, cause", [
    (JPEG2000Lossless, "corrupt or unsupported codestream"),  # a decoder is installed; the stream is garbage
    (pydicom.uid.MPEG2MPML, "no pixel-data decoder for it is installed"),  # video: pydicom decodes none
])
def test_compressed_dicom_that_cannot_be_decoded_is_rejected_clearly(syntax, cause):
    ds = build_radiograph_dataset(make_radiograph(6, 32), bits_stored=12)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    with pytest.raises(ImageDecodeError, match=rf"c\.dcm: compressed transfer syntax {syntax.name[:8]}.*{cause}"):
        decode_image(buf.getvalue(), "c.dcm")


# ----------------------------------------------------------------------------------------------------------------
# Bad input

CORRUPT = make_corrupt_files()
REASONS = {
    "truncated.png": "truncated PNG",
    "empty.png": "empty file",
    "notes.png": "not a recognised image format",
    "truncated.jpg": "truncated JPEG",
    "corrupt.dcm": "corrupt DICOM pixel data",
    "garbage.dcm": "DICOM",
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_bad_files_raise_image_decode_error_naming_file_and_reason(name):
    assert set(REASONS) == set(CORRUPT)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(CORRUPT[name], name)
    assert str(caught.value).startswith(f"{name}: ")
    assert REASONS[name] in caught.value.reason
    assert isinstance(caught.value, ValueError)


def test_image_decode_error_survives_pickling_between_workers():
    error = pickle.loads(pickle.dumps(ImageDecodeError("a.png", "truncated PNG")))
    assert (error.name, error.reason, str(error)) == ("a.png", "truncated PNG", "a.png: truncated PNG")


def test_unsupported_samples_are_rejected_rather_than_misread():
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((8, 8), np.float32))
    with pytest.raises(ImageDecodeError, match="float32"):
        decode_image(buf.getvalue(), "float.tif")
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((2, 8, 8), np.uint16))
    with pytest.raises(ImageDecodeError, match="multi-page TIFF"):
        decode_image(buf.getvalue(), "stack.tif")


def test_derived_dicom_instance_uid_depends_on_every_parameter():
    """Two outputs of one image that differ only in inference parameters are different instances."""
    import pydicom

    from medsr_dist.data.synthetic import make_radiograph
    from medsr_dist.io.dicom import build_radiograph_dataset, dataset_to_bytes

    src = decode_image(dataset_to_bytes(build_radiograph_dataset(make_radiograph(3, 32))), "a.dcm")
    out = np.kron(src.pixels, np.ones((2, 2, 1), np.float32))
    base = {"medsr:model": "m", "medsr:model_sha256": "abc", "medsr:scale": "2"}
    uids = [
        pydicom.dcmread(io.BytesIO(encode_image(out, src.meta, src.header, scale=2, provenance={**base, "medsr:params": p})))
        for p in ('{"tile": 0}', '{"tile": 64}')
    ]
    assert uids[0].SOPInstanceUID != uids[1].SOPInstanceUID
    assert uids[0].SeriesInstanceUID == uids[1].SeriesInstanceUID  # one new series per source series and model


# ----------------------------------------------------------------------------------------------------------------
# Compressed TIFF, as scanners write it (codecs from imagecodecs)


@pytest.mark.parametrize("compression, kwargs", [
    ("lzw", {}), ("lzw", {"predictor": True}), ("zlib", {}), ("adobe_deflate", {}), ("packbits", {}), ("zstd", {}),
])
@pytest.mark.parametrize("layout", ["grey16", "rgb8"])
def test_lossless_compressed_tiff_decodes_every_value(compression, kwargs, layout):
    rng = np.random.default_rng(4)
    truth = (rng.integers(0, 65536, (40, 56)).astype(np.uint16) if layout == "grey16"
             else rng.integers(0, 256, (40, 56, 3)).astype(np.uint8))
    buf = io.BytesIO()
    tifffile.imwrite(buf, truth, compression=compression, **kwargs)
    with tifffile.TiffFile(io.BytesIO(buf.getvalue())) as tif:
        assert tif.pages.first.compression != tifffile.COMPRESSION.NONE
    image = decode_image(buf.getvalue(), f"scan-{compression}.tif")
    maxval = np.iinfo(truth.dtype).max
    np.testing.assert_array_equal(np.rint(image.pixels * maxval).astype(truth.dtype).reshape(truth.shape), truth)


@pytest.mark.parametrize("layout", ["ycbcr", "rgb", "grey"])
def test_jpeg_compressed_tiff_decodes_like_libtiff(layout):
    """YCbCr 2x2-subsampled JPEG pages (tifffile's and most scanners' default for RGB), RGB JPEG pages, grey."""
    grey = np.rint(make_radiograph(9, 64) * 255).astype(np.uint8)
    truth = grey if layout == "grey" else np.stack([grey, 255 - grey, grey // 2 + 64], axis=-1)
    args = {"level": 95} | ({"outcolorspace": "rgb"} if layout == "rgb" else {})
    buf = io.BytesIO()
    tifffile.imwrite(buf, truth, compression="jpeg", compressionargs=args,
                     photometric="minisblack" if layout == "grey" else "rgb")
    with tifffile.TiffFile(io.BytesIO(buf.getvalue())) as tif:
        page = tif.pages.first
        assert page.compression == tifffile.COMPRESSION.JPEG
        assert page.photometric == {"ycbcr": 6, "rgb": 2, "grey": 1}[layout]
    image = decode_image(buf.getvalue(), "scan-jpeg.tif")
    assert image.meta.photometric == ("MONOCHROME2" if layout == "grey" else "RGB")
    stored = np.rint(image.pixels * 255).reshape(truth.shape)
    libtiff = _from_cv2_tiff(buf.getvalue(), layout == "grey")  # OpenCV's libtiff, an independent decoder
    assert np.abs(stored - libtiff).max() <= 2
    # 2x2 chroma subsampling costs colour detail (~6 levels here); YCbCr left unconverted would be ~100 levels off
    assert np.abs(stored - truth).mean() < 8.0


def _from_cv2_tiff(data: bytes, grey: bool) -> np.ndarray:
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
    return array.astype(np.float32) if grey else cv2.cvtColor(array, cv2.COLOR_BGR2RGB).astype(np.float32)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pages", [1, 102])
def test_a_tiff_whose_ifd_chain_loops_is_refused_by_probe_and_decode(pages):
    data = tiff_ifd_loop(pages)  # past tifffile's own loop check (~100 IFDs)
    for read in (probe_image, decode_image):
        with pytest.raises(ImageDecodeError, match=rf"IFD {pages - 1} points back to IFD 0 \(a loop in the IFD chain\)"):
            read(data, "loop.tif")


def test_the_ifd_walk_counts_honest_pages_and_refuses_too_many():
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((3, 4, 4), np.uint16), photometric="minisblack")
    assert count_tiff_ifds(buf.getvalue(), "stack.tif") == 3
    assert probe_image(buf.getvalue(), "stack.tif").frames == 3
    with pytest.raises(ImageDecodeError, match="more than 2 IFDs"):
        count_tiff_ifds(buf.getvalue(), "stack.tif", max_ifds=2)
    for big in (False, True):
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.zeros((2, 4, 4), np.uint8), photometric="minisblack", bigtiff=big)
        assert count_tiff_ifds(buf.getvalue(), "two.tif") == 2


def png_with_text(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A small grey PNG with the given (type, payload) text chunks inserted before IEND."""
    import struct
    import zlib

    ok, encoded = cv2.imencode(".png", np.full((8, 8), 100, np.uint8))
    data = encoded.tobytes()
    extra = b"".join(struct.pack(">I", len(p)) + t + p + struct.pack(">I", zlib.crc32(t + p) & 0xFFFFFFFF)
                     for t, p in chunks)
    return data[:-12] + extra + data[-12:]


def test_png_text_is_inflated_within_a_bound_and_oversized_text_is_dropped():
    import zlib

    bomb = zlib.compress(b"A" * (16 << 20), 9)  # 16 MiB of text in ~16 KiB
    assert len(bomb) < 64 * 1024
    data = png_with_text([
        (b"zTXt", b"bomb\x00\x00" + bomb),
        (b"iTXt", b"ibomb\x00\x01\x00\x00\x00" + bomb),
        (b"zTXt", b"Comment\x00\x00" + zlib.compress(b"a scanner note")),
        (b"iTXt", b"Title\x00\x00\x00\x00\x00" + "chest PA".encode()),
    ])
    image = decode_image(data, "bomb.png")
    assert image.meta.text == {"Comment": "a scanner note", "Title": "chest PA"}
    out = encode_image(image.pixels, image.meta, {"medsr:note": "x"})
    assert len(out) < 4096  # nothing of the 16 MiB travels into the output


def _patched_element(data: bytes, tag: bytes, vr: bytes, value: bytes) -> bytes:
    """``data`` (Explicit VR Little Endian) with the element ``tag``/``vr`` rewritten to ``value`` (padded to its
    length): a malformed value as real archives hold them, which pydicom itself would refuse to write."""
    at = data.find(tag + vr)
    length = int.from_bytes(data[at + 6: at + 8], "little")
    assert at > 0 and len(value) <= length
    return data[: at + 8] + value.ljust(length, b" ") + data[at + 8 + length:]


def test_malformed_numbers_in_a_real_ct_header_are_ignored_and_never_quoted():
    """pydicom's CT_small.dcm with PixelSpacing written with decimal commas ("0,66") and SeriesNumber holding a
    letter: the image decodes, both attributes are absent and listed as ignored, the derived object leaves the
    unscalable spacing out, and no raw value appears anywhere it could be logged."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = _patched_element(buf.getvalue(), b"\x28\x00\x30\x00", b"DS", b"0,66\\0,66")
    data = _patched_element(data, b"\x20\x00\x11\x00", b"IS", b"1a")
    image = decode_image(data, "comma.dcm")
    assert image.meta.dicom["pixel_spacing"] is None and image.meta.dicom["series_number"] is None
    assert image.meta.dicom["ignored_attributes"] == ["SeriesNumber", "PixelSpacing"]
    assert "0,66" not in json.dumps(image.meta.dicom)
    big = np.repeat(np.repeat(image.pixels, 2, 0), 2, 1)
    derived = pydicom.dcmread(io.BytesIO(encode_image(big, image.meta, image.header, provenance={"medsr:scale": "2"})))
    assert "PixelSpacing" not in derived and derived.Rows == 2 * ds.Rows
