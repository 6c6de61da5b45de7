"""Listing and planning of a run: which inputs go to the pipeline, decided before any Ray work.

Contract: :func:`list_inputs` lists ``enhance.input`` (files, or a DICOMweb QIDO-RS query) minus the output prefix;
:func:`plan_run` sorts the listed inputs by what the cumulative manifest knows of them, reading no input
(:class:`RunPlan`: rows finished without Ray, items for the pipeline, items that run alone).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from medsr_dist.config import EnhanceConfig
from medsr_dist.enhance.identity import MANIFEST_DIR, item_id, item_record_uri, output_id
from medsr_dist.enhance.manifest import LEDGER_STATUSES, manifest_row, manifest_uri, now_iso, read_manifest
from medsr_dist.enhance.sides import output_side
from medsr_dist.enhance.spec import JobSpec, keyed_by, rel_key, row_model
from medsr_dist.io.phi import sanitize_reason
from medsr_dist.pacs.storage import VERSION_PREFIX as PACS_VERSION
from medsr_dist.storage import FileEntry, Storage
from medsr_dist.uris import is_below, is_dicomweb

log = logging.getLogger(__name__)


def list_inputs(storage: Storage, e: EnhanceConfig, *, watermark: str | None = None) -> list[FileEntry]:
    """Input files under ``enhance.input`` matching include/exclude, with size and version, minus anything under
    the output prefix — however either prefix is spelled (``file://`` or a plain path, ``./``, trailing ``/``).

    A DICOMweb input (``storage`` a :class:`~medsr_dist.pacs.storage.PacsStorage`) is the QIDO-RS query
    ``pacs.query`` (``watermark``: the first StudyDate with ``since_watermark``), which leaves out the series
    medsr-dist derived, so input and output may be the same PACS; include/exclude match
    ``studies/<S>/series/<R>/instances/<I>``. An empty answer is a night with nothing new (no error).

    Raises:
        ValueError: the input lies inside the output prefix.
        FileNotFoundError: nothing to enhance (files).
        PacsError: the PACS cannot be queried.
    """
    if is_dicomweb(e.input):
        return storage.entries(e.input, storage.query(e.input, watermark=watermark), e.include, e.exclude)
    if is_below(e.input, e.output):
        raise ValueError(f"enhance.input {e.input} lies inside enhance.output {e.output}: outputs would be "
                         f"enhanced again; choose an output prefix outside the archive's input")
    # Storage's own listing (a PacsStorage lists a local or s3 input the same way): links refused per
    # enhance.follow_symlinks come back with their reason and become error rows in plan_run
    entries = [f for f in Storage.list_entries(storage, e.input, include=e.include, exclude=e.exclude,
                                               follow_symlinks=e.follow_symlinks, with_refused=True)
               if not is_below(f.uri, e.output)]
    if not entries:
        raise FileNotFoundError(f"enhance.input: no files under {e.input} match include={e.include} exclude={e.exclude}")
    return entries


@dataclass
class RunPlan:
    """What the driver decided per listed input before any Ray work."""

    rows: list[dict]  # finished without Ray: skipped from the index, quarantined, ignored, refused keys
    todo: list[dict]  # {"key", "size", "version", "attempts"} for the pipeline, batch-mates allowed
    alone: list[dict]  # the same, for inputs that killed a replica before: one per block from the start


def plan_run(storage: Storage, spec: JobSpec, entries: list[FileEntry]) -> RunPlan:
    """Sort listed inputs by what the cumulative manifest knows of them, reading no input.

    An input whose (key, size, version) matches a ``done`` row of this model and parameters whose output is
    still listed is ``skipped``; one matching a ``quarantined`` or ``ignored`` row keeps that status; one
    matching an ``error`` row with attempts goes to the pipeline alone with its count; every other input
    (new, changed, or indexed by an older manifest without versions) goes to the pipeline, which hashes it.
    """
    done: dict[str, list[dict]] = {}
    ledger: dict[str, dict] = {}
    uri = manifest_uri(spec.records)
    if storage.exists(uri):
        try:
            for r in read_manifest(storage, uri):
                if r["status"] == "done":
                    done.setdefault(r["input_key"], []).append(r)
                elif r["status"] in LEDGER_STATUSES or r["attempts"]:
                    ledger[r["input_key"]] = r
        except Exception as exc:  # noqa: BLE001 - every input is then hashed, as on a first night
            log.warning("cumulative manifest unreadable (%s); every input is read again", type(exc).__name__)
    outputs = _listed_outputs(storage, spec, done, entries) if done else set()
    plan = RunPlan([], [], [])
    for entry in entries:
        key, base = entry.uri, {"key": entry.uri, "size": entry.size, "version": entry.version, "attempts": 0}
        unchanged = lambda r: r["input_version"] == entry.version and (  # noqa: E731
            r["input_bytes"] == entry.size or entry.version.startswith(PACS_VERSION))  # QIDO-RS gives no size
        try:
            rel = rel_key(spec, key)
            if entry.refused:  # a symbolic link the listing did not follow: nothing behind it is read
                raise ValueError(entry.refused)
        except ValueError as exc:
            plan.rows.append(manifest_row({
                "input_key": key, "status": "error", "error": sanitize_reason(str(exc), key=key), "run_id": spec.run_id,
                **row_model(spec, key),
                "input_bytes": entry.size, "input_version": entry.version, "finished_at": now_iso()}))
            continue
        hit = next((r for r in done.get(key, []) if unchanged(r) and r["output_key"] in outputs
                    and item_record_uri(spec.records, r["item_id"]) in outputs
                    and r["item_id"] == item_id(rel, output_id(r["input_sha256"], *keyed_by(spec, key)))),
                   None)
        known = ledger.get(key)
        if hit is not None:
            plan.rows.append({**hit, "status": "skipped"})
        elif known is not None and unchanged(known) and known["status"] in LEDGER_STATUSES:
            plan.rows.append({**known, "run_id": spec.run_id, "finished_at": now_iso()})
        elif known is not None and unchanged(known) and known["attempts"]:
            plan.alone.append({**base, "attempts": int(known["attempts"])})
        else:
            plan.todo.append(base)
    return plan


def _listed_outputs(storage: Storage, spec: JobSpec, done: dict[str, list[dict]], entries: list[FileEntry]) -> set[str]:
    """The outputs and item records that exist, of the ``done`` rows of the listed inputs: a listing of the output
    prefix (and of the records' folder when the manifest lives elsewhere); a DICOMweb output is asked with one
    QIDO-RS per derived series."""
    found = output_side(spec.output).listed(storage, spec, done, entries)
    items_dir = Storage.join(spec.records, MANIFEST_DIR, "items")
    if spec.records != spec.output and storage.exists(items_dir):
        found |= set(storage.list_files(items_dir))
    return found
