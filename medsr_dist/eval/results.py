"""The results of `medsr eval`: rows as plain values (:func:`plain_row`), the report dict (:func:`build_report`:
settings, per-image values, per-model summaries, paired comparisons with the baseline), the figure keys, and
what a run wrote (:class:`EvalResult`). Shared by the 2-D evaluation (:mod:`medsr_dist.eval.evaluate`) and the
volume one (:mod:`medsr_dist.eval.volume_eval`).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from medsr_dist import __version__
from medsr_dist.config import EvalConfig, MedsrConfig
from medsr_dist.eval.plan import IMAGE_FIELDS, ROW_FIELDS, UNAVAILABLE, EvalPlan, metrics_of
from medsr_dist.eval.stats import paired_bootstrap, summarize
from medsr_dist.infer.engine import ENGINE_REVISION
from medsr_dist.infer.model_file import runnable_precision


@dataclass
class EvalResult:
    """What :func:`~medsr_dist.eval.evaluate.run_evaluation` wrote and found."""

    output: str
    report: dict[str, Any]
    rows: list[dict] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # "report.html" -> its URI, ...

    @property
    def n_errors(self) -> int:
        return sum(1 for r in self.rows if r["status"] != "ok")


def figure_key(name: str) -> str:
    """``figures/<sanitised name>-<8 hex of its sha1>.png``: unique per image name, safe as a file name."""
    base = name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "image"
    return f"figures/{stem}-{hashlib.sha1(name.encode()).hexdigest()[:8]}.png"



def plain_row(row: dict) -> dict:
    """A Ray row with numpy scalars -> plain Python values."""
    out = {}
    for k in ROW_FIELDS:
        v = row[k]
        out[k] = v.item() if isinstance(v, np.generic) else v
    for k in IMAGE_FIELDS:  # the 2-D evaluation's extra metrics (volumes have none)
        if k in row:
            out[k] = row[k].item() if isinstance(row[k], np.generic) else row[k]
    out["model_index"] = int(out["model_index"])
    return out


def runs_precision(plan: EvalPlan, e: EvalConfig, gpu: int) -> str:
    """The precision the replicas ran the network models in (a CPU asked for fp16 runs fp32)."""
    if not any(m.model_file is not None for m in plan.models):
        return e.precision
    return runnable_precision(e.backend, e.precision, gpu=bool(gpu))


def build_report(cfg: MedsrConfig, plan: EvalPlan, rows: list[dict], seconds: float = 0.0,
                 precision: str | None = None) -> dict[str, Any]:
    """The report as a JSON-ready dict (NaN/inf floats are kept; writers spell them): settings, per-image values,
    per-model summaries and paired comparisons with the baseline.

    Every model is averaged over the same images: those every model scored (``common_images``); an image one
    model failed on is left out of every model's mean (and counted in that model's ``errors``), so the means stay
    comparable. ``note`` says so when that set is smaller than the dataset."""
    e = cfg.eval
    images = [item["name"] for item in plan.items]
    models = [m.name for m in plan.models]
    cell = {(r["image"], r["model"]): r for r in rows}
    shown = metrics_of(plan.protocol)
    metrics = [m for m in shown if m != "lpips" or plan.lpips.available]

    def ok(image: str, model: str) -> bool:
        r = cell.get((image, model))
        return r is not None and r["status"] == "ok"

    common = [image for image in images if all(ok(image, m) for m in models)]

    def values(model: str, metric: str) -> list[float | None]:
        return [cell[(image, model)].get(metric, math.nan) for image in common]

    summary = {m: {metric: summarize(values(m, metric)).to_dict() for metric in metrics} for m in models}
    for m in models:
        summary[m]["errors"] = sum(1 for image in images if cell.get((image, m), {"status": "missing"})["status"] != "ok")
        summary[m]["images"] = len(images)
        summary[m]["scored"] = sum(1 for image in images if ok(image, m))
        if "lpips" in shown and not plan.lpips.available:
            summary[m]["lpips"] = UNAVAILABLE
    b = e.bootstrap
    comparisons = {
        m: {metric: paired_bootstrap(values(m, metric), values(plan.baseline, metric), samples=b.samples,
                                     confidence=b.confidence, seed=b.seed).to_dict() for metric in metrics}
        for m in models if m != plan.baseline
    }
    per_image = []
    for image in images:
        entry: dict[str, Any] = {"name": image, "key": "", "figure": "", "models": {}}
        for m in models:
            r = cell.get((image, m))
            if r is None:
                entry["models"][m] = {"status": "error", "error": "no result (lost in the pipeline)"}
                continue
            entry["key"], entry["figure"] = r["key"], entry["figure"] or r["figure"]
            values_ = {metric: r.get(metric, float("nan")) for metric in shown}
            if "lpips" in shown and not plan.lpips.available:
                values_["lpips"] = UNAVAILABLE
            entry["models"][m] = {"status": r["status"], "error": r["error"], "seconds": r["seconds"], **values_}
        per_image.append(entry)
    p = plan.protocol
    return {
        "title": f"{p.name}: {p.description}",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "software": f"medsr-dist {__version__}",
        "protocol": {**p.parameters(), "degradation": p.degradation},
        "dataset": {"uri": plan.dataset, "split": plan.split, "images": len(images)},
        "models": [m.describe(p) for m in plan.models],
        "baseline": plan.baseline,
        "metrics": metrics,
        "lpips": plan.lpips.to_dict(),
        "bootstrap": b.model_dump(),
        "summary": summary,
        "comparisons": comparisons,
        "images": per_image,
        "common_images": len(common),
        "note": "" if len(common) == len(images) else (
            f"means and comparisons are over the {len(common)} of {len(images)} images every model scored ("
            + ", ".join(f"{m} scored {summary[m]['scored']}" for m in models if summary[m]["scored"] < len(images))
            + "); an image one model failed on is left out for all"),
        "warnings": [w for w in (m.describe(p).get("warning") for m in plan.models) if w],
        "figures": [image for image in plan.figures],
        "errors": [{"image": r["image"], "model": r["model"], "error": r["error"]} for r in rows if r["status"] != "ok"],
        "seconds": seconds,
        "engine": {"backend": e.backend, "precision": precision or e.precision, "tile": e.tile,
                   "tile_overlap": e.tile_overlap, "revision": ENGINE_REVISION},
    }
