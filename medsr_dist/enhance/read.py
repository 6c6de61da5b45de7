"""Stage 1 of the nightly job (CPU tasks): read, hash, name the output, skip what is done, refuse, decode.

Contract: :class:`ReadDecode` turns ``{"key"[, "size", "version", "attempts"]}`` batches into one row per key (the
columns are listed on the class); an item of another kind than a 2-D image (:func:`~medsr_dist.enhance.spec.item_kind`)
is read by that kind's reader (:data:`ReadDecode.readers`: volumes by :func:`~medsr_dist.enhance.volumes.read_volume_item`).
Nothing here raises for one bad input: it becomes a row with its reason.
"""
from __future__ import annotations

import hashlib
import time

from medsr_dist.enhance.identity import item_id, item_record_uri, output_id
from medsr_dist.enhance.sides import output_side
from medsr_dist.enhance.spec import IMAGE_KIND, JobSpec, error_reason, item_kind, rel_key
from medsr_dist.enhance.volumes import read_volume_item
from medsr_dist.infer.provenance import VOLUME_KIND
from medsr_dist.infer.rows import NO_PIXELS, columns
from medsr_dist.io.bounded import DecodeKilled, decode_image_bounded
from medsr_dist.io.image import ImageDecodeError, NotAnImageObject, decode_image, probe_image
from medsr_dist.io.phi import phi_values, sanitize_reason
from medsr_dist.uris import is_below


class ReadDecode:
    """Stage 1 (CPU tasks): ``{"key"[, "size", "version"]}`` -> one row per key: pixels to enhance (``todo``),
    or ``skipped``/``ignored``/``error``.

    Order per key: normalise the key (``..``/absolute segments: error, nothing read), refuse a listing size over
    ``max_input_bytes`` (nothing read; a listing without size, e.g. PACS, is checked on the bytes read), read,
    hash, probe the header (``probe_image``: a DICOM without image is ``ignored``), refuse what exceeds
    ``max_input_pixels`` or, at the job's outscale, ``max_output_pixels`` (frames counted; nothing decoded), skip
    what has a record and an output, decode the rest — in a child process under ``decode_memory_bytes`` /
    ``decode_timeout_s`` when both are set: a decode stopped there is an error row whose ``attempts`` count
    towards ``max_attempts``, then ``quarantined``.

    Output columns: key, item_id, input_sha256, input_bytes, input_version, input_format, frames, output_key,
    status, error, record (the existing item record, JSON, for ``skipped``), attempts, pixels ((F, H, W, C) float32
    in [0, 1], F = frames, also 1), meta (``ImageMeta`` JSON), header (DICOM header bytes or b""), seconds.
    ``attempts`` (optional input column): runs in which the item already killed its replica.
    """

    def __init__(self, spec: JobSpec):
        self.spec = spec

    def __call__(self, batch: dict) -> dict:
        keys = batch["key"]
        sizes, versions, attempts = batch.get("size"), batch.get("version"), batch.get("attempts")
        found = [self._identify(str(key), -1 if sizes is None else int(sizes[i]),
                                "" if versions is None else str(versions[i]), 0 if attempts is None else int(attempts[i]))
                 for i, key in enumerate(keys)]
        present = self._present([row for row, _, _ in found])
        return columns([self._decide(row, data, probe, present) for row, data, probe in found])

    def one(self, key: str, size: int = -1, version: str = "", attempts: int = 0) -> dict:
        """The row of one key (what ``__call__`` does for a batch of one)."""
        row, data, probe = self._identify(key, size, version, attempts)
        return self._decide(row, data, probe, self._present([row]))

    def _identify(self, key: str, size: int, version: str, attempts: int):
        """Read, hash, probe the header, name the output: (row, bytes or None, probe or None)."""
        spec = self.spec
        row = {"key": key, "item_id": "", "input_sha256": "", "input_bytes": max(size, 0), "input_version": version,
               "input_format": "", "frames": 0, "output_key": "", "status": "todo", "error": "", "record": "",
               "attempts": attempts, "pixels": NO_PIXELS, "meta": "", "header": b"", "seconds": 0.0, "kind": IMAGE_KIND}
        t0 = time.perf_counter()
        data = probe = None
        try:
            rel = rel_key(spec, key)
            kind = item_kind(spec, key)
            if kind != IMAGE_KIND:  # NIfTI / DICOM series: medsr_dist/enhance/volumes.py
                return self.readers[kind](self, row, rel, t0), None, None
            self._check_size(size)
            data = spec.storage.read_bytes(key)  # a DICOMweb instance: WADO-RS, as stored
            self._check_size(len(data))
            row["input_sha256"], row["input_bytes"] = hashlib.sha256(data).hexdigest(), len(data)
            # header only: a 400 kB PNG can say 20000 x 20000, and a DICOM can be a structured report
            probe = probe_image(data, "input", max_inflated_bytes=spec.max_input_bytes)
            row["input_format"], row["frames"] = probe.format, probe.frames
            oid = output_id(row["input_sha256"], spec.model.sha256, spec.params)
            row["item_id"] = item_id(rel, oid)
            row["output_key"] = output_side(spec.output).output_key(spec, key, rel, oid, row["input_sha256"], data,
                                                                    probe.format)
            if not is_below(row["output_key"], spec.output):  # by construction; asserted because it must never fail
                raise ValueError(f"output key {row['output_key']} is not under the output prefix {spec.output}")
        except NotAnImageObject as exc:
            row.update(status="ignored", error=exc.reason, output_key="", item_id="")
        except Exception as exc:  # noqa: BLE001 - becomes an error row naming the reason
            row.update(status="error", error=error_reason(exc))
        row["seconds"] = time.perf_counter() - t0
        return row, data, probe

    def _present(self, rows: list[dict]) -> set[str] | str:
        """Which item records and outputs of ``rows`` exist: a set of URIs, or the reason the check failed. A PACS
        output is asked once per derived series (QIDO-RS), not once per instance."""
        storage = self.spec.storage
        try:
            recorded = {r["output_key"]: uri for r in rows if r["status"] == "todo"
                        for uri in [item_record_uri(self.spec.records, r["item_id"])] if storage.exists(uri)}
            if not recorded:
                return set()
            outputs = output_side(self.spec.output).existing(storage, list(recorded))
            return outputs | {recorded[k] for k in outputs}
        except Exception as exc:  # noqa: BLE001 - every row of the batch that needed the answer says why
            return f"checking for existing outputs failed: {error_reason(exc)}"

    def _volume(self, row: dict, rel: str, t0: float) -> dict:
        """A volume item's row, decided (skipped, error or decoded) by :func:`~medsr_dist.enhance.volumes.read_volume_item`."""
        secrets: set[str] = set()
        try:
            row = read_volume_item(self.spec, row, rel, secrets)
        except Exception as exc:  # noqa: BLE001 - becomes an error row naming the item and the reason
            row.update(status="error", error=sanitize_reason(error_reason(exc), key=row["key"], secrets=secrets),
                       pixels=NO_PIXELS, header=b"")
        row["seconds"] = time.perf_counter() - t0
        return row

    def _decide(self, row: dict, data: bytes | None, probe, present: set[str] | str) -> dict:
        """Skip (a record and its output exist), refuse (limits), or decode."""
        if row["kind"] != IMAGE_KIND:  # decided by its kind's reader
            return row
        spec = self.spec
        t0 = time.perf_counter()
        try:
            if row["status"] == "todo":
                record_uri = item_record_uri(spec.records, row["item_id"])
                if isinstance(present, str):
                    raise RuntimeError(present)
                # done = a record and its output (an output deleted since is made again)
                if record_uri in present and row["output_key"] in present:
                    row.update(status="skipped", record=spec.storage.read_bytes(record_uri).decode())
                else:
                    self._check_limits(probe)
                    img = self._decode(data)
                    pixels = img.pixels if img.pixels.ndim == 4 else img.pixels[None]
                    row.update(pixels=pixels, meta=img.meta.to_json(), header=img.header or b"", frames=len(pixels))
        except NotAnImageObject as exc:
            row.update(status="ignored", error=exc.reason, pixels=NO_PIXELS, output_key="", item_id="")
        except DecodeKilled as exc:  # counted like a replica crash: quarantined after max_attempts runs
            attempts = int(row["attempts"]) + 1
            if attempts >= spec.max_attempts:
                reason = (f"quarantined: its decode was stopped in {attempts} runs (enhance.max_attempts "
                          f"{spec.max_attempts}); last: {exc.reason}; not tried again until it changes")
            else:
                reason = f"{exc.reason} (run {attempts} of enhance.max_attempts {spec.max_attempts})"
            row.update(status="quarantined" if attempts >= spec.max_attempts else "error", error=reason,
                       attempts=attempts, pixels=NO_PIXELS)
        except Exception as exc:  # noqa: BLE001 - becomes an error row naming the reason
            row.update(status="error", error=error_reason(exc), pixels=NO_PIXELS)
        if row["error"]:
            row["error"] = sanitize_reason(row["error"], key=row["key"], secrets=phi_values(data))
        row["seconds"] += time.perf_counter() - t0
        return row

    def _decode(self, data: bytes):
        """decode_image, in a child under ``decode_memory_bytes`` / ``decode_timeout_s`` when both are set."""
        spec = self.spec
        if spec.decode_timeout_s > 0 and spec.decode_memory_bytes > 0:
            return decode_image_bounded(data, "input", memory_bytes=spec.decode_memory_bytes,
                                        seconds=spec.decode_timeout_s, max_inflated_bytes=spec.max_input_bytes)
        return decode_image(data, "input", max_inflated_bytes=spec.max_input_bytes)

    def _check_size(self, size: int) -> None:
        if size > self.spec.max_input_bytes:
            raise ImageDecodeError("input", f"{size:,} bytes exceeds enhance.max_input_bytes "
                                            f"{self.spec.max_input_bytes:,}; not read")

    def _check_limits(self, probe) -> None:
        spec, scale = self.spec, float(self.spec.params["outscale"])
        frames = f" x {probe.frames} frames" if probe.frames > 1 else ""
        if probe.pixels > spec.max_input_pixels:
            raise ImageDecodeError("input", f"{probe.height} x {probe.width}{frames} = {probe.pixels:,} pixels exceeds "
                                            f"enhance.max_input_pixels {spec.max_input_pixels:,}; not decoded")
        out_h, out_w = max(1, round(probe.height * scale)), max(1, round(probe.width * scale))
        out_pixels = probe.frames * out_h * out_w
        if out_pixels > spec.max_output_pixels:
            raise ImageDecodeError("input", f"output at x{scale:g} would be {out_h} x {out_w}{frames} = {out_pixels:,} "
                                            f"pixels, over enhance.max_output_pixels {spec.max_output_pixels:,}; "
                                            f"not decoded")

    #: {item kind: its reader} for items that are not 2-D images (those are read by :meth:`_identify` itself).
    readers = {VOLUME_KIND: _volume}
