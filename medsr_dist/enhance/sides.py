"""Where the job's outputs go: a file prefix or a DICOMweb endpoint, as ONE small object per kind of output.

Contract: :func:`output_side` gives :data:`FILES` or :data:`PACS` for ``enhance.output``; each names a 2-D item's
output (:meth:`~FilesOutput.output_key`), the uncertainty map's (:meth:`~FilesOutput.std_key`), and says which
outputs exist (:meth:`~FilesOutput.existing` for a batch, :meth:`~FilesOutput.listed` for a whole run). A PACS
stores objects by UID (deterministic, derived from the source header), so its keys are instance URIs and its checks
one QIDO-RS per derived series.
"""
from __future__ import annotations

import io

import pydicom

from medsr_dist.enhance.identity import item_id, output_key_for
from medsr_dist.enhance.spec import JobSpec, image_provenance
from medsr_dist.io.image import output_extension
from medsr_dist.pacs.storage import derived_instance_uri
from medsr_dist.storage import FileEntry, Storage
from medsr_dist.uris import Endpoint, InstanceRef, is_dicomweb


class FilesOutput:
    """Outputs under a file/object-store prefix, beside their siblings' relative paths."""

    label = "prefix"

    @staticmethod
    def output_key(spec: JobSpec, key: str, rel: str, oid: str, sha256: str, data: bytes, fmt: str) -> str:
        # an instance's key ends in its SOP Instance UID: keep all of it in the file name
        named = rel + ".dcm" if is_dicomweb(spec.input) else rel
        return output_key_for(spec.output, named, oid, output_extension(fmt))

    @staticmethod
    def std_key(output: str, stem: str, data: bytes) -> str:
        return stem + ".std.dcm"

    @staticmethod
    def existing(storage: Storage, keys: list[str]) -> set[str]:
        return {k for k in keys if storage.exists(k)}

    @staticmethod
    def listed(storage: Storage, spec: JobSpec, done: dict[str, list[dict]], entries: list[FileEntry]) -> set[str]:
        return set(storage.list_files(spec.output))


class PacsOutput:
    """Outputs stored at a DICOMweb endpoint (STOW-RS), as derived series of deterministic UIDs."""

    label = "endpoint"

    @staticmethod
    def output_key(spec: JobSpec, key: str, rel: str, oid: str, sha256: str, data: bytes, fmt: str) -> str:
        """The derived instance's URI at the DICOMweb output, from the source header (deterministic UIDs)."""
        if fmt != "dicom":
            raise ValueError(f"enhance.output is a DICOMweb endpoint, which stores DICOM objects only; this input is "
                             f"{fmt}")
        provenance = image_provenance(spec, key, item_id(rel, oid), sha256, f"{spec.params['outscale']:g}")
        return derived_instance_uri(spec.output, data, provenance)

    @staticmethod
    def std_key(output: str, stem: str, data: bytes) -> str:
        """Where an uncertainty map (a derived object of its own series, deterministic UIDs) lands at the DICOMweb
        ``output``: its own study/series/instance URI — a PACS stores objects by UID, not beside a file name."""
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        endpoint, _ = Endpoint.parse(output)
        return InstanceRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)).uri(endpoint)

    @staticmethod
    def existing(storage, keys: list[str]) -> set[str]:
        return storage.existing(keys)  # one QIDO-RS per derived series

    @staticmethod
    def listed(storage, spec: JobSpec, done: dict[str, list[dict]], entries: list[FileEntry]) -> set[str]:
        listed = {e.uri for e in entries}
        return storage.existing([r["output_key"] for key, rows in done.items() if key in listed for r in rows])


FILES, PACS = FilesOutput(), PacsOutput()


def output_side(output: str) -> FilesOutput | PacsOutput:
    """The side of ``enhance.output``: :data:`PACS` for a ``dicomweb+http(s)://`` endpoint, else :data:`FILES`."""
    return PACS if is_dicomweb(output) else FILES
