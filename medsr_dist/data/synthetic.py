"""Procedural sample data that looks like the domain: chest radiographs, retinal fundus photographs, archives.

Nothing is downloaded. The images are made to stress what super-resolution in radiology is about — thin,
high-contrast, curved structures (rib cortices, vessels, the diaphragm edge, a lead side marker) on soft,
large-scale gradients with fine texture and quantum noise — so that a smooth-gradient test image cannot pass
for one. Every generator is deterministic per seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from medsr_dist.io.dicom import build_radiograph_dataset, dataset_to_bytes
from medsr_dist.io.image import ImageMeta, encode_image, output_extension

__all__ = [
    "SAMPLE_FORMATS",
    "make_radiograph",
    "make_fundus",
    "write_sample_archive",
    "make_corrupt_files",
]

# The forms cycled through by write_sample_archive: (format, bits, photometric).
SAMPLE_FORMATS: tuple[tuple[str, int, str], ...] = (
    ("png", 8, "MONOCHROME2"),
    ("png", 16, "MONOCHROME2"),
    ("tiff", 16, "MONOCHROME2"),
    ("dicom", 12, "MONOCHROME2"),
    ("dicom", 16, "MONOCHROME1"),
    ("dicom", 16, "MONOCHROME2"),
    ("jpeg", 8, "MONOCHROME2"),
)


def _soft(signed_distance: np.ndarray, width: float) -> np.ndarray:
    """0..1 ramp across an edge: 1 inside (distance < 0), 0 outside, ``width`` the transition length."""
    return 1.0 / (1.0 + np.exp(np.clip(signed_distance / width, -30.0, 30.0)))


def _ellipse_distance(u, v, cx, cy, ax, ay):
    """Approximate signed distance (in units of the normalised grid) to an axis-aligned ellipse."""
    r = np.sqrt(((u - cx) / ax) ** 2 + ((v - cy) / ay) ** 2)
    return (r - 1.0) * min(ax, ay)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise (size, size) with about ``cells`` blobs across, zero mean, unit-ish std."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _branches(
    rng: np.random.Generator,
    start: tuple[float, float],
    angle: float,
    length: float,
    thickness: float,
    depth: int,
    spread: float = 0.45,
) -> list[tuple[np.ndarray, float]]:
    """A random branching tree as (polyline (N, 2) in pixels, thickness) segments, root first."""
    segments = []
    stack = [(start, angle, length, thickness, depth)]
    while stack:
        (x, y), a, length_, t, d = stack.pop()
        # A gently curving segment: a few sub-steps with a small random turn each.
        points = [(x, y)]
        turn = rng.normal(0.0, 0.08)
        for _ in range(4):
            a += turn
            x, y = x + math.cos(a) * length_ / 4, y + math.sin(a) * length_ / 4
            points.append((x, y))
        segments.append((np.array(points), t))
        if d > 0:
            for side in (-1.0, 1.0):
                child = a + side * rng.uniform(0.5, 1.0) * spread
                stack.append(((x, y), child, length_ * rng.uniform(0.62, 0.8), max(t * 0.72, 1.0), d - 1))
    return segments


def _draw(canvas: np.ndarray, points: np.ndarray, thickness: float, value: float = 1.0) -> None:
    """Anti-aliased polyline on a float canvas; sub-pixel coordinates through cv2's shift."""
    shift = 4
    pts = np.round(points * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(canvas, [pts], False, float(value), max(int(round(thickness)), 1), cv2.LINE_AA, shift)


def make_radiograph(seed: int, size: int = 512) -> np.ndarray:
    """A chest-radiograph-like image, float32 (size, size) in [0, 1], higher = denser (bone bright).

    Large soft gradients (body, darker lung fields, brighter mediastinum, heart and abdomen), thin curved
    high-contrast structures (ribs as bright bands with sharp cortical rims, clavicles, spine end plates,
    branching vessels in the lungs, the diaphragm edge, a lead "L"/"R" marker), fine texture and noise.
    Anatomy proportions, rib layout, vessel trees and noise vary with ``seed``; equal seeds give identical
    arrays. About 30 ms at 512 on one CPU core.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    rng = np.random.default_rng(seed)
    s = float(size)
    axis = (np.arange(size, dtype=np.float32) + 0.5) / s
    u, v = np.meshgrid(axis, axis)
    cx = 0.5 + rng.uniform(-0.02, 0.02)

    # Body and soft tissue (display values: air dark, soft tissue mid-grey, brighter towards the abdomen).
    body = _soft(_ellipse_distance(u, v, cx, 0.6, 0.46 + rng.uniform(-0.02, 0.02), 0.64), 0.012)
    image = 0.05 + body * (0.44 + 0.08 * np.clip(v - 0.3, 0.0, 1.0))

    # Lung fields: darker lobes, darkest apically and laterally, with a domed, crisp diaphragm below.
    lung_w, lung_h = 0.15 + rng.uniform(-0.012, 0.012), 0.3 + rng.uniform(-0.02, 0.02)
    lungs = np.zeros_like(u)
    for side in (-1.0, 1.0):
        lx = cx + side * (0.19 + rng.uniform(-0.01, 0.01))
        lung = _soft(_ellipse_distance(u, v, lx, 0.45, lung_w, lung_h), 0.02)
        dome = 0.64 + rng.uniform(-0.02, 0.02) + 0.14 * ((u - lx) / lung_w) ** 2
        lung *= _soft(v - dome, 0.003)  # diaphragm
        lungs = np.maximum(lungs, lung)
    # Mediastinum and heart (bulging to the patient's left = image right) lie in front of the lungs.
    mediastinum = _soft(np.abs(u - cx) - 0.055, 0.012) * _soft(0.1 - v, 0.03)
    heart_w = 0.14 + rng.uniform(-0.01, 0.015)
    heart = _soft(_ellipse_distance(u, v, cx + 0.05, 0.57, heart_w, 0.12), 0.005)
    dense = np.maximum(mediastinum, heart)
    lungs *= 1.0 - dense
    image -= 0.36 * lungs * (1.0 - 0.3 * np.clip((v - 0.2) / 0.5, 0.0, 1.0))
    image += 0.08 * dense * body
    spine = _soft(np.abs(u - cx) - 0.028, 0.004) * _soft(0.08 - v, 0.01)
    plates = (np.abs(((v * 22.0 + rng.uniform(0, 1)) % 1.0) - 0.5) < 0.06).astype(np.float32)
    image += spine * (0.06 + 0.035 * plates)

    # Bones as polylines: a full band and a narrower inner band give bright cortical rims with sharp edges.
    rim = 3.5 * s / 512
    rib_width = s * rng.uniform(0.016, 0.021)
    posterior = [np.zeros((size, size), np.float32) for _ in range(2)]
    anterior = [np.zeros((size, size), np.float32) for _ in range(2)]
    t = np.linspace(0.0, 1.0, 24)
    n_ribs = int(rng.integers(9, 12))
    for side in (-1.0, 1.0):
        for k in range(n_ribs):  # posterior ribs: up and out from the spine, then down along the chest wall
            v0 = 0.13 + k * (0.5 / n_ribs) + rng.uniform(-0.005, 0.005)
            reach = 0.35 + 0.05 * math.sin(k / n_ribs * math.pi)
            x = cx + side * (0.035 + reach * t)
            y = v0 - 0.035 * np.sin(np.pi * t) + (0.15 + 0.02 * k / n_ribs) * t**2
            _draw(posterior[0], np.stack([x * s, y * s], 1), rib_width)
            _draw(posterior[1], np.stack([x * s, y * s], 1), max(rib_width - 2 * rim, 1.0))
        for k in range(6):  # anterior ribs: fainter, from the chest wall down towards the sternum
            va = 0.2 + k * 0.068 + rng.uniform(-0.005, 0.005)
            x = cx + side * (0.37 - 0.24 * t)
            y = va + 0.13 * t - 0.04 * np.sin(np.pi * t)
            _draw(anterior[0], np.stack([x * s, y * s], 1), rib_width * 0.9)
            _draw(anterior[1], np.stack([x * s, y * s], 1), max(rib_width * 0.9 - 2 * rim, 1.0))
        # Clavicle: a thick, gently curved bone from the sternum out and up to the shoulder.
        x = cx + side * (0.06 + 0.28 * t)
        y = 0.14 - 0.06 * t + 0.02 * np.sin(np.pi * t)
        _draw(posterior[0], np.stack([x * s, y * s], 1), rib_width * 1.4)
        _draw(posterior[1], np.stack([x * s, y * s], 1), rib_width * 1.4 - 2 * rim)
    for (outer, inner), fill, edge in ((posterior, 0.07, 0.1), (anterior, 0.03, 0.045)):
        outer, inner = np.clip(outer, 0, 1), np.clip(inner, 0, 1)
        image += body * (fill * outer + edge * (outer - inner))

    # Pulmonary vessels: thin branching lines fanning out from each hilum, fading to the periphery.
    vessels = np.zeros((size, size), np.float32)
    root = 3.0 * s / 512
    for side in (-1.0, 1.0):
        hilum = ((cx + side * 0.1) * s, 0.46 * s)
        for base in (-1.1, -0.25, 0.6):  # upward, lateral, downward
            angle = (math.pi if side < 0 else 0.0) + side * base + rng.normal(0, 0.12)
            for points, thickness in _branches(rng, hilum, angle, 0.1 * s, root, depth=5):
                _draw(vessels, points, thickness, 0.45 + 0.55 * min(thickness / root, 1.0))
    image += 0.12 * np.clip(vessels, 0, 1) * lungs

    # Texture: mottled soft tissue, lung parenchyma, quantum noise.
    image += body * 0.018 * _smooth_noise(rng, size, 12)
    image += lungs * 0.012 * _smooth_noise(rng, size, max(size // 8, 4))
    image += rng.standard_normal((size, size), dtype=np.float32) * 0.008

    # A lead side marker near a top corner: the crispest edge on a real film.
    letter = "L" if rng.random() < 0.5 else "R"
    corner = (int(s * rng.uniform(0.05, 0.1)), int(s * rng.uniform(0.1, 0.16)))
    marker = np.zeros((size, size), np.uint8)  # OpenCV 5 renders text on 8-bit canvases only
    cv2.putText(marker, letter, corner, cv2.FONT_HERSHEY_SIMPLEX, s / 400.0, 255, max(int(s / 170), 1), cv2.LINE_AA)
    image = np.maximum(image, marker.astype(np.float32) * np.float32(0.97 / 255.0))

    return np.clip(image, 0.0, 1.0).astype(np.float32)


def make_fundus(seed: int, size: int = 512) -> np.ndarray:
    """A retinal-fundus-like colour photograph, float32 (size, size, 3) RGB in [0, 1].

    Circular field of view on black, orange-red vignetted retina with choroidal mottling, a bright yellowish
    optic disc with a paler cup, a darker macula, and dark-red vessels branching from the disc in
    superior/inferior arcades. Left or right eye and all branching vary with ``seed``; deterministic.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    rng = np.random.default_rng(seed)
    s = float(size)
    axis = (np.arange(size, dtype=np.float32) + 0.5) / s
    u, v = np.meshgrid(axis, axis)
    r = np.sqrt((u - 0.5) ** 2 + (v - 0.5) ** 2)
    fov = _soft(r - 0.46, 0.004)

    side = -1.0 if rng.random() < 0.5 else 1.0  # which side the disc is on (right or left eye)
    disc = (0.5 + side * 0.19 + rng.uniform(-0.01, 0.01), 0.5 + rng.uniform(-0.02, 0.02))
    macula = (0.5 - side * 0.06, 0.5 + rng.uniform(-0.01, 0.01))

    base = np.array([0.82, 0.38, 0.17], np.float32) * rng.uniform(0.92, 1.05)
    vignette = 1.0 - 0.45 * (r / 0.46) ** 2
    mottling = 1.0 + 0.05 * _smooth_noise(rng, size, 24)
    shade = (vignette * mottling)[..., None]
    image = base * shade
    macular = 1.0 - 0.35 * np.exp(-(((u - macula[0]) ** 2 + (v - macula[1]) ** 2) / 0.004))
    image = image * macular[..., None]

    disc_r = 0.055 + rng.uniform(-0.005, 0.005)
    disc_d = np.sqrt((u - disc[0]) ** 2 + (v - disc[1]) ** 2)
    disc_mask = _soft(disc_d - disc_r, 0.004)[..., None]
    cup_mask = _soft(disc_d - disc_r * 0.45, 0.01)[..., None]
    image = image * (1 - disc_mask) + disc_mask * np.array([0.97, 0.78, 0.48], np.float32)
    image = image * (1 - cup_mask * 0.6) + cup_mask * 0.6 * np.array([1.0, 0.93, 0.75], np.float32)

    vessels = np.zeros((size, size), np.float32)
    temporal = math.pi if side > 0 else 0.0  # arcades head towards the macula
    for angle, thickness in (
        (temporal - side * 0.9, 5.0),
        (temporal + side * 0.9, 5.0),
        (math.pi - temporal - side * 0.5, 3.5),
        (math.pi - temporal + side * 0.5, 3.5),
    ):
        start = (disc[0] * s, disc[1] * s)
        for points, t in _branches(rng, start, angle, 0.16 * s, thickness * s / 512, depth=5, spread=0.6):
            _draw(vessels, points, t)
    vessels = np.clip(vessels, 0, 1)[..., None] * 0.75
    image = image * (1 - vessels) + vessels * np.array([0.45, 0.1, 0.06], np.float32) * shade

    image = image + rng.standard_normal((size, size, 3), dtype=np.float32) * 0.01
    return np.clip(image * fov[..., None], 0.0, 1.0).astype(np.float32)


def write_sample_archive(
    write: Callable[[str, bytes], None],
    n_images: int = 12,
    size: int = 512,
    seed: int = 0,
    n_patients: int | None = None,
    formats: Sequence[tuple[str, int, str]] = SAMPLE_FORMATS,
) -> list[dict]:
    """Write a small mixed-format radiograph archive through ``write(relative_key, data)``.

    Image ``i`` gets the form ``formats[i % len(formats)]`` (default :data:`SAMPLE_FORMATS`: 8-bit PNG,
    16-bit PNG, 16-bit TIFF, DICOM MONOCHROME2 BitsStored 12, DICOM MONOCHROME1 16, DICOM MONOCHROME2 16,
    JPEG), patient ``i % n_patients`` (default ``ceil(n_images / 3)`` patients) and that patient's next
    follow-up number. Keys follow the NIH ChestX-ray14 style ``"<8-digit patient>_<3-digit follow-up><ext>"``,
    e.g. ``"00000003_001.png"``; DICOM objects carry the same PatientID, one study per follow-up.
    Deterministic: equal arguments write identical bytes.

    Returns one dict per file, in writing order:
    ``{"key": str, "format": str, "bits": int, "patient_id": str, "photometric": str}``.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be positive, got {n_images}")
    n_patients = n_patients or max(1, math.ceil(n_images / 3))
    followups: dict[str, int] = {}
    written = []
    for i in range(n_images):
        fmt, bits, photometric = formats[i % len(formats)]
        patient_id = f"{i % n_patients + 1:08d}"
        followup = followups.get(patient_id, 0)
        followups[patient_id] = followup + 1
        key = f"{patient_id}_{followup:03d}{output_extension(fmt)}"
        image = make_radiograph(seed * 100_003 + i, size)
        if fmt == "dicom":
            ds = build_radiograph_dataset(
                image,
                bits_stored=bits,
                photometric=photometric,
                patient_id=patient_id,
                modality="DX" if i % 2 else "CR",
                uid_key=f"{seed}/{followup}",
                series_description="CHEST PA",
            )
            data = dataset_to_bytes(ds)
        else:
            meta = ImageMeta(
                format=fmt,
                dtype="uint8" if bits == 8 else "uint16",
                bits_stored=bits,
                channels=1,
                photometric=photometric,
            )
            data = encode_image(image[:, :, None], meta)
        write(key, data)
        written.append(
            {"key": key, "format": fmt, "bits": bits, "patient_id": patient_id, "photometric": photometric}
        )
    return written


def make_corrupt_files(size: int = 64) -> dict[str, bytes]:
    """Bad inputs for robustness tests, by file name: each must make ``decode_image`` raise ImageDecodeError.

    ``truncated.png`` (a valid PNG cut in half), ``empty.png`` (0 bytes), ``notes.png`` (a text file with an
    image name), ``truncated.jpg`` (a JPEG cut in half), ``corrupt.dcm`` (a DICOM file whose pixel data is cut
    short) and ``garbage.dcm`` (a DICOM preamble and magic followed by random bytes).
    """
    image = make_radiograph(7, size)
    png = encode_image(image[:, :, None], ImageMeta("png", "uint16", 16, 1, "MONOCHROME2"))
    jpeg = encode_image(image[:, :, None], ImageMeta("jpeg", "uint8", 8, 1, "MONOCHROME2"))
    dicom = dataset_to_bytes(build_radiograph_dataset(image, bits_stored=12, patient_id="99999999"))
    noise = np.random.default_rng(7).integers(0, 256, 512, dtype=np.uint8).tobytes()
    return {
        "truncated.png": png[: len(png) // 2],
        "empty.png": b"",
        "notes.png": b"patient notes, not an image\nsecond line\n",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "corrupt.dcm": dicom[: len(dicom) - size * size],
        "garbage.dcm": b"\x00" * 128 + b"DICM" + noise,
    }
