"""What ``medsr status`` prints of a nightly job's output: :func:`manifest_summary` and :func:`format_summary`.

Contract: reads the cumulative manifest and the latest run manifest (never an input); names items by item id unless
``log_keys``; says why each flagged output was flagged (consistency, uncertainty map).
"""
from __future__ import annotations

import math
import posixpath

import numpy as np

from medsr_dist.enhance import uncertainty
from medsr_dist.enhance.identity import MANIFEST_DIR
from medsr_dist.enhance.manifest import STATUSES, manifest_uri, read_manifest, watermark_uri
from medsr_dist.enhance.sides import output_side
from medsr_dist.io.phi import item_label
from medsr_dist.pacs.storage import read_watermark
from medsr_dist.storage import Storage
from medsr_dist.uris import is_dicomweb


def manifest_summary(storage: Storage, output_prefix: str, manifest: str | None = None, *,
                     threshold_db: float | None = None, uncertainty_threshold: float | None = None) -> dict:
    """What ``medsr status`` prints: totals of the cumulative manifest and of the latest run.

    ``outputs`` counts completed outputs; ``ignored``/``quarantined`` count the inputs the cumulative manifest
    keeps in those states. Listed items carry ``item_id``, ``key`` and their text (error reason or output key);
    a flagged output's text says why it was flagged, against ``threshold_db`` (enhance.consistency_threshold_db)
    and ``uncertainty_threshold`` (enhance.uncertainty_threshold) when given (the config's values: the run's own
    are not recorded), else by the values the row holds.
    ``manifest``: where ``_manifest/`` lives when not under ``output_prefix`` (``enhance.manifest``; required for a
    DICOMweb output); ``watermark``: the StudyDate a DICOMweb-input run's ``since_watermark`` starts from, or None.

    Raises:
        FileNotFoundError: no manifest under ``manifest`` (or ``output_prefix``).
        ValueError: ``output_prefix`` is a DICOMweb endpoint and no ``manifest`` is given.
    """
    output_prefix = output_prefix.rstrip("/")
    if is_dicomweb(output_prefix) and not manifest:
        raise ValueError(f"{output_prefix} is a DICOMweb endpoint: its run's manifest lives at enhance.manifest; pass "
                         f"the run's config (-c) or enhance.manifest=<prefix>")
    records = (manifest or output_prefix).rstrip("/")
    uri = manifest_uri(records)
    if not storage.exists(uri):
        raise FileNotFoundError(f"no manifest at {uri}: has `medsr enhance` written to {output_prefix}?")
    every = read_manifest(storage, uri)
    rows = [r for r in every if r["status"] == "done"]
    runs_dir = Storage.join(records, MANIFEST_DIR, "runs")
    runs = storage.list_files(runs_dir, include=["*.parquet"]) if storage.exists(runs_dir) else []
    latest = read_manifest(storage, runs[-1]) if runs else []
    scores = [r["consistency_psnr_db"] for r in rows if r["consistency_psnr_db"] is not None
              and math.isfinite(r["consistency_psnr_db"])]
    by_model: dict[str, int] = {}
    for r in rows:
        label = f"{r['model_name']} ({r['model_sha256'][:12]})"
        by_model[label] = by_model.get(label, 0) + 1
    latest_counts: dict[str, int] = {}
    for r in latest:
        latest_counts[r["status"]] = latest_counts.get(r["status"], 0) + 1
    return {
        "output": output_prefix,
        "manifest": uri,
        "outputs": len(rows),
        "ignored": sum(r["status"] == "ignored" for r in every),
        "quarantined": sum(r["status"] == "quarantined" for r in every),
        "flagged": sum(bool(r["flagged"]) for r in rows),
        "input_bytes": sum(r["input_bytes"] or 0 for r in rows),
        "output_bytes": sum(r["output_bytes"] or 0 for r in rows),
        "consistency_psnr_db": {"min": min(scores), "median": float(np.median(scores)), "max": max(scores)} if scores else None,
        "uncertainty_p99": uncertainty.uncertainty_summary(rows),
        "models": by_model,
        "runs": len(runs),
        "latest_run": posixpath.basename(runs[-1])[: -len(".parquet")] if runs else None,
        "latest_run_manifest": runs[-1] if runs else None,
        "latest_counts": latest_counts,
        "latest_errors": [_listed(r, r["error"]) for r in latest if r["status"] == "error"],
        "quarantined_items": [_listed(r, r["error"]) for r in every if r["status"] == "quarantined"],
        "flagged_outputs": [(*_listed(r, r["output_key"]), _flag_reason(r, threshold_db, uncertainty_threshold))
                            for r in rows if r["flagged"]],
        "watermark": read_watermark(storage, watermark_uri(records)),
    }


def _flag_reason(row: dict, threshold_db: float | None, uncertainty_threshold: float | None) -> str:
    """Why a done row is flagged for review: its consistency PSNR below ``threshold_db``, its uncertainty_p99
    (ldm, K > 1 samples: the row has a std map) above ``uncertainty_threshold``, or both. A threshold not given
    (or one that no longer explains the flag: the config changed since the run) leaves the row's values named."""
    score = row["consistency_psnr_db"]
    p99 = uncertainty.uncertainty_p99_of(row)
    has_score = score is not None and math.isfinite(score)
    has_p99 = p99 is not None and math.isfinite(p99)
    reasons = []
    if has_p99 and uncertainty_threshold is not None and p99 > uncertainty_threshold:
        reasons.append(f"uncertainty p99 {p99:.4f} > enhance.uncertainty_threshold {uncertainty_threshold:g}")
    if has_score and threshold_db is not None and score < threshold_db:
        reasons.append(f"consistency {score:.1f} dB < enhance.consistency_threshold_db {threshold_db:g}")
    if reasons:
        return "; ".join(reasons)
    values = ([f"consistency {score:.1f} dB"] if has_score else []) + ([f"uncertainty p99 {p99:.4f}"] if has_p99 else [])
    return ", ".join(values) + " (flagged under the thresholds of its run)"


def _listed(row: dict, text: str) -> tuple[str, str, str]:
    return row["item_id"], row["input_key"], text


def format_summary(summary: dict, max_listed: int = 10, *, log_keys: bool = False) -> str:
    """Human-readable text of :func:`manifest_summary`. Items are named by item id (input keys, output keys
    and reasons that name them only with ``log_keys``: keys often embed accession numbers)."""
    gib = 1 << 30

    def name(iid: str, key: str) -> str:
        return key if log_keys else item_label({"item_id": iid, "input_key": key})

    lines = [f"output {output_side(summary['output']).label}: {summary['output']}",
             f"outputs: {summary['outputs']} ({summary['input_bytes'] / gib:.3f} GiB in -> "
             f"{summary['output_bytes'] / gib:.3f} GiB out), flagged for review: {summary['flagged']}",
             f"inputs ignored (not images): {summary['ignored']}, quarantined: {summary['quarantined']}"]
    if summary["consistency_psnr_db"]:
        c = summary["consistency_psnr_db"]
        lines.append(f"consistency PSNR (dB): min {c['min']:.1f} · median {c['median']:.1f} · max {c['max']:.1f}")
    if summary.get("uncertainty_p99"):
        u = summary["uncertainty_p99"]
        lines.append(f"uncertainty p99 (std, fraction of the range) of {u['outputs']} outputs with a std map: "
                     f"median {u['median']:.4f} · max {u['max']:.4f}")
    for label, n in summary["models"].items():
        lines.append(f"model {label}: {n} outputs")
    if summary["latest_run"]:
        counts = ", ".join(f"{s} {summary['latest_counts'].get(s, 0)}" for s in STATUSES)
        lines.append(f"runs: {summary['runs']}; latest {summary['latest_run']}: {counts}")
        for iid, key, error in summary["latest_errors"][:max_listed]:
            lines.append(f"  error {name(iid, key)}: {error}")
        if len(summary["latest_errors"]) > max_listed:
            lines.append(f"  ... {len(summary['latest_errors']) - max_listed} more errors in {summary['latest_run_manifest']}")
    for iid, key, error in summary["quarantined_items"][:max_listed]:
        lines.append(f"  quarantined {name(iid, key)}: {error}")
    for iid, key, output_key, why in summary["flagged_outputs"][:max_listed]:
        lines.append(f"  flagged {output_key if log_keys else name(iid, key)}: {why}")
    if len(summary["flagged_outputs"]) > max_listed:
        lines.append(f"  ... {len(summary['flagged_outputs']) - max_listed} more flagged in the manifest")
    if summary.get("watermark"):
        lines.append(f"PACS watermark (next since_watermark run starts at StudyDate): {summary['watermark']}")
    lines.append(f"manifest: {summary['manifest']}")
    return "\n".join(lines)
