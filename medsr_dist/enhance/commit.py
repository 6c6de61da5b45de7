"""Stage 3 of the nightly job (CPU tasks): encode in the input's form, write the output, then its record.

Contract: :class:`EncodeCommit` turns each row into one manifest row (:data:`~medsr_dist.enhance.manifest.MANIFEST_SCHEMA`).
A ``todo`` row is committed by its kind's committer (:data:`EncodeCommit.committers`: 2-D images here, volumes by
:func:`~medsr_dist.enhance.volumes.commit_volume`); the item record is written only after the output is complete, so
its presence means "done".
"""
from __future__ import annotations

import json
import time

import numpy as np

from medsr_dist.enhance import uncertainty
from medsr_dist.enhance.identity import item_record_uri
from medsr_dist.enhance.manifest import manifest_row, now_iso
from medsr_dist.enhance.spec import IMAGE_KIND, JobSpec, error_reason, image_provenance, row_model
from medsr_dist.enhance.volumes import commit_volume
from medsr_dist.infer.consistency import consistency_psnr
from medsr_dist.infer.provenance import VOLUME_KIND
from medsr_dist.infer.rows import batch_rows, columns
from medsr_dist.io.image import ImageMeta, encode_image
from medsr_dist.io.phi import phi_values, sanitize_reason
from medsr_dist.uris import is_below


class EncodeCommit:
    """Stage 3 (CPU tasks): encode in the input's form, write the output, then its record; one manifest row out."""

    def __init__(self, spec: JobSpec):
        self.spec = spec

    def __call__(self, batch: dict) -> dict:
        return columns([self.one(row) for row in batch_rows(batch)])

    def provenance(self, input_key: str, iid: str, input_sha256: str, scale_text: str) -> dict[str, str]:
        """The provenance written into an output file (and repeated in its manifest row): :func:`image_provenance`."""
        return image_provenance(self.spec, input_key, iid, input_sha256, scale_text)

    def one(self, item: dict) -> dict:
        spec, status = self.spec, str(item["status"])
        listed = {"input_version": str(item.get("input_version", "")), "attempts": int(item.get("attempts", 0))}
        if status == "skipped":
            try:
                record = manifest_row(json.loads(str(item["record"])))
                return {**record, "status": "skipped", "input_version": listed["input_version"] or
                        record["input_version"], "input_bytes": int(item["input_bytes"]) or record["input_bytes"]}
            except Exception as exc:  # noqa: BLE001 - an unreadable record: report, the next run redoes it
                status, item = "error", {**item, "error": f"unreadable item record: {error_reason(exc)}"}
        row = manifest_row({
            "input_key": str(item["key"]), "input_sha256": str(item["input_sha256"]), "output_key": str(item["output_key"]),
            "item_id": str(item["item_id"]), "status": status, "error": str(item["error"]),
            **row_model(spec, str(item["key"])),
            "input_format": str(item["input_format"]), "input_bytes": int(item["input_bytes"]),
            "frames": int(item.get("frames", 0)), "seconds": float(item["seconds"]), "run_id": spec.run_id, **listed,
            "fp32_fallbacks": int(item.get("fp32_fallbacks", 0)),
        })
        if status == "todo":
            t0 = time.perf_counter()
            try:
                row.update(self.committers[str(item.get("kind") or IMAGE_KIND)](self, item, row))
            except Exception as exc:  # noqa: BLE001 - the output may exist without a record: the next run redoes it
                row.update(status="error", error=sanitize_reason(
                    f"encode/write failed: {error_reason(exc)}", key=row["input_key"],
                    secrets=phi_values(bytes(item["header"]) or None)))
            row["seconds"] += time.perf_counter() - t0
        if row["status"] != "done":
            row["output_key"] = row["uncertainty_key"] = ""  # nothing was (completely) written for this row
            row["attempts"] = listed["attempts"]
        else:
            row["attempts"] = 0
        row["finished_at"] = now_iso()
        return row

    def _commit(self, item: dict, row: dict) -> dict:
        spec = self.spec
        src = np.asarray(item["pixels"])  # (F, H, W, C)
        meta = ImageMeta.from_json(str(item["meta"]))
        out = np.asarray(item["output"]).astype(np.float32) / np.float32(meta.maxval)  # (F, H', W', C)
        if out.shape[0] != src.shape[0] or out.ndim != 4:
            raise ValueError(f"the replica returned {out.shape[0]} frames for {src.shape[0]}")
        if not is_below(row["output_key"], spec.output):
            raise ValueError(f"output key {row['output_key']} is not under the output prefix {spec.output}")
        nominal = spec.params["outscale"]
        provenance = self.provenance(row["input_key"], row["item_id"], row["input_sha256"], f"{nominal:g}")
        # the grid got finer by exactly this much (rounding of non-integer outscales included)
        scale = out.shape[1] / src.shape[1]
        frames = out if getattr(meta, "frames", 1) > 1 else out[0]
        kwargs = {"dicom_compression": spec.dicom_compression} if spec.dicom_compression != "none" else {}
        data = encode_image(frames, meta, bytes(item["header"]) or None, scale=scale, provenance=provenance, **kwargs)
        maps = uncertainty.write_uncertainty(spec, item, row, meta, scale, provenance)  # before the output: see the record
        spec.storage.write_bytes(row["output_key"], data)  # atomic; a DICOMweb output: STOW-RS unless it is there
        score = consistency_psnr(out, src)
        flag_std = uncertainty.exceeds(maps, spec.uncertainty_threshold)
        done = {**maps,
            "status": "done", "provenance": json.dumps(provenance, sort_keys=True), "bits_stored": meta.bits_stored,
            "channels": meta.channels, "output_bytes": len(data), "input_height": src.shape[1],
            "input_width": src.shape[2], "output_height": out.shape[1], "output_width": out.shape[2],
            "consistency_psnr_db": score, "flagged": bool(score < spec.threshold_db or flag_std), "finished_at": now_iso(),
            "frames": int(src.shape[0]),
        }
        record = {**row, **done, "seconds": row["seconds"]}
        # written only after the output is complete: its presence means "done"
        spec.storage.write_bytes(item_record_uri(spec.records, row["item_id"]), json.dumps(record).encode())
        return done

    def _commit_volume(self, item: dict, row: dict) -> dict:
        return commit_volume(self.spec, item, row)

    #: {item kind: its committer}: what writes a ``todo`` row's output and record and returns its done columns.
    committers = {IMAGE_KIND: _commit, VOLUME_KIND: _commit_volume}
