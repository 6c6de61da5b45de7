"""The nightly job's seam to a PACS: :class:`PacsStorage` is a :class:`~medsr_dist.storage.Storage` that also
understands DICOMweb instance URIs, so the job's listing, reading and output commit go through one interface
whatever the archive is.

* ``list_entries(<endpoint>)`` is a QIDO-RS query (``pacs.query``; :meth:`PacsStorage.query` with a watermark) and
  gives one :class:`~medsr_dist.storage.FileEntry` per instance: ``uri`` =
  ``<endpoint>/studies/<study>/series/<series>/instances/<sop>``, ``size`` 0 (QIDO-RS does not say), ``version``
  ``dicomweb:<StudyDate>:<SOPInstanceUID>`` (DICOM gives changed content a new SOP Instance UID; the job's
  exactly-once identity stays (SOPInstanceUID, content hash), since the content is hashed when it is read; the
  StudyDate rides along for :func:`watermark_of_rows`).
* ``read_bytes(<instance URI>)`` is a WADO-RS retrieve of the object as stored.
* ``write_bytes(<instance URI>, data)`` is a STOW-RS of a derived object whose UIDs must be the URI's (its study:
  the source's); it stores only what the PACS does not list already. :func:`derived_instance_uri` gives that URI
  from the source header before any pixel is enhanced, so ``exists`` (QIDO-RS) tells a rerun what is there.
* Manifests, item records and the lease cannot live in a PACS: they go to an ordinary prefix (local or S3).

Everything else (local paths, ``file://``, ``s3://``) is the plain :class:`~medsr_dist.storage.Storage`. Nothing is
ever deleted from a PACS.
"""
from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterable

import pydicom

from medsr_dist.config import PacsConfig, StorageConfig
from medsr_dist.pacs.dicomweb import DicomwebPacs, derived_uids
from medsr_dist.storage import FileEntry, Storage, StorageError
from medsr_dist.uris import Endpoint, InstanceRef, glob_match, is_dicomweb

VERSION_PREFIX = "dicomweb:"


class PacsStorage(Storage):
    """:class:`~medsr_dist.storage.Storage` plus DICOMweb URIs (see the module). Picklable: ships both configs."""

    def __init__(self, config: StorageConfig | None = None, pacs: PacsConfig | None = None):
        super().__init__(config)
        self.pacs_config = pacs if pacs is not None else PacsConfig()
        self._clients: dict[str, DicomwebPacs] = {}
        self._clients_lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"config": self.config, "pacs": self.pacs_config}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"], state["pacs"])

    def __repr__(self) -> str:
        return f"PacsStorage({self.config!r})"

    def pacs(self, uri: str) -> DicomwebPacs:
        """The client of ``uri``'s endpoint (one per endpoint and process)."""
        endpoint, _ = Endpoint.parse(uri)
        with self._clients_lock:
            if endpoint.uri not in self._clients:
                self._clients[endpoint.uri] = DicomwebPacs(endpoint.uri, self.pacs_config)
            return self._clients[endpoint.uri]

    @staticmethod
    def _ref(uri: str) -> InstanceRef:
        endpoint, ref = Endpoint.parse(uri)
        if ref is None:
            raise StorageError(f"{endpoint}: names a DICOMweb endpoint, not an instance")
        return ref

    # -- listing ----------------------------------------------------------------------------------------
    def query(self, prefix: str, *, watermark: str | None = None) -> list[InstanceRef]:
        """The instances ``pacs.query`` selects at endpoint ``prefix`` (``watermark``: see DicomwebPacs.query)."""
        return self.pacs(prefix).query(self.pacs_config.query, watermark=watermark)

    def entries(self, prefix: str, refs: Iterable[InstanceRef], include: list[str] | None = None,
                exclude: list[str] | None = None) -> list[FileEntry]:
        """FileEntries of ``refs`` (include/exclude globs match ``studies/<S>/series/<R>/instances/<I>``)."""
        endpoint, _ = Endpoint.parse(prefix)
        out = []
        for ref in refs:
            if include and not any(glob_match(ref.path, p) for p in include):
                continue
            if exclude and any(glob_match(ref.path, p) for p in exclude):
                continue
            out.append(FileEntry(ref.uri(endpoint), 0, f"{VERSION_PREFIX}{ref.study_date}:{ref.sop}"))
        return out

    def list_entries(self, prefix, include=None, exclude=None) -> list[FileEntry]:
        if not is_dicomweb(prefix):
            return super().list_entries(prefix, include, exclude)
        return self.entries(str(prefix), self.query(str(prefix)), include, exclude)

    # -- whole objects ----------------------------------------------------------------------------------
    def read_bytes(self, uri) -> bytes:
        if not is_dicomweb(uri):
            return super().read_bytes(uri)
        return self.pacs(uri).retrieve(self._ref(uri))

    def write_bytes(self, uri, data) -> None:
        """DICOMweb: STOW-RS of ``data`` unless the PACS has it; its UIDs must be those of ``uri`` (raises
        StorageError otherwise: an output must land exactly where the job looks for it on the next run)."""
        if not is_dicomweb(uri):
            return super().write_bytes(uri, data)
        ref = self._ref(uri)
        try:
            ds = pydicom.dcmread(io.BytesIO(bytes(data)), stop_before_pixels=True)
            got = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"STOW-RS: the output is not a DICOM object with UIDs ({type(exc).__name__})") from None
        if got != (ref.study, ref.series, ref.sop):
            raise StorageError("STOW-RS: the derived object's study/series/instance UIDs are not those its output "
                               "URI was derived with (derived_uids and encode_dicom disagree)")
        self.pacs(uri).store(bytes(data), study=ref.study)

    def exists(self, uri) -> bool:
        if not is_dicomweb(uri):
            return super().exists(uri)
        ref = self._ref(uri)
        return self.pacs(uri).has_instance(ref.study, ref.series, ref.sop)

    def existing(self, uris: Iterable[str]) -> set[str]:
        """Which of these DICOMweb instance URIs the PACS lists: one QIDO-RS per derived series, not per object."""
        by_series: dict[tuple[str, str, str], list[tuple[str, InstanceRef]]] = {}
        for uri in uris:
            endpoint, ref = Endpoint.parse(uri)
            if ref is not None:
                by_series.setdefault((endpoint.uri, ref.study, ref.series), []).append((uri, ref))
        found = set()
        for (endpoint, study, series), items in by_series.items():
            present = self.pacs(endpoint).instances_in_series(study, series)
            found.update(uri for uri, ref in items if ref.sop in present)
        return found

    def delete(self, uri, missing_ok: bool = False) -> None:
        if is_dicomweb(uri):
            raise StorageError(f"{Endpoint.parse(str(uri))[0]}: medsr-dist never deletes from a PACS")
        return super().delete(uri, missing_ok)


def derived_instance_uri(output: str, source_header: bytes, provenance: dict[str, str]) -> str:
    """Where the derived object of a source lands at DICOMweb endpoint ``output``:
    ``<output>/studies/<source study>/series/<derived series>/instances/<derived SOP>`` (see
    :func:`~medsr_dist.pacs.dicomweb.derived_uids`). ``source_header``: the source object's bytes (its header is
    enough)."""
    endpoint, _ = Endpoint.parse(output)
    ds = pydicom.dcmread(io.BytesIO(bytes(source_header)), stop_before_pixels=True, force=True)
    study, series, sop = derived_uids(ds, provenance)
    return InstanceRef(study, series, sop).uri(endpoint)


# ----------------------------------------------------------------------------------------------------------
# Watermark: "since the last run"
# ----------------------------------------------------------------------------------------------------------
def next_watermark(refs: Iterable[InstanceRef], unfinished: Iterable[str] = ()) -> str | None:
    """The StudyDate the next ``since_watermark`` run starts from: the latest StudyDate listed, or — when some listed
    instances (``unfinished``: their SOP Instance UIDs) did not finish (error) — the earliest StudyDate among those,
    so the next run asks for them again. None when nothing was listed with a date."""
    refs = [r for r in refs if r.study_date]
    if not refs:
        return None
    pending = set(unfinished)
    waiting = [r.study_date for r in refs if r.sop in pending]
    return min(waiting) if waiting else max(r.study_date for r in refs)


def watermark_of_rows(rows: Iterable[dict]) -> str | None:
    """:func:`next_watermark` of a run's manifest rows (``input_key``, ``input_version`` as :meth:`PacsStorage.entries`
    made it, ``status``): rows with status ``error`` are unfinished."""
    refs, unfinished = [], []
    for row in rows:
        version = str(row.get("input_version") or "")
        if not version.startswith(VERSION_PREFIX):
            continue
        date, _, sop = version[len(VERSION_PREFIX):].partition(":")
        refs.append(InstanceRef("", "", sop, date))
        if row.get("status") == "error":
            unfinished.append(sop)
    return next_watermark(refs, unfinished)


def read_watermark(storage: Storage, uri: str) -> str | None:
    """The watermark stored at ``uri`` (JSON ``{"study_date": "YYYYMMDD"}``), None if there is none."""
    if not storage.exists(uri):
        return None
    try:
        value = json.loads(storage.read_bytes(uri)).get("study_date")
    except (ValueError, AttributeError, StorageError):
        return None
    return str(value) if value else None


def write_watermark(storage: Storage, uri: str, study_date: str | None, run_id: str = "") -> None:
    """Store the next run's watermark atomically (nothing when ``study_date`` is None)."""
    if study_date:
        storage.write_bytes(uri, json.dumps({"study_date": study_date, "run_id": run_id}).encode())


__all__ = ["PacsStorage", "derived_instance_uri", "next_watermark", "read_watermark", "watermark_of_rows",
           "write_watermark"]
