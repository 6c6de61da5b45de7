"""Human-readable evaluation output: side-by-side comparison PNGs and a small report (JSON + Markdown).

Nothing here touches storage: :func:`write_report` hands every file to a ``write(relative_key, data)``
callback, so the same code writes to a local folder, S3 or a test's dict.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from medsr_dist.eval.metrics import bicubic_upscale, default_max_value, psnr, ssim

__all__ = ["CropBox", "ReportEntry", "disagreement_box", "side_by_side", "write_report"]

Writer = Callable[[str, bytes], None]

_BACKGROUND = 24  # gray level of the canvas between panels
_CAPTION_BG = 48
_BOX_COLOR_RGB = (255, 210, 0)


@dataclass(frozen=True)
class CropBox:
    """A rectangle in panel pixels: rows ``[y, y + height)``, columns ``[x, x + width)``."""

    y: int
    x: int
    height: int
    width: int


def _to_display_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W[, C]) float in [0, 1] or unsigned int -> (H, W, 3) float32 in [0, 1]; gray replicated, alpha dropped."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W) or (H, W, C) panel with C in {{1, 3, 4}}, got shape {image.shape}")
    scaled = image[..., :3].astype(np.float32) / np.float32(default_max_value(image.dtype))
    scaled = np.clip(scaled, 0.0, 1.0)
    return np.repeat(scaled, 3, axis=2) if scaled.shape[2] == 1 else scaled


def _resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)


def disagreement_box(a: np.ndarray, b: np.ndarray, height: int, width: int) -> CropBox:
    """The ``height x width`` window where two same-sized images differ most (largest summed |a - b|).

    Args:
        a, b: (H, W[, C]) float arrays of the same shape.

    Returns:
        The box, inside the image (clamped to the image size).
    """
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if diff.ndim == 3:
        diff = diff.mean(axis=2)
    h, w = diff.shape
    height, width = min(height, h), min(width, w)
    integral = np.zeros((h + 1, w + 1), dtype=np.float64)
    integral[1:, 1:] = diff.cumsum(axis=0).cumsum(axis=1)
    window_sums = (
        integral[height:, width:]
        - integral[:-height, width:]
        - integral[height:, :-width]
        + integral[:-height, :-width]
    )
    y, x = np.unravel_index(int(np.argmax(window_sums)), window_sums.shape)
    return CropBox(int(y), int(x), height, width)


def _caption_strip(text: str, width: int, height: int) -> np.ndarray:
    strip = np.full((height, width, 3), _CAPTION_BG, dtype=np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    (text_w, text_h), _ = cv2.getTextSize(text, font, 1.0, 1)
    font_scale = min(0.6 * height / max(text_h, 1), (width - 4) / max(text_w, 1))
    (text_w, text_h), _ = cv2.getTextSize(text, font, font_scale, 1)
    origin = (max(2, (width - text_w) // 2), (height + text_h) // 2)
    cv2.putText(strip, text, origin, font, font_scale, (255, 255, 255), 1, cv2.LINE_AA)
    return strip


def side_by_side(
    panels: Sequence[tuple[str, np.ndarray]],
    *,
    crop_box: CropBox | None = None,
    compare: Sequence[int] | None = None,
    zoom: int = 4,
    gap: int = 4,
    max_panel: int | None = None,
) -> bytes:
    """Render captioned panels side by side with a magnified crop of the same region below each.

    Layout (``n`` panels, the largest one ``H x W``): a caption strip above each panel, the panels in a
    row, then a row of crops of ``H//zoom x W//zoom`` panel pixels magnified (nearest neighbour) back to
    ``H x W``; the crop region is outlined on the panels. Panels smaller than the largest (the LR input)
    are nearest-upscaled to ``H x W`` so pixels are comparable.

    Args:
        panels: (caption, image) pairs; images (h, w), (h, w, 1), (h, w, 3) or (h, w, 4) (alpha ignored),
            float in [0, 1] or unsigned int (full dtype range), RGB channel order.
        crop_box: region to magnify, in ``H x W`` panel pixels; ``None`` picks one automatically.
        compare: indices of the panels whose disagreement picks the crop: two (e.g. bicubic and model) use
            their absolute difference, more use the per-pixel spread (standard deviation) across them (e.g.
            bicubic and every model, leaving out the LR input and the ground truth); ``None`` uses the spread
            across all panels.
        zoom: magnification of the crop row.
        gap: pixels between panels and rows.
        max_panel: largest side of a drawn panel; bigger panels are drawn area-downscaled to fit (the crop
            is still cut at full resolution, so the magnified row keeps every pixel). ``None``: no limit.

    Returns:
        8-bit RGB PNG bytes, ``n * w + (n - 1) * gap`` pixels wide, ``w`` = ``W`` or, with ``max_panel``,
        the downscaled panel width.

    Raises:
        ValueError: no panels, bad shapes, or ``compare`` with fewer than two or out-of-range indices.
    """
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    if compare is not None and (len(compare) < 2 or not all(-len(panels) <= i < len(panels) for i in compare)):
        raise ValueError(f"compare needs two or more panel indices in range, got {tuple(compare)} for {len(panels)} panels")
    images = [_to_display_rgb(image) for _, image in panels]
    height, width = max((image.shape[:2] for image in images), key=lambda hw: hw[0] * hw[1])
    images = [_resize_nearest(image, height, width) for image in images]

    if crop_box is None:
        crop_h, crop_w = max(1, height // zoom), max(1, width // zoom)
        if compare is not None and len(compare) == 2:
            crop_box = disagreement_box(images[compare[0]], images[compare[1]], crop_h, crop_w)
        else:
            chosen = images if compare is None else [images[i] for i in compare]
            spread = np.stack(chosen).std(axis=0)
            crop_box = disagreement_box(spread, np.zeros_like(spread), crop_h, crop_w)

    f = 1.0 if max_panel is None or max(height, width) <= max_panel else max_panel / max(height, width)
    ph, pw = max(1, round(height * f)), max(1, round(width * f))  # drawn panel size
    caption_h = int(np.clip(pw // 10, 14, 36))
    n = len(images)
    canvas = np.full((caption_h + 2 * ph + gap, n * pw + (n - 1) * gap, 3), _BACKGROUND, dtype=np.uint8)
    b = crop_box
    thickness = max(1, min(ph, pw) // 128)
    for i, ((caption, _), image) in enumerate(zip(panels, images)):
        x = i * (pw + gap)
        panel = np.round(image * 255.0).astype(np.uint8)
        crop = panel[b.y : b.y + b.height, b.x : b.x + b.width]
        canvas[caption_h + ph + gap :, x : x + pw] = _resize_nearest(crop, ph, pw)
        shown = panel if f == 1.0 else cv2.resize(panel, (pw, ph), interpolation=cv2.INTER_AREA)
        outlined = np.ascontiguousarray(shown)
        y0, x0 = int(b.y * f), int(b.x * f)
        y1, x1 = max(y0, round((b.y + b.height) * f) - 1), max(x0, round((b.x + b.width) * f) - 1)
        cv2.rectangle(outlined, (x0, y0), (x1, y1), _BOX_COLOR_RGB, thickness)
        canvas[caption_h : caption_h + ph, x : x + pw] = outlined
        canvas[:caption_h, x : x + pw] = _caption_strip(caption, pw, caption_h)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("cv2 failed to encode the comparison PNG")
    return encoded.tobytes()


@dataclass
class ReportEntry:
    """One evaluated image.

    Attributes:
        name: image identifier, used in the report and (sanitised) as the panel file name.
        lr: (h, w[, C]) model input.
        output: (H, W[, C]) model output.
        ground_truth: (H, W[, C]) reference.
        bicubic: (H, W[, C]) bicubic baseline; ``None`` computes it from ``lr`` with
            :func:`~medsr_dist.eval.metrics.bicubic_upscale`.

    Arrays are RGB or gray, float in [0, 1] or unsigned int in their dtype's full range.
    """

    name: str
    lr: np.ndarray
    output: np.ndarray
    ground_truth: np.ndarray
    bicubic: np.ndarray | None = None


def _panel_key(name: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"
    key, k = f"panels/{stem}.png", 1
    while key in taken:
        k += 1
        key = f"panels/{stem}-{k}.png"
    taken.add(key)
    return key


def _json_number(value: float) -> float | str:
    """Strict JSON has no infinity; PSNR of identical images is reported as the string ``"inf"``."""
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else "nan")


def _fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def write_report(
    entries: Iterable[ReportEntry],
    write: Writer,
    *,
    crop_border: int = 0,
    test_y_channel: bool = False,
    model_label: str = "model",
    title: str = "Super-resolution evaluation",
) -> dict[str, Any]:
    """Score bicubic and the model against ground truth, render a comparison per image, write a report.

    Entries are processed one at a time (only the numbers are kept), so a long stream stays in bounded
    memory. Files written through ``write(relative_key, data)``:

    * ``panels/<name>.png``: :func:`side_by_side` of LR, bicubic, model output and ground truth, crop where
      bicubic and model disagree most;
    * ``report.json``: settings, per-image PSNR (dB) and SSIM of bicubic and model, and their means over
      images (non-finite PSNR is written as the string ``"inf"``);
    * ``report.md``: the same as a Markdown table with links to the panels.

    Args:
        entries: the images.
        write: callback storing ``data`` under ``relative_key`` (e.g. ``"report.json"``).
        crop_border, test_y_channel: metric settings, see :func:`~medsr_dist.eval.metrics.psnr`.
        model_label: caption of the model panel and column.
        title: Markdown heading.

    Returns:
        The ``report.json`` content as a dict (with float ``inf`` where the JSON has ``"inf"``).

    Raises:
        ValueError: an entry's output, bicubic and ground truth shapes differ.
    """
    metric_args = {"crop_border": crop_border, "test_y_channel": test_y_channel}
    images: list[dict[str, Any]] = []
    taken: set[str] = set()
    for entry in entries:
        gt = entry.ground_truth
        bicubic = entry.bicubic
        if bicubic is None:
            lr = entry.lr.astype(np.float32) / np.float32(default_max_value(entry.lr.dtype))
            bicubic = bicubic_upscale(lr, gt.shape[0] / entry.lr.shape[0])
        if not (bicubic.shape == entry.output.shape == gt.shape):
            raise ValueError(
                f"{entry.name}: bicubic {bicubic.shape}, {model_label} {entry.output.shape} and "
                f"ground truth {gt.shape} must have the same shape"
            )
        scores = {
            "bicubic": {"psnr": psnr(bicubic, gt, **metric_args), "ssim": ssim(bicubic, gt, **metric_args)},
            "model": {"psnr": psnr(entry.output, gt, **metric_args), "ssim": ssim(entry.output, gt, **metric_args)},
        }
        key = _panel_key(entry.name, taken)
        panels = [("LR (nearest)", entry.lr), ("bicubic", bicubic), (model_label, entry.output), ("ground truth", gt)]
        write(key, side_by_side(panels, compare=(1, 2)))
        images.append({"name": entry.name, "panel": key, "shape": list(gt.shape), **scores})

    def mean(method: str, metric: str) -> float | None:
        values = [image[method][metric] for image in images]
        return float(np.mean(values)) if values else None

    report: dict[str, Any] = {
        "title": title,
        "model_label": model_label,
        "crop_border": crop_border,
        "test_y_channel": test_y_channel,
        "count": len(images),
        "images": images,
        "mean": {
            method: {metric: mean(method, metric) for metric in ("psnr", "ssim")} for method in ("bicubic", "model")
        },
    }
    write("report.json", json.dumps(_jsonable(report), indent=2, allow_nan=False).encode())
    write("report.md", _markdown(report).encode())
    return report


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return _json_number(value)
    return value


def _markdown(report: dict[str, Any]) -> str:
    label = report["model_label"]
    lines = [
        f"# {report['title']}",
        "",
        f"{report['count']} image(s); PSNR in dB and SSIM against ground truth"
        f"{' on the Y channel' if report['test_y_channel'] else ''}"
        f"{', crop border ' + str(report['crop_border']) if report['crop_border'] else ''}.",
        "",
        f"| image | bicubic PSNR | {label} PSNR | gain (dB) | bicubic SSIM | {label} SSIM | comparison |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for image in report["images"]:
        bic, mod = image["bicubic"], image["model"]
        lines.append(
            f"| {image['name']} | {_fmt(bic['psnr'], 2)} | {_fmt(mod['psnr'], 2)} | "
            f"{_fmt(mod['psnr'] - bic['psnr'], 2) if math.isfinite(mod['psnr'] - bic['psnr']) else '-'} | "
            f"{_fmt(bic['ssim'], 4)} | {_fmt(mod['ssim'], 4)} | [{image['panel']}]({image['panel']}) |"
        )
    mean = report["mean"]
    if report["count"]:
        bic, mod = mean["bicubic"], mean["model"]
        gain = mod["psnr"] - bic["psnr"]
        lines.append(
            f"| **mean** | {_fmt(bic['psnr'], 2)} | {_fmt(mod['psnr'], 2)} | "
            f"{_fmt(gain, 2) if math.isfinite(gain) else '-'} | {_fmt(bic['ssim'], 4)} | {_fmt(mod['ssim'], 4)} | |"
        )
    return "\n".join(lines) + "\n"
