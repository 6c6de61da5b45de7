"""Procedural sample data: domain-like, deterministic, fast, and written as a realistic mixed archive."""

from __future__ import annotations

import re
import time
from collections import Counter

import cv2
import numpy as np
import pytest

from medsr_dist.data.synthetic import SAMPLE_FORMATS, make_fundus, make_radiograph, write_sample_archive
from medsr_dist.io.image import decode_image


def high_frequency_fraction(image: np.ndarray) -> float:
    """Share of the image variance above ~1/(2*pi*2) cycles per pixel (what SR has to restore)."""
    residual = image - cv2.GaussianBlur(image, (0, 0), 2.0)
    return float(residual.var() / image.var())


def edge_density(image: np.ndarray, step: float = 0.02) -> float:
    """Fraction of pixels where the intensity changes by more than ``step`` per pixel."""
    gx = cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=3) / 8
    return float((np.hypot(gx, gy) > step).mean())


def thin_bright_fraction(image: np.ndarray, width: int = 7, contrast: float = 0.05) -> float:
    """Fraction of pixels in bright structures narrower than ``width`` px standing ``contrast`` above their
    surroundings (white top-hat): rib cortices, vessels, markers."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width))
    return float((cv2.morphologyEx(image, cv2.MORPH_TOPHAT, kernel) > contrast).mean())


def smooth_gradient(size: int = 512) -> np.ndarray:
    axis = np.linspace(0.0, 1.0, size, dtype=np.float32)
    u, v = np.meshgrid(axis, axis)
    image = 0.2 + 0.6 * np.exp(-((u - 0.5) ** 2 + (v - 0.5) ** 2) / 0.08)
    noise = np.random.default_rng(0).normal(0.0, 0.008, image.shape)
    return np.clip(image + noise, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Radiographs


@pytest.mark.parametrize("size", [512, 96])
def test_radiograph_is_a_float_image_in_unit_range(size):
    image = make_radiograph(0, size)
    assert image.shape == (size, size) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image.max() - image.min() > 0.7  # uses the range: dark air to bright bone and marker


def test_radiograph_is_deterministic_per_seed():
    np.testing.assert_array_equal(make_radiograph(11), make_radiograph(11))
    assert np.abs(make_radiograph(11) - make_radiograph(12)).mean() > 0.01


def test_radiograph_has_thin_high_contrast_structures_that_a_smooth_gradient_lacks():
    gradient = smooth_gradient()
    assert high_frequency_fraction(gradient) < 0.01
    assert edge_density(gradient) < 0.01
    assert thin_bright_fraction(gradient) < 0.01
    for seed in range(3):
        image = make_radiograph(seed)
        assert high_frequency_fraction(image) > 0.015
        assert edge_density(image) > 0.1
        assert thin_bright_fraction(image) > 0.05


def test_radiograph_shows_dark_lungs_beside_a_bright_mediastinum_inside_a_body():
    image = make_radiograph(3)
    band = slice(int(0.25 * 512), int(0.45 * 512))
    right_lung = image[band, int(0.25 * 512) : int(0.35 * 512)].mean()
    left_lung = image[band, int(0.65 * 512) : int(0.75 * 512)].mean()
    mediastinum = image[band, int(0.47 * 512) : int(0.53 * 512)].mean()
    air = image[:20, :20].mean()
    abdomen = image[int(0.85 * 512) :, int(0.3 * 512) : int(0.7 * 512)].mean()
    assert air < 0.1
    assert mediastinum > max(right_lung, left_lung) + 0.1
    assert abdomen > max(right_lung, left_lung) + 0.1


def test_radiograph_is_fast():
    make_radiograph(0)
    best = min(_timed(make_radiograph, seed) for seed in range(3))
    assert best < 0.3, f"make_radiograph(512) took {best:.3f} s"


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------
# Fundus photographs


def test_fundus_is_an_orange_retina_in_a_black_circle_with_dark_thin_vessels():
    image = make_fundus(0, 256)
    assert image.shape == (256, 256, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image[:12, :12].max() < 0.02  # outside the field of view
    retina = image[64:192, 64:192].reshape(-1, 3).mean(0)
    assert retina[0] > retina[1] > retina[2]  # red > green > blue
    green = image[..., 1]
    assert green.max() > 0.7  # the optic disc is the bright spot
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
    dark_thin = cv2.morphologyEx(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.MORPH_BLACKHAT, kernel)
    assert (dark_thin > 0.05).mean() > 0.01  # vessels


def test_fundus_is_deterministic_per_seed():
    np.testing.assert_array_equal(make_fundus(4, 128), make_fundus(4, 128))
    assert np.abs(make_fundus(4, 128) - make_fundus(5, 128)).mean() > 0.005


# ----------------------------------------------------------------------------------------------------------------
# Sample archive


@pytest.fixture(scope="module")
def archive() -> tuple[dict[str, bytes], list[dict]]:
    store: dict[str, bytes] = {}
    rows = write_sample_archive(store.__setitem__, n_images=14, size=128, seed=1)
    return store, rows


def test_archive_writes_one_file_per_returned_row(archive):
    store, rows = archive
    assert len(rows) == 14 and sorted(store) == sorted(r["key"] for r in rows)
    assert set(rows[0]) == {"key", "format", "bits", "patient_id", "photometric"}


def test_archive_mixes_the_promised_formats(archive):
    _, rows = archive
    forms = Counter((r["format"], r["bits"], r["photometric"]) for r in rows)
    for required in [
        ("png", 8, "MONOCHROME2"),
        ("png", 16, "MONOCHROME2"),
        ("tiff", 16, "MONOCHROME2"),
        ("dicom", 12, "MONOCHROME2"),
        ("dicom", 16, "MONOCHROME1"),
        ("dicom", 16, "MONOCHROME2"),
        ("jpeg", 8, "MONOCHROME2"),
    ]:
        assert forms[required] == 2, required
    assert set(forms) == set(SAMPLE_FORMATS)


def test_archive_uses_nih_style_names_with_several_images_per_patient(archive):
    _, rows = archive
    for row in rows:
        match = re.fullmatch(r"(\d{8})_(\d{3})\.(png|tif|dcm|jpg)", row["key"])
        assert match, row["key"]
        assert match.group(1) == row["patient_id"]
    per_patient = Counter(r["patient_id"] for r in rows)
    assert len(per_patient) >= 3 and min(per_patient.values()) >= 2
    followups = {r["key"][:12] for r in rows}
    assert len(followups) == len(rows)  # no follow-up number reused within a patient


def test_archive_files_decode_to_what_the_rows_promise(archive):
    store, rows = archive
    for row in rows:
        image = decode_image(store[row["key"]], row["key"])
        assert image.meta.format == row["format"]
        assert image.meta.bits_stored == row["bits"]
        assert image.meta.photometric == row["photometric"]
        assert image.pixels.shape == (128, 128, 1)
        if row["format"] == "dicom":
            assert image.meta.patient_id == row["patient_id"]
            assert image.meta.dicom["pixel_spacing"] == [0.143, 0.143]


def test_archive_is_reproducible_and_respects_the_patient_count():
    first: dict[str, bytes] = {}
    second: dict[str, bytes] = {}
    rows = write_sample_archive(first.__setitem__, n_images=6, size=48, seed=3, n_patients=2)
    write_sample_archive(second.__setitem__, n_images=6, size=48, seed=3, n_patients=2)
    assert first == second
    assert {r["patient_id"] for r in rows} == {"00000001", "00000002"}
