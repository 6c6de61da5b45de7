"""The evaluation report files: ``report.html`` (self-contained), ``results.csv``, ``results.json``, ``results.md``.

Input is the report dict of :func:`medsr_dist.eval.results.build_report` and the figure PNGs; nothing here
touches storage or Ray: every file goes through a ``write(relative_key, data)`` callback, like
:func:`medsr_dist.eval.report.write_report`.

``report.html`` has no external references: figures are embedded as ``data:image/png;base64`` URIs, the
per-image plots are inline SVG drawn here, the style is inline. Values that do not exist are spelled out:
an image a model failed on is an "error" cell (with the message), LPIPS without its weights is
"unavailable" (and the report says why), PSNR of identical images is "inf".
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["render_html", "results_csv", "results_markdown", "svg_metric_plot", "to_json", "write_eval_report"]

Writer = Callable[[str, bytes], None]

UNAVAILABLE = "unavailable"
METRIC_LABELS = {
    "psnr": ("PSNR (dB)", 2, True),
    "ssim": ("SSIM", 4, True),
    "lpips": ("LPIPS", 4, False),
    "haarpsi": ("HaarPSI", 4, True),
    "niqe": ("NIQE (no reference)", 3, False),
    "consistency_psnr_db": ("consistency (dB)", 2, True),
}
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")


def write_eval_report(report: dict[str, Any], figures: dict[str, bytes], write: Writer) -> list[str]:
    """Write ``results.csv``, ``results.json``, ``results.md`` and ``report.html``; returns their keys.

    Args:
        report: from :func:`~medsr_dist.eval.results.build_report`.
        figures: figure key (``figures/<name>.png``, as in ``report["images"][i]["figure"]``) -> PNG bytes.
        write: callback storing ``data`` under a key relative to the report folder.
    """
    files = {
        "results.csv": results_csv(report).encode(),
        "results.json": to_json(report).encode(),
        "results.md": results_markdown(report).encode(),
        "report.html": render_html(report, figures).encode(),
    }
    for key, data in files.items():
        write(key, data)
    return list(files)


# ------------------------------------------------------------------------------------------------------------
# Number formatting
# ------------------------------------------------------------------------------------------------------------
def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def to_json(report: dict[str, Any]) -> str:
    """Strict JSON: non-finite floats become the strings "inf", "-inf", "nan"."""
    return json.dumps(_clean(report), indent=2, allow_nan=False)


def _num(value: Any, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    value = float(value)
    if math.isnan(value):
        return ""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _signed(value: float, digits: int) -> str:
    text = _num(value, digits)
    return f"+{text}" if text and not text.startswith("-") and text not in ("inf",) else text


def _mean_std(stats: Any, digits: int) -> str:
    """'mean ± std' of a summary dict; 'unavailable' / '' passed through."""
    if isinstance(stats, str):
        return stats
    if not stats or not stats.get("n"):
        return "–"
    text = _num(stats["mean"], digits)
    if stats["n"] > 1:
        text += f" ± {_num(stats['std'], digits)}"
    return text


def _comparison(comp: dict | None, digits: int) -> str:
    if not comp or not comp.get("n"):
        return "–"
    level = round(comp["confidence"] * 100)
    return f"{_signed(comp['mean_difference'], digits)} [{_signed(comp['ci_low'], digits)}, {_signed(comp['ci_high'], digits)}]" + (
        "" if level == 95 else f" ({level}%)")


def _per_image_metrics(report: dict[str, Any]) -> tuple[str, str]:
    """The two metrics of the per-image cells, captions and plots: PSNR and SSIM, or without a ground truth
    consistency and NIQE."""
    return ("psnr", "ssim") if "psnr" in report["metrics"] else tuple(report["metrics"][:2])


def _shown_metrics(report: dict[str, Any]) -> list[str]:
    """The metric columns of the tables: LPIPS stays (as 'unavailable') so its absence is visible."""
    return [m for m in METRIC_LABELS if m in report["metrics"] or (m == "lpips" and "psnr" in report["metrics"])]


# ------------------------------------------------------------------------------------------------------------
# CSV / Markdown
# ------------------------------------------------------------------------------------------------------------
CSV_FIELDS = ("image", "key", "model", "status", "error", "psnr_db", "ssim", "lpips", "consistency_psnr_db", "haarpsi",
              "niqe", "seconds")


def results_csv(report: dict[str, Any]) -> str:
    """One row per (image, model); metric cells are empty for errors and 'unavailable' for LPIPS without weights."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for image in report["images"]:
        for model, cell in image["models"].items():
            writer.writerow([
                image["name"], image["key"], model, cell["status"], cell.get("error", ""),
                *(_num(cell.get(metric), 6) if cell["status"] == "ok" else ""
                  for metric in ("psnr", "ssim", "lpips", "consistency_psnr_db", "haarpsi", "niqe")),
                _num(cell.get("seconds"), 4),
            ])
    return buf.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def results_markdown(report: dict[str, Any]) -> str:
    """The models x metrics table, the paired comparisons, the per-image table and links to the figures."""
    metrics = _shown_metrics(report)
    p = report["protocol"]
    lines = [
        f"# {report['title']}", "",
        f"Protocol `{p['name']}` (x{p['scale']}): {p['degradation']}.  ",
        f"Dataset: `{report['dataset']['uri']}`" + (f" split `{report['dataset']['split']}`" if report["dataset"]["split"] else "")
        + f", {report['dataset']['images']} image(s). {report['software']}, {report['created']}.", "",
        f"LPIPS: {'available' if report['lpips']['available'] else '**unavailable**'}: {report['lpips']['reason']}", "",
        "## Mean ± standard deviation over images", "",
        "| model | " + " | ".join(METRIC_LABELS[m][0] for m in metrics) + " | errors |",
        "|---|" + "---:|" * len(metrics) + "---:|",
    ]
    for model in report["summary"]:
        s = report["summary"][model]
        lines.append(f"| {_md_escape(model)} | " + " | ".join(_mean_std(s.get(m), METRIC_LABELS[m][1]) for m in metrics)
                     + f" | {s['errors']}/{s['images']} |")
    if report.get("note"):
        lines += ["", f"**Note:** {_md_escape(report['note'])}."]
    for warning in report.get("warnings", []):
        lines += ["", f"**Warning:** {_md_escape(warning)}."]
    if report["comparisons"]:
        b = report["bootstrap"]
        lines += ["", f"## Paired difference with the baseline `{report['baseline']}`", "",
                  f"Mean of per-image differences (model − baseline) with its {round(b['confidence'] * 100)}% percentile "
                  f"bootstrap interval ({b['samples']} resamples, seed {b['seed']}).", "",
                  "| model | " + " | ".join(f"Δ {METRIC_LABELS[m][0]}" for m in report["metrics"]) + " | pairs |",
                  "|---|" + "---:|" * len(report["metrics"]) + "---:|"]
        for model, comps in report["comparisons"].items():
            n = max((c["n"] for c in comps.values()), default=0)
            lines.append(f"| {_md_escape(model)} | " + " | ".join(_comparison(comps[m], METRIC_LABELS[m][1])
                                                                 for m in report["metrics"]) + f" | {n} |")
    models = [m["name"] for m in report["models"]]
    first, second = _per_image_metrics(report)
    lines += ["", f"## Per image ({METRIC_LABELS[first][0]} / {METRIC_LABELS[second][0]})", "",
              "| image | " + " | ".join(_md_escape(m) for m in models) + " | figure |",
              "|---|" + "---:|" * len(models) + "---|"]
    for image in report["images"]:
        cells = []
        for m in models:
            c = image["models"][m]
            cells.append(f"{_num(c.get(first), METRIC_LABELS[first][1])} / {_num(c.get(second), METRIC_LABELS[second][1])}"
                         if c["status"] == "ok" else "error")
        fig = f"[figure]({image['figure']})" if image["figure"] else ""
        lines.append(f"| {_md_escape(image['name'])} | " + " | ".join(cells) + f" | {fig} |")
    if report["errors"]:
        lines += ["", "## Errors", ""] + [f"- `{_md_escape(e['image'])}` / {_md_escape(e['model'])}: {_md_escape(e['error'])}"
                                          for e in report["errors"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------
# SVG plot
# ------------------------------------------------------------------------------------------------------------
def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        high = low + (abs(low) * 0.1 or 1.0)
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks, t = [], start
    while t <= high + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    if ticks[-1] < high:
        ticks.append(round(t, 10))
    return ticks


def svg_metric_plot(title: str, images: Sequence[str], series: dict[str, Sequence[float | None]],
                    *, digits: int = 2, width: int = 720, height: int = 260) -> str:
    """Per-image values of each model as an inline SVG line chart (one colour per model, gaps for missing).

    Args:
        title: plot title (the metric).
        images: image names, the x axis in order.
        series: model -> values per image (None / non-finite: no point).

    Returns:
        An ``<svg>`` element; every point has a ``<title>`` tooltip "model, image: value".
    """
    left, right, top, bottom = 56, 150, 26, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    finite = [float(v) for vs in series.values() for v in vs if v is not None and math.isfinite(float(v))]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="{html.escape(title)}" class="plot">',
           f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    if not finite or not images:
        out.append(f'<text x="{left}" y="{top + plot_h / 2}" font-size="12">no values</text></svg>')
        return "\n".join(out)
    ticks = _nice_ticks(min(finite), max(finite))
    y0, y1 = ticks[0], ticks[-1]
    n = len(images)

    def x(k: int) -> float:
        return left + (plot_w * (k + 0.5) / n)

    def y(v: float) -> float:
        return top + plot_h * (1 - (v - y0) / (y1 - y0 or 1))

    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    for t in ticks:
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{left - 6}" y="{y(t) + 4:.1f}" font-size="11" text-anchor="end">{_num(t, digits)}</text>')
    label_every = max(1, math.ceil(n / 20))
    for k in range(0, n, label_every):
        out.append(f'<text x="{x(k):.1f}" y="{top + plot_h + 14}" font-size="10" text-anchor="middle">{k + 1}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" font-size="11" text-anchor="middle">image #</text>')
    for index, (model, values) in enumerate(series.items()):
        color = PALETTE[index % len(PALETTE)]
        segment: list[str] = []
        segments = []
        for k, v in enumerate(values):
            if v is None or not math.isfinite(float(v)):
                if segment:
                    segments.append(segment)
                segment = []
                continue
            segment.append(f"{x(k):.1f},{y(float(v)):.1f}")
        if segment:
            segments.append(segment)
        for seg in segments:
            if len(seg) > 1:
                out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{" ".join(seg)}"/>')
        for k, v in enumerate(values):
            if v is not None and math.isfinite(float(v)):
                out.append(f'<circle cx="{x(k):.1f}" cy="{y(float(v)):.1f}" r="3" fill="{color}">'
                           f'<title>{html.escape(model)}, {html.escape(images[k])}: {_num(v, digits)}</title></circle>')
        ly = top + 12 + index * 16
        out.append(f'<rect x="{left + plot_w + 12}" y="{ly - 9}" width="12" height="10" fill="{color}"/>'
                   f'<text x="{left + plot_w + 28}" y="{ly}" font-size="11">{html.escape(model[:18])}</text>')
    out.append("</svg>")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------------------
_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.error{background:#fde2e2;color:#a00;text-align:center}td.unavailable{color:#777;font-style:italic;text-align:center}
.note{background:#fff7d6;border:1px solid #e8d27a;padding:6px 10px;font-size:13px}
.warn{background:#fde2e2;border:1px solid #e0a0a0;padding:6px 10px;font-size:13px}
figure{margin:12px 0}figure img{max-width:100%;image-rendering:pixelated;border:1px solid #ccc}
figcaption{font-size:12px;color:#444}code{font-size:12px}.plot{display:block;margin:8px 0}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _metric_cell(cell: dict, metric: str) -> str:
    if cell["status"] != "ok":
        return f'<td class="error" title="{_e(cell.get("error", ""))}">error</td>'
    value = cell.get(metric)
    if value == UNAVAILABLE:
        return '<td class="unavailable">unavailable</td>'
    return f'<td class="num">{_e(_num(value, METRIC_LABELS[metric][1]))}</td>'


def _display_width(png: bytes, target: int = 1200) -> str:
    """A width attribute that magnifies small figures by a whole factor (pixels stay sharp), up to ``target``."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 24:
        return ""
    width = int.from_bytes(png[16:20], "big")
    factor = max(1, target // max(width, 1))
    return f' width="{width * factor}"' if factor > 1 else ""


def render_html(report: dict[str, Any], figures: dict[str, bytes]) -> str:
    """The whole report as one HTML document (figures embedded as data URIs, plots as inline SVG)."""
    p = report["protocol"]
    metrics = _shown_metrics(report)
    models = [m["name"] for m in report["models"]]
    lp = report["lpips"]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(report['title'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(report['title'])}</h1>",
        f"<p>Protocol <code>{_e(p['name'])}</code>, x{p['scale']}: {_e(p['degradation'])}.<br>"
        f"Reference: {_e(p.get('reference', ''))}.<br>"
        f"Dataset <code>{_e(report['dataset']['uri'])}</code>"
        + (f" split <code>{_e(report['dataset']['split'])}</code>" if report["dataset"]["split"] else "")
        + f": {report['dataset']['images']} image(s). {_e(report['software'])}, {_e(report['created'])}, "
        f"{report['seconds']:.0f} s.</p>",
        f'<p class="{"note" if lp["available"] and lp.get("imagenet") else "warn"}">LPIPS: '
        f'{"available" if lp["available"] else "<b>unavailable</b>"}: {_e(lp["reason"])}</p>',
    ]
    # summary table
    parts.append("<h2>Mean ± standard deviation over images</h2><table><tr><th>model</th>"
                 + "".join(f"<th>{_e(METRIC_LABELS[m][0])}</th>" for m in metrics) + "<th>errors</th></tr>")
    for model in models:
        s = report["summary"][model]
        cells = []
        for m in metrics:
            text = _mean_std(s.get(m), METRIC_LABELS[m][1])
            cls = "unavailable" if text == UNAVAILABLE else "num"
            cells.append(f'<td class="{cls}">{_e(text)}</td>')
        parts.append(f"<tr><th>{_e(model)}</th>{''.join(cells)}<td class=\"num\">{s['errors']}/{s['images']}</td></tr>")
    parts.append("</table>")
    if report.get("note"):
        parts.append(f'<p class="warn">Note: {_e(report["note"])}.</p>')
    for warning in report.get("warnings", []):
        parts.append(f'<p class="warn">Warning: {_e(warning)}.</p>')
    arrows = " ".join(f"{METRIC_LABELS[m][0]} {'↑' if METRIC_LABELS[m][2] else '↓'}" for m in metrics)
    consistency = report.get("consistency_note") or ("Consistency: the output area-downsampled back to the input grid "
                                                     "against the input (a safeguard against changed content, not a "
                                                     "fidelity proof).")
    parts.append(f"<p style='font-size:12px'>Better: {_e(arrows)}. {_e(consistency)}</p>")
    if report["comparisons"]:
        b = report["bootstrap"]
        parts.append(f"<h2>Paired difference with the baseline <code>{_e(report['baseline'])}</code></h2>"
                     f"<p style='font-size:12px'>Mean of per-{_e(report.get('bootstrap_unit', 'image'))} differences "
                     f"(model − baseline) and its "
                     f"{round(b['confidence'] * 100)}% percentile bootstrap interval ({b['samples']} resamples, seed "
                     f"{b['seed']}).</p><table><tr><th>model</th>"
                     + "".join(f"<th>Δ {_e(METRIC_LABELS[m][0])}</th>" for m in report["metrics"]) + "<th>pairs</th></tr>")
        for model, comps in report["comparisons"].items():
            n = max((c["n"] for c in comps.values()), default=0)
            parts.append(f"<tr><th>{_e(model)}</th>" + "".join(
                f'<td class="num">{_e(_comparison(comps[m], METRIC_LABELS[m][1]))}</td>' for m in report["metrics"])
                + f'<td class="num">{n}</td></tr>')
        parts.append("</table>")
    # models
    parts.append("<h2>Models</h2><table><tr><th>model</th><th>source</th><th>kind</th><th>sha256</th><th>note</th></tr>")
    for m in report["models"]:
        parts.append(f"<tr><th>{_e(m['name'])}</th><td><code>{_e(m.get('uri', m['source']))}</code></td><td>{_e(m['kind'])}"
                     f"{' x' + str(m['native_scale']) if 'native_scale' in m else ''}</td>"
                     f"<td><code>{_e(m.get('sha256', '')[:16])}</code></td><td>{_e(m.get('note', ''))}"
                     f"{' (baseline)' if m['name'] == report['baseline'] else ''}</td></tr>")
    parts.append("</table>")
    # figures
    names = [image["name"] for image in report["images"]]
    by_name = {image["name"]: image for image in report["images"]}
    first, second = _per_image_metrics(report)
    if report["figures"]:
        caption = report.get("figure_caption") or ("Top: LR input (nearest) | bicubic | models | ground truth. Bottom: "
                                                   "the outlined region magnified (where the models disagree most, "
                                                   "unless configured).")
        parts.append(f"<h2>Figures</h2><p style='font-size:12px'>{_e(caption)}</p>")
    for name in report["figures"]:
        image = by_name.get(name)
        if image is None:
            continue
        scores = "; ".join(
            f"{_e(m)}: " + (f"{_num(c.get(first), METRIC_LABELS[first][1])} / {_num(c.get(second), METRIC_LABELS[second][1])}"
                            if c["status"] == "ok" else
                            f"error ({_e(c.get('error', ''))})")
            for m, c in image["models"].items())
        data = figures.get(image["figure"]) if image["figure"] else None
        if data:
            uri = "data:image/png;base64," + base64.b64encode(data).decode()
            parts.append(f'<figure><img src="{uri}" alt="{_e(name)}"{_display_width(data)}><figcaption><b>{_e(name)}</b> — {_e(METRIC_LABELS[first][0])} / {_e(METRIC_LABELS[second][0])}: '
                         f"{scores}</figcaption></figure>")
        else:
            parts.append(f"<p class='warn'>{_e(name)}: no figure (the input could not be evaluated). {scores}</p>")
    # plots
    parts.append("<h2>Per-image values</h2>")
    for metric in (first, second):
        series = {m: [by_name[n]["models"][m].get(metric) if by_name[n]["models"][m]["status"] == "ok" else None
                      for n in names] for m in models}
        parts.append(svg_metric_plot(METRIC_LABELS[metric][0], names, series, digits=METRIC_LABELS[metric][1]))
    # per-image table
    parts.append("<table><tr><th>#</th><th>image</th><th>model</th>" + "".join(
        f"<th>{_e(METRIC_LABELS[m][0])}</th>" for m in metrics) + "<th>seconds</th></tr>")
    for k, name in enumerate(names, 1):
        image = by_name[name]
        for j, (model, cell) in enumerate(image["models"].items()):
            head = f'<td rowspan="{len(image["models"])}">{k}</td><td rowspan="{len(image["models"])}">{_e(name)}</td>' if j == 0 else ""
            parts.append(f"<tr>{head}<th>{_e(model)}</th>" + "".join(_metric_cell(cell, m) for m in metrics)
                         + f'<td class="num">{_e(_num(cell.get("seconds"), 3))}</td></tr>')
    parts.append("</table>")
    if report["errors"]:
        parts.append("<h2>Errors</h2><ul>" + "".join(
            f"<li><code>{_e(e['image'])}</code> / {_e(e['model'])}: {_e(e['error'])}</li>" for e in report["errors"]) + "</ul>")
    parts.append("<p style='font-size:12px;color:#666'>Super-resolved images are enhancements, not new acquisitions.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
