"""Manifests of the nightly job: the schema, reading, writing, the cumulative merge, stale temp files.

Contract: manifests are Parquet files of :data:`MANIFEST_SCHEMA` rows. ``_manifest/runs/<run id>.parquet`` has one
row per input of that run (a status of :data:`STATUSES`, with its reason); ``_manifest/manifest.parquet``
(:func:`merge_cumulative`) has one row per output ever completed plus the ledger (:data:`LEDGER_STATUSES`, and
``error`` rows of inputs that killed their replica). :func:`manifest_row` completes a row over type defaults.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medsr_dist.enhance.identity import CUMULATIVE_FILE, MANIFEST_DIR
from medsr_dist.storage import PARTIAL_SUFFIX, Storage

log = logging.getLogger(__name__)

STATUSES = ("done", "skipped", "ignored", "error", "quarantined")
"""done: enhanced in this run; skipped: enhanced before; ignored: a readable object without an image (DICOM SR,
waveform, RT plan...: the SOP class is named in ``error``); error: could not be enhanced (reason in ``error``);
quarantined: killed its model replica in ``enhance.max_attempts`` runs, no longer tried while unchanged."""

MANIFEST_SCHEMA = pa.schema([
    ("input_key", pa.string()), ("input_sha256", pa.string()), ("output_key", pa.string()), ("item_id", pa.string()),
    ("status", pa.string()), ("error", pa.string()),
    ("model_name", pa.string()), ("model_sha256", pa.string()), ("params", pa.string()), ("provenance", pa.string()),
    ("input_format", pa.string()), ("bits_stored", pa.int32()), ("channels", pa.int32()),
    ("input_bytes", pa.int64()), ("output_bytes", pa.int64()),
    ("input_height", pa.int64()), ("input_width", pa.int64()), ("output_height", pa.int64()), ("output_width", pa.int64()),
    ("seconds", pa.float64()), ("consistency_psnr_db", pa.float64()), ("flagged", pa.bool_()),
    ("run_id", pa.string()), ("finished_at", pa.string()),
    ("input_version", pa.string()), ("frames", pa.int32()), ("attempts", pa.int32()),
    ("uncertainty_p99", pa.float64()), ("uncertainty_key", pa.string()), ("fp32_fallbacks", pa.int32()),
])
"""One manifest row. ``params``/``provenance`` are JSON objects; ``provenance`` is exactly the text written into the
output file (PNG/TIFF/JPEG text, DICOM derivation). ``run_id``/``finished_at``: the run that produced the output
(for ``skipped`` rows an earlier one). ``seconds``: wall time spent on the item in the run that produced it.
``consistency_psnr_db``: see :func:`~medsr_dist.infer.consistency.consistency_psnr`; ``flagged``: below ``enhance.consistency_threshold_db``.
``input_bytes``/``input_version``: the input's size and version (:class:`~medsr_dist.storage.FileEntry`) when it was
listed; ``frames``: of the input (0: not read); ``attempts``: runs in which the input killed its model replica.
``uncertainty_p99`` / ``uncertainty_key``: an ldm output drawn from K > 1 samples: the 99th percentile of its
per-pixel std map (fraction of the intensity range; NaN without a map) and where the map was written (beside the
output, see :func:`~medsr_dist.enhance.uncertainty.write_uncertainty`); ``flagged`` also when p99 > ``enhance.uncertainty_threshold``.
``fp32_fallbacks``: with ``enhance.precision`` fp16/bf16, the tile batches of this item whose output was not finite
and were computed again in fp32 (the output is then partly fp32; 0 with fp32 or when nothing fell back)."""




def now_iso() -> str:
    """UTC, ISO 8601 with milliseconds (items finish several per second)."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


_DEFAULTS = {"string": "", "int32": 0, "int64": 0, "double": math.nan, "bool": False}


def manifest_row(values: dict) -> dict:
    """A complete manifest row: ``values`` over type defaults, in schema order (unknown keys dropped)."""
    return {f.name: values.get(f.name, _DEFAULTS[str(f.type)]) for f in MANIFEST_SCHEMA}


def plain(value):
    return value.item() if isinstance(value, np.generic) else value


# ----------------------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------------------
def manifest_uri(output_prefix: str) -> str:
    return Storage.join(output_prefix, MANIFEST_DIR, CUMULATIVE_FILE)


def run_manifest_uri(output_prefix: str, run_id: str) -> str:
    return Storage.join(output_prefix, MANIFEST_DIR, "runs", f"{run_id}.parquet")


def write_manifest(storage: Storage, uri: str, rows: list[dict], metadata: dict | None = None) -> None:
    """Write rows (dicts with :data:`MANIFEST_SCHEMA` fields) as one Parquet file, atomically. ``metadata``: what
    the run was (e.g. its replica sizing), kept as JSON under the Parquet schema's ``medsr.<key>`` metadata keys."""
    table = pa.Table.from_pylist([manifest_row(r) for r in rows], schema=MANIFEST_SCHEMA)
    if metadata:
        table = table.replace_schema_metadata({f"medsr.{k}": json.dumps(v) for k, v in metadata.items()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def read_manifest(storage: Storage, uri: str) -> list[dict]:
    """Rows of a manifest Parquet file (columns of older manifests missing here get type defaults)."""
    rows = pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()
    return [manifest_row(r) for r in rows]


def merge_cumulative(storage: Storage, output_prefix: str, run_rows: list[dict]) -> list[dict]:
    """The cumulative manifest after a run: one row per completed output (by item id), newest wins, plus the
    ledger: one row per input key whose latest outcome was ``ignored``, ``quarantined`` or a replica-killing
    ``error`` (``attempts`` > 0) — what the next run needs to leave an unchanged input alone.

    Starts from the previous ``manifest.parquet`` (rebuilt from the item records if it is missing or unreadable),
    adds this run's ``done`` rows (``skipped`` rows refresh their output's size/version), and reads the records of
    any item the two do not know (outputs of a killed run that this run did not list again) — so a listing of the
    records, not a read of each, is the usual cost.
    """
    uri = manifest_uri(output_prefix)
    known: dict[str, dict] = {}
    ledger: dict[str, dict] = {}
    if storage.exists(uri):
        try:
            for r in read_manifest(storage, uri):
                if r["status"] == "done" and r["item_id"]:
                    known[r["item_id"]] = r
                elif r["status"] in LEDGER_STATUSES or r["attempts"]:
                    ledger[r["input_key"]] = r
        except Exception as exc:  # noqa: BLE001 - rebuilt below from the records
            log.warning("cumulative manifest unreadable (%s); rebuilding it from the item records", type(exc).__name__)
    for row in run_rows:
        if row["status"] in ("done", "skipped") and row["item_id"]:
            known[row["item_id"]] = {**row, "status": "done"}
            ledger.pop(row["input_key"], None)
        elif row["status"] in LEDGER_STATUSES or (row["status"] == "error" and row["attempts"]):
            ledger[row["input_key"]] = row
        elif row["status"] == "error":
            ledger.pop(row["input_key"], None)  # changed since, and now failing for another reason
    items_dir = Storage.join(output_prefix, MANIFEST_DIR, "items")
    if storage.exists(items_dir):
        for record_uri in storage.list_files(items_dir, include=["*.json"]):
            iid = posixpath.basename(record_uri)[: -len(".json")]
            if iid not in known:
                try:
                    known[iid] = manifest_row(json.loads(storage.read_bytes(record_uri)))
                except Exception as exc:  # noqa: BLE001
                    log.warning("item record of item %s unreadable (%s); left out of the manifest", iid,
                                type(exc).__name__)
    return sorted([*known.values(), *ledger.values()], key=lambda r: (r["input_key"], r["finished_at"]))


#: Statuses the cumulative manifest keeps per input key, so that an unchanged input is not read again.
LEDGER_STATUSES = ("ignored", "quarantined")


def remove_stale_partials(storage: Storage, output_prefix: str) -> list[str]:
    """Delete in-flight temp files that a killed run left under a local output prefix; returns their paths.

    Call only while holding the prefix's lease: a live run's temp files look the same. Object stores need
    nothing: an upload that never completed leaves no visible object.
    """
    if "://" in output_prefix and not output_prefix.startswith("file://"):
        return []
    fs, root = storage.fs(output_prefix)
    if not os.path.isdir(root):
        return []
    removed = []
    for path in fs.find(root, withdirs=False):
        name = posixpath.basename(path)
        if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:  # pragma: no cover - raced with its writer
                pass
    return removed


# ----------------------------------------------------------------------------------------------------------
# Driver


def watermark_uri(records: str) -> str:
    """Where a DICOMweb-input run stores the StudyDate the next ``pacs.query.since_watermark`` run starts from."""
    return Storage.join(records, MANIFEST_DIR, "watermark.json")
