"""Identifier scrubbing: what of an input may reach a reason text or a log.

Contract: :func:`phi_values` reads the identifier values of a DICOM header (nothing else), :func:`sanitize_reason`
removes them (and the input's key) from a text and bounds its length; :func:`key_ref` / :func:`item_label` name an
input in logs without its key (keys often embed accession numbers or names). Used by the nightly job
(:mod:`medsr_dist.enhance`), Serve, the DICOMweb client and the volume items alike.
"""
from __future__ import annotations

import hashlib
import posixpath

import pydicom

from medsr_dist.io.dicom import read_image_dataset

MAX_REASON_CHARS = 600


def key_ref(key: str) -> str:
    """How logs name an input that has no item id yet: ``key-`` + 12 hex digits of its key's SHA-256."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def item_label(row: dict, log_keys: bool = False) -> str:
    """How logs and progress name a row's item: its input key with ``log_keys``, else ``item <item id>`` (or the
    :func:`key_ref` of its key before an item id exists). Keys often embed accession numbers or names."""
    if log_keys:
        return str(row.get("input_key") or row.get("key") or "")
    iid = str(row.get("item_id") or "")
    return f"item {iid}" if iid else key_ref(str(row.get("input_key") or row.get("key") or ""))


#: DICOM attributes whose values must never reach a reason text or a log (also their PersonName components).
PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs",
                "OtherPatientNames", "OtherPatientIDsSequence", "PatientAddress", "PatientMotherBirthName",
                "ReferringPhysicianName", "InstitutionName", "StudyID")


def phi_values(data: bytes | None) -> set[str]:
    """Identifier values held by a DICOM file's header (:data:`PHI_KEYWORDS`, person names also by component),
    for :func:`sanitize_reason`; empty for anything pydicom cannot read. Reads the header only, through the image
    reader's bounds (:func:`~medsr_dist.io.dicom.read_image_dataset`: a Deflate bomb or an item flood is not
    parsed here either — this runs on the error path of exactly such files)."""
    if not data:
        return set()
    try:
        ds = read_image_dataset(bytes(data), "phi", header_only=True)
    except Exception:  # noqa: BLE001 - not DICOM, unreadable or past a bound: nothing of it can be named in a reason
        return set()
    found: set[str] = set()

    def add(value) -> None:
        if value is None:
            return
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            for v in value:
                add(v)
            return
        if isinstance(value, pydicom.Sequence):
            for item in value:
                for elem in item:
                    add(elem.value)
            return
        text = str(value).strip()
        if len(text) >= 2:
            found.add(text)
            found.update(p.strip() for p in text.replace("=", "^").split("^") if len(p.strip()) >= 2)

    for keyword in PHI_KEYWORDS:
        try:
            add(ds.get(keyword))
        except Exception:  # noqa: BLE001 - a damaged element: it is simply not named
            continue
    return found


def sanitize_reason(text: str, *, key: str = "", secrets: set[str] | frozenset[str] = frozenset()) -> str:
    """A reason fit for manifests' ``error`` column and for logs: the input's key (and its relative parts) and
    every identifier value in ``secrets`` replaced (``<input>``, ``<redacted>``), at most
    :data:`MAX_REASON_CHARS` characters. Decoders quote header values in their messages now and then."""
    if key:
        for spelling in sorted({key, key.rstrip("/"), posixpath.basename(key)} - {""}, key=len, reverse=True):
            text = text.replace(spelling, "<input>")
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "<redacted>")
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
