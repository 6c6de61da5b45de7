"""Specification of evaluation: basicsr-identical PSNR/SSIM on our array conventions, comparison PNGs, reports."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

import medsr_dist.compat  # noqa: F401  (must precede basicsr)
from basicsr.metrics.psnr_ssim import calculate_psnr, calculate_ssim
from basicsr.utils.matlab_functions import imresize as matlab_imresize
from medsr_dist.eval.metrics import bicubic_downscale, bicubic_upscale, psnr, ssim
from medsr_dist.eval.report import CropBox, ReportEntry, disagreement_box, side_by_side, write_report


def textured(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """float32 [0, 1] image with smooth structure plus fine detail (what SR is about)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phases = rng.random(channels, dtype=np.float32) * 6
    smooth = np.stack([0.5 + 0.3 * np.sin(xx / 7 + p) * np.cos(yy / 9 - p) for p in phases], axis=2)
    return np.clip(smooth + 0.15 * rng.standard_normal((height, width, channels), dtype=np.float32), 0, 1)


def noisy(image: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image + sigma * rng.standard_normal(image.shape).astype(np.float32), 0, 1)


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("test_y_channel", [False, True], ids=["rgb", "y"])
@pytest.mark.parametrize("crop_border", [0, 4])
def test_8bit_metrics_equal_basicsr_on_the_same_pixels(crop_border, test_y_channel):
    gt = (textured(48, 40) * 255).round().astype(np.uint8)
    out = (noisy(textured(48, 40), 0.05) * 255).round().astype(np.uint8)
    args = dict(crop_border=crop_border, test_y_channel=test_y_channel)
    # basicsr reads images with cv2, i.e. BGR; ours are RGB, so basicsr sees the channel-reversed arrays
    assert psnr(out, gt, **args) == pytest.approx(calculate_psnr(out[..., ::-1], gt[..., ::-1], **args), abs=1e-9)
    assert ssim(out, gt, **args) == pytest.approx(calculate_ssim(out[..., ::-1], gt[..., ::-1], **args), abs=1e-9)
    # float images in [0, 1] holding the same values score the same
    assert psnr(out / 255.0, gt / 255.0, **args) == pytest.approx(psnr(out, gt, **args), abs=1e-6)
    assert ssim(out / 255.0, gt / 255.0, **args) == pytest.approx(ssim(out, gt, **args), abs=1e-6)


def test_y_channel_uses_rgb_order():
    """Pure red and pure blue have very different luma; swapping R and B must change the Y-PSNR."""
    gt = np.zeros((16, 16, 3), dtype=np.uint8)
    red = gt.copy()
    red[..., 0] = 255
    blue = gt.copy()
    blue[..., 2] = 255
    # BT.601 luma: full red raises Y by 65.5, full blue by 25.0 (on the 0-255 scale)
    assert psnr(red, gt, test_y_channel=True) < psnr(blue, gt, test_y_channel=True)


@pytest.mark.parametrize("test_y_channel", [False, True], ids=["rgb", "y"])
def test_16bit_metrics_do_not_overflow_and_match_basicsr_on_the_rescaled_image(test_y_channel):
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 65536, size=(32, 30, 3), dtype=np.uint16)
    out = gt.copy()
    out[::3, ::2] = 65535 - out[::3, ::2]  # differences that wrap around in uint16 arithmetic
    mse = np.mean((out.astype(np.float64) - gt.astype(np.float64)) ** 2)
    if not test_y_channel:
        assert psnr(out, gt) == pytest.approx(10 * np.log10(65535.0**2 / mse), abs=1e-9)
    on_basicsr_scale = [(a[..., ::-1].astype(np.float64) * 255 / 65535) for a in (out, gt)]
    args = dict(crop_border=2, test_y_channel=test_y_channel)
    assert psnr(out, gt, **args) == pytest.approx(calculate_psnr(*on_basicsr_scale, **args), abs=1e-9)
    assert ssim(out, gt, **args) == pytest.approx(calculate_ssim(*on_basicsr_scale, **args), abs=1e-9)
    # 16-bit and the same picture in float [0, 1] agree
    assert ssim(out, gt, **args) == pytest.approx(ssim(out / 65535.0, gt / 65535.0, **args), abs=1e-6)


def test_12bit_data_in_uint16_uses_max_value():
    gt = (textured(24, 24) * 4095).round().astype(np.uint16)
    out = (noisy(textured(24, 24), 0.02) * 4095).round().astype(np.uint16)
    assert psnr(out, gt, max_value=4095) == pytest.approx(psnr(out / 4095.0, gt / 4095.0), abs=1e-6)
    assert ssim(out, gt, max_value=4095) == pytest.approx(ssim(out / 4095.0, gt / 4095.0), abs=1e-6)


def test_a_float_output_can_be_scored_against_a_16bit_ground_truth():
    gt16 = (textured(24, 24) * 65535).round().astype(np.uint16)
    output = noisy(gt16 / 65535.0, 0.02).astype(np.float32)
    assert psnr(output, gt16) == pytest.approx(psnr(output, gt16 / 65535.0), abs=1e-6)


def test_identical_images_have_infinite_psnr_and_unit_ssim():
    image = textured(20, 20)
    assert psnr(image, image) == math.inf
    assert ssim(image, image) == pytest.approx(1.0)


def test_gray_images_work_with_or_without_channel_axis():
    gt, out = textured(24, 20, channels=1), noisy(textured(24, 20, channels=1), 0.05)
    assert psnr(out[..., 0], gt[..., 0], test_y_channel=True) == pytest.approx(psnr(out, gt))
    assert ssim(out[..., 0], gt[..., 0]) == pytest.approx(ssim(out, gt))


def test_metrics_reject_mismatched_shapes_and_rgba():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))
    with pytest.raises(ValueError):
        psnr(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)))


def test_bicubic_upscale_and_downscale_shapes_types_and_ranges():
    hr = textured(64, 52)
    lr = bicubic_downscale(hr, 4)
    assert lr.shape == (16, 13, 3) and lr.dtype == np.float32
    np.testing.assert_allclose(lr, np.clip(matlab_imresize(hr, 0.25), 0, 1), atol=1e-6)
    assert bicubic_downscale(hr[..., 0], 3).shape == (22, 18)  # ceil, MATLAB's convention; gray stays 2-D

    up = bicubic_upscale(lr, 4)
    assert up.shape == (64, 52, 3) and up.dtype == np.float32 and up.min() >= 0 and up.max() <= 1
    expected = np.clip(cv2.resize(lr, (52, 64), interpolation=cv2.INTER_CUBIC), 0, 1)
    np.testing.assert_allclose(up, expected, atol=1e-7)
    assert bicubic_upscale(lr[..., :1], 2).shape == (32, 26, 1)


def test_bicubic_round_trip_of_smooth_content_is_close():
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    smooth = (0.5 + 0.4 * np.sin(xx / 11) * np.cos(yy / 13))[..., None]
    assert psnr(bicubic_upscale(bicubic_downscale(smooth, 2), 2), smooth, crop_border=2) > 35


# ---------------------------------------------------------------------------------------------------------
# Comparison PNG
# ---------------------------------------------------------------------------------------------------------


def decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.dtype == np.uint8
    return image


def four_panels(gray: bool = False):
    channels = 1 if gray else 3
    gt = textured(48, 40, channels=channels)
    lr = bicubic_downscale(gt, 4)
    bicubic = bicubic_upscale(lr, 4)
    model = gt.copy()
    return [("LR", lr), ("bicubic", bicubic), ("model", model), ("ground truth", gt)]


@pytest.mark.parametrize("gray", [False, True], ids=["rgb", "gray"])
def test_side_by_side_is_an_8bit_png_with_four_panel_widths(gray):
    png = decode_png(side_by_side(four_panels(gray), gap=4))
    assert png.ndim == 3 and png.shape[2] == 3
    assert png.shape[1] == 4 * 40 + 3 * 4
    assert png.shape[0] > 2 * 48, "caption strip, panels and the magnified crop row"


def test_side_by_side_shows_the_lr_nearest_upscaled_and_magnifies_the_given_crop():
    panels = four_panels()
    box = CropBox(y=8, x=12, height=12, width=10)
    rgb = cv2.cvtColor(decode_png(side_by_side(panels, crop_box=box, gap=0)), cv2.COLOR_BGR2RGB)
    height = rgb.shape[0]
    crop_row = rgb[height - 48 :]
    panel_row = rgb[height - 96 : height - 48]
    lr_nearest = np.round(panels[0][1].repeat(4, axis=0).repeat(4, axis=1) * 255).astype(np.uint8)
    inside = (slice(30, 40), slice(30, 38))  # away from the crop outline
    np.testing.assert_array_equal(panel_row[:, :40][inside], lr_nearest[inside])
    gt = np.round(panels[3][1] * 255).astype(np.uint8)
    magnified = cv2.resize(gt[8:20, 12:22], (40, 48), interpolation=cv2.INTER_NEAREST_EXACT)
    np.testing.assert_array_equal(crop_row[:, 120:160], magnified)


def test_crop_is_chosen_where_two_panels_disagree_most():
    a = np.zeros((60, 80), dtype=np.float32)
    b = a.copy()
    b[40:50, 10:20] = 1.0
    box = disagreement_box(a, b, 10, 10)
    assert (box.y, box.x, box.height, box.width) == (40, 10, 10, 10)


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def test_report_lists_every_image_with_scores_and_means():
    files: dict[str, bytes] = {}
    entries = []
    for k, name in enumerate(["slice 001.png", "dir/slice_002", "slice 001.png"]):
        gt = textured(48, 40, seed=k)
        lr = bicubic_downscale(gt, 4)
        entries.append(ReportEntry(name=name, lr=lr, output=noisy(gt, 0.02, seed=k), ground_truth=gt))
    report = write_report(iter(entries), files.__setitem__, crop_border=4, test_y_channel=True)

    on_disk = json.loads(files["report.json"])
    assert on_disk == json.loads(json.dumps(report))
    assert [image["name"] for image in on_disk["images"]] == [e.name for e in entries]
    panel_keys = [image["panel"] for image in on_disk["images"]]
    assert len(set(panel_keys)) == 3, "colliding names get distinct panel files"
    metric_args = dict(crop_border=4, test_y_channel=True)
    for image, entry in zip(on_disk["images"], entries):
        bicubic = bicubic_upscale(entry.lr, 4)
        assert image["bicubic"]["psnr"] == pytest.approx(psnr(bicubic, entry.ground_truth, **metric_args))
        assert image["model"]["ssim"] == pytest.approx(ssim(entry.output, entry.ground_truth, **metric_args))
        assert image["model"]["psnr"] > image["bicubic"]["psnr"]
        assert decode_png(files[image["panel"]]).shape[1] == 4 * 40 + 3 * 4
    for method in ("bicubic", "model"):
        for metric in ("psnr", "ssim"):
            expected = np.mean([image[method][metric] for image in on_disk["images"]])
            assert on_disk["mean"][method][metric] == pytest.approx(expected)
    markdown = files["report.md"].decode()
    assert all(key in markdown for key in panel_keys) and "**mean**" in markdown
    assert set(files) == {"report.json", "report.md", *panel_keys}


def test_report_json_is_strict_when_psnr_is_infinite():
    gt = textured(32, 32)
    files: dict[str, bytes] = {}
    write_report([ReportEntry("perfect", bicubic_downscale(gt, 2), gt.copy(), gt)], files.__setitem__)

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    on_disk = json.loads(files["report.json"], parse_constant=reject)
    assert on_disk["images"][0]["model"]["psnr"] == "inf"
    assert on_disk["mean"]["model"]["psnr"] == "inf"


def test_report_rejects_outputs_that_do_not_match_the_ground_truth():
    gt = textured(32, 32)
    with pytest.raises(ValueError, match="same shape"):
        write_report([ReportEntry("x", bicubic_downscale(gt, 2), gt[:30], gt)], lambda key, data: None)


def test_report_accepts_16bit_gray_images_and_scores_them_like_floats():
    gt = textured(48, 40, channels=1)
    lr = bicubic_downscale(gt, 4)
    output = noisy(gt, 0.02)

    def as_uint16(image):
        return np.round(image * 65535).astype(np.uint16)

    ints = [as_uint16(image) for image in (lr, output, gt)]
    floats = [image / 65535.0 for image in ints]
    as_int = write_report([ReportEntry("i", *ints)], lambda key, data: None)
    as_float = write_report([ReportEntry("f", *floats)], lambda key, data: None)
    for method in ("bicubic", "model"):
        for metric in ("psnr", "ssim"):
            assert as_int["images"][0][method][metric] == pytest.approx(as_float["images"][0][method][metric], abs=1e-4)


def test_bicubic_resizers_refuse_integer_images():
    with pytest.raises(TypeError):
        bicubic_upscale(np.zeros((4, 4), dtype=np.uint16), 2)
    with pytest.raises(TypeError):
        bicubic_downscale(np.zeros((4, 4), dtype=np.uint8), 2)


# ---------------------------------------------------------------------------------------------------------
# HaarPSI and NIQE
# ---------------------------------------------------------------------------------------------------------
def _real_test_images() -> list[tuple[str, np.ndarray]]:
    """Real photographs and a real CT slice, float64 in [0, 1]: skimage's astronaut (RGB) and camera (gray),
    pydicom's CT_small.dcm (16-bit CT, 128x128, rescaled to its own range), one with odd sides."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from skimage import data

    ct = dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(np.float64)
    ct = (ct - ct.min()) / (ct.max() - ct.min())
    return [("astronaut", data.astronaut()[64:224, 128:288].astype(np.float64) / 255),
            ("camera-odd", data.camera()[:131, 40:217, None].astype(np.float64) / 255),
            ("ct-small", ct[:, :, None])]


@pytest.mark.parametrize("distortion", ["noise", "blur", "bicubic-x4"])
def test_haarpsi_equals_the_reference_implementation_on_real_images(distortion, monkeypatch):
    """Our numpy HaarPSI against piq's (the PyTorch port of the authors' code, test extra) on real images.

    piq rounds the authors' YIQ matrix to four decimals (0.5959 for 0.596, ...); with the authors' matrix
    patched in, the two agree to float64 rounding, gray or colour, even or odd sides."""
    torch = pytest.importorskip("torch")
    piq = pytest.importorskip("piq")
    import importlib

    piq_haarpsi = importlib.import_module("piq.haarpsi")  # the module (piq.haarpsi is also the function)

    from medsr_dist.eval.metrics import haarpsi

    authors = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
    monkeypatch.setattr(piq_haarpsi, "rgb2yiq", lambda x: torch.matmul(x.permute(0, 2, 3, 1), authors.t()).permute(0, 3, 1, 2))
    for name, reference in _real_test_images():
        if distortion == "noise":
            image = np.clip(reference + np.random.default_rng(0).normal(0, 0.04, reference.shape), 0, 1)
        elif distortion == "blur":
            image = cv2.GaussianBlur(reference, (7, 7), 1.5).reshape(reference.shape)
        else:
            h, w = (n - n % 4 for n in reference.shape[:2])
            reference = reference[:h, :w]
            image = bicubic_upscale(bicubic_downscale(reference.astype(np.float32), 4), 4).astype(np.float64)

        def tensor(x):
            return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]

        expected = piq.haarpsi(tensor(image), tensor(reference), data_range=1.0, reduction="none").item()
        assert haarpsi(image, reference) == pytest.approx(expected, abs=1e-9), name
        assert 0 < expected < 1
    assert haarpsi(reference, reference) == pytest.approx(1.0, abs=1e-9)


def test_haarpsi_ranks_distortions_and_rejects_too_small_images():
    from medsr_dist.eval.metrics import haarpsi

    _, reference = _real_test_images()[2]
    mild, strong = (np.clip(reference + np.random.default_rng(0).normal(0, s, reference.shape), 0, 1) for s in (0.01, 0.1))
    assert haarpsi(mild, reference) > haarpsi(strong, reference)
    # the same image as uint16 with max_value, and a crop border, are the float image's numbers
    assert haarpsi((mild * 65535).round().astype(np.uint16), (reference * 65535).round().astype(np.uint16)) == \
        pytest.approx(haarpsi(np.round(mild * 65535) / 65535, np.round(reference * 65535) / 65535), abs=1e-12)
    assert haarpsi(mild, reference, crop_border=8) == pytest.approx(haarpsi(mild[8:-8, 8:-8], reference[8:-8, 8:-8]))
    with pytest.raises(ValueError, match="at least 16x16"):
        haarpsi(reference[:12, :40], reference[:12, :40])


def test_niqe_is_basicsrs_and_prefers_the_clean_image():
    from basicsr.metrics.niqe import calculate_niqe
    from skimage import data

    from medsr_dist.eval.metrics import niqe

    camera = data.camera()[:256, :256].astype(np.float64)
    assert niqe(camera[:, :, None] / 255) == pytest.approx(calculate_niqe(camera, 0, input_order="HW"), rel=1e-9)
    noisy_camera = np.clip(camera + np.random.default_rng(0).normal(0, 25, camera.shape), 0, 255)
    assert niqe(noisy_camera[:, :, None] / 255) > niqe(camera[:, :, None] / 255)
    with pytest.raises(ValueError, match="two 96x96 blocks"):
        niqe(camera[:100, :100, None] / 255)
