"""Identity of an output: output ids, item ids, output keys, where an item's record lives.

Contract: an output is keyed by (input content hash, model hash, parameters) — :func:`output_id`; an input file's
output by (relative input key, output id) — :func:`item_id`. The item record
``<records>/_manifest/items/<item id>.json`` exists only for complete outputs (:func:`item_record_uri`).
"""
from __future__ import annotations

import hashlib
import json
import posixpath

from medsr_dist.storage import Storage

MANIFEST_DIR = "_manifest"
CUMULATIVE_FILE = "manifest.parquet"
LEASE_FILE = "lease.json"


def output_id(input_sha256: str, model_sha256: str, params: dict) -> str:
    """16 hex digits identifying the output of (input content, model, parameters)."""
    return hashlib.sha256(f"{input_sha256}|{model_sha256}|{json.dumps(params, sort_keys=True)}".encode()).hexdigest()[:16]


def item_id(rel_key: str, oid: str) -> str:
    """20 hex digits identifying one input file's output: the same content under two names gets two outputs."""
    return hashlib.sha256(f"{rel_key}|{oid}".encode()).hexdigest()[:20]


def output_key_for(output_prefix: str, rel_key: str, oid: str, ext: str) -> str:
    """``<output>/<rel dir>/<stem>.sr-<oid[:10]><ext>``: beside its siblings, unique per (input, model, params)."""
    directory, name = posixpath.split(rel_key)
    stem = posixpath.splitext(name)[0] or "image"
    return Storage.join(output_prefix, directory, f"{stem}.sr-{oid[:10]}{ext}")


def item_record_uri(output_prefix: str, iid: str) -> str:
    return Storage.join(output_prefix, MANIFEST_DIR, "items", f"{iid}.json")
