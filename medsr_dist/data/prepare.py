"""`medsr prepare`: an image archive on the store -> a sharded Parquet dataset with a patient-level split.

Flow (Ray Data): list the archive -> read + decode each file in parallel tasks (unreadable files
become error rows, never exceptions) -> patient-level train/val/test assignment on the driver from
the small index -> one Parquet folder per split under ``prepare.output``.

Row schema of the dataset (``<output>/<split>/*.parquet``):
``key`` (source URI), ``rel_key``, ``patient_id``, ``image`` (lossless PNG bytes, 8- or 16-bit,
gray or RGB, display orientation), ``height``, ``width``, ``channels``, ``bits``, ``format``,
``meta`` (ImageMeta JSON of the source).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medsr_dist.config import MedsrConfig, MultiscaleConfig, SplitConfig, SubimageConfig
from medsr_dist.storage import Storage

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def to_training_png(pixels: np.ndarray, bits: int) -> bytes:
    """float32 (H, W, C) in [0, 1] RGB(A) -> lossless PNG (16-bit when the source has more than 8 bits)."""
    if pixels.shape[2] == 4:
        pixels = pixels[:, :, :3]
    dtype, peak = (np.uint16, 65535.0) if bits > 8 else (np.uint8, 255.0)
    arr = np.rint(np.clip(pixels, 0, 1) * peak).astype(dtype)
    if arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    else:
        arr = arr[:, :, 0]
    ok, enc = cv2.imencode(".png", arr)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return enc.tobytes()


class DecodeArchiveFiles:
    """Ray Data stage: ``{"key"}`` rows -> decoded rows (see module doc) with ``ok``/``error`` columns.

    In paired mode (``partners``: ground-truth key -> low-resolution key) each row also gets ``lq_image``
    and ``pair_scale`` (GT size / LQ size, the same integer on both axes or the row is an error).
    """

    def __init__(self, storage: Storage, input_prefix: str, partners: dict[str, str] | None = None):
        self.storage, self.prefix, self.partners = storage, input_prefix.rstrip("/"), partners

    def __call__(self, batch: dict) -> dict:
        from medsr_dist.io.image import decode_image

        out: dict[str, list] = {k: [] for k in (
            "key", "rel_key", "ok", "error", "patient_id", "image", "height", "width", "channels", "bits", "format", "meta")}
        for key in batch["key"]:
            key = str(key)
            rel = key[len(self.prefix):].lstrip("/")
            row = dict(key=key, rel_key=rel, ok=False, error="", patient_id="", image=b"", height=0, width=0,
                       channels=0, bits=0, format="", meta="")
            if self.partners is not None:
                row.update(lq_image=b"", pair_scale=0)
            try:
                img = decode_image(self.storage.read_bytes(key), key)
                row.update(
                    ok=True, patient_id=img.meta.patient_id or "", image=to_training_png(img.pixels, img.meta.bits_stored),
                    height=img.pixels.shape[0], width=img.pixels.shape[1], channels=img.meta.channels,
                    bits=img.meta.bits_stored, format=img.meta.format, meta=img.meta.to_json(),
                )
                if self.partners is not None:
                    row.update(self._partner(key, img.pixels.shape[:2]))
            except Exception as exc:  # noqa: BLE001 - every failure becomes an error row naming the file
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            for k, v in row.items():
                out.setdefault(k, []).append(v)
        return out

    def _partner(self, key: str, gt_hw: tuple[int, int]) -> dict:
        from medsr_dist.io.image import decode_image

        lq_key = self.partners.get(key)
        if lq_key is None:
            raise FileNotFoundError("paired mode: no low-resolution image with the same relative path and stem")
        lq = decode_image(self.storage.read_bytes(lq_key), lq_key)
        h, w = lq.pixels.shape[:2]
        if gt_hw[0] % h or gt_hw[1] % w or gt_hw[0] // h != gt_hw[1] // w:
            raise ValueError(f"paired mode: {lq_key} is {h}x{w}, not an integer fraction of the ground truth {gt_hw[0]}x{gt_hw[1]}")
        return {"lq_image": to_training_png(lq.pixels, lq.meta.bits_stored), "pair_scale": gt_hw[0] // h}


def _stem_key(rel: str) -> str:
    head, _, name = rel.rpartition("/")
    return f"{head}/{name.split('.')[0]}" if head else name.split(".")[0]


def match_partners(storage: Storage, gt_keys: list[str], gt_prefix: str, lq_prefix: str) -> dict[str, str]:
    """Ground-truth key -> low-resolution key with the same relative folder and file stem (any extension)."""
    lq_by_stem = {_stem_key(k[len(lq_prefix.rstrip("/")):].lstrip("/")): k for k in storage.list_files(lq_prefix)}
    partners = {}
    for key in gt_keys:
        lq = lq_by_stem.get(_stem_key(key[len(gt_prefix.rstrip("/")):].lstrip("/")))
        if lq is not None:
            partners[key] = lq
    return partners


def multiscale_copies(img: np.ndarray, cfg: MultiscaleConfig) -> list[tuple[str, np.ndarray]]:
    """Real-ESRGAN's generate_multiscale_DF2K on one image: Lanczos copies at each scale and with the shorter
    side = ``shortest_edge`` (suffixes ``#s0.75`` … ``#e400``). The original is not included."""
    h, w = img.shape[:2]
    out = []
    for scale in cfg.scales:
        size = (max(1, int(w * scale)), max(1, int(h * scale)))
        out.append((f"#s{scale:.3g}", cv2.resize(img, size, interpolation=cv2.INTER_LANCZOS4)))
    if cfg.shortest_edge:
        e = cfg.shortest_edge
        size = (e, int(e * h / w)) if w < h else (int(e * w / h), e)
        out.append((f"#e{e}", cv2.resize(img, size, interpolation=cv2.INTER_LANCZOS4)))
    return out


def subimage_crops(img: np.ndarray, cfg: SubimageConfig) -> list[tuple[str, np.ndarray]]:
    """Real-ESRGAN's extract_subimages on one image (suffix ``#c<top>_<left>``); an image smaller than the
    crop is kept whole."""
    h, w = img.shape[:2]
    c = cfg.crop_size
    if h < c or w < c:
        return [("", img)]

    def starts(length: int) -> list[int]:
        space = list(range(0, length - c + 1, cfg.step))
        if length - (space[-1] + c) > cfg.thresh_size:
            space.append(length - c)
        return space

    return [(f"#c{top}_{left}", np.ascontiguousarray(img[top:top + c, left:left + c]))
            for top in starts(h) for left in starts(w)]


class ExpandTrainImages:
    """Ray Data stage for the train split: original + multi-scale copies, then optional sub-image crops.
    Every derived row keeps the source's patient, so no patient crosses splits."""

    def __init__(self, multiscale: MultiscaleConfig, subimages: SubimageConfig):
        self.multiscale, self.subimages = multiscale, subimages

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {}
        n = len(batch["key"])
        for i in range(n):
            raw = cv2.imdecode(np.frombuffer(batch["image"][i], np.uint8), cv2.IMREAD_UNCHANGED)
            variants = [("", raw)]
            if self.multiscale.enabled:
                variants += multiscale_copies(raw, self.multiscale)
            if self.subimages.enabled:
                variants = [(a + b, crop) for a, img in variants for b, crop in subimage_crops(img, self.subimages)]
            for suffix, img in variants:
                for col in batch:
                    value = batch[col][i]
                    if col == "key":
                        value = f"{value}{suffix}"
                    elif col == "image" and suffix:
                        value = cv2.imencode(".png", img)[1].tobytes()
                    elif col == "height":
                        value = img.shape[0]
                    elif col == "width":
                        value = img.shape[1]
                    out.setdefault(col, []).append(value)
        return out


def patient_of(rel_key: str, dicom_patient: str, split: SplitConfig) -> str:
    """The grouping key of an image: DICOM PatientID when present (group_by=patient_id), else the filename pattern."""
    if split.group_by == "patient_id" and dicom_patient:
        return dicom_patient
    name = rel_key.rsplit("/", 1)[-1]
    match = re.search(split.filename_pattern, name)
    if match and match.groupdict().get("patient"):
        return match.group("patient")
    return name  # no pattern match: the file is its own group


def assign_splits(patients: list[str], split: SplitConfig, seed: int) -> dict[str, str]:
    """Patient -> split. Patients are ordered by a seeded hash and cut by the fractions; every split with a
    non-zero fraction gets at least one patient when there are enough patients. Deterministic."""
    unique = sorted(set(patients), key=lambda p: hashlib.sha256(f"{seed}|{p}".encode()).hexdigest())
    fractions = {"train": split.train, "val": split.val, "test": split.test}
    wanted = [s for s in SPLITS if fractions[s] > 0]
    n = len(unique)
    counts = {s: int(round(fractions[s] * n)) for s in SPLITS}
    if n >= len(wanted):
        for s in wanted:  # at least one patient per requested split
            if counts[s] == 0:
                counts[s] = 1
    # make counts add up to n, adjusting the largest split
    largest = max(SPLITS, key=lambda s: fractions[s])
    counts[largest] += n - sum(counts.values())
    mapping, start = {}, 0
    for s in SPLITS:
        for p in unique[start:start + counts[s]]:
            mapping[p] = s
        start += counts[s]
    return mapping


@dataclass
class PrepareResult:
    output: str
    counts: dict[str, int]
    patients: dict[str, int]
    errors: list[dict] = field(default_factory=list)

    @property
    def n_errors(self) -> int:
        return len(self.errors)


def prepare_dataset(cfg: MedsrConfig, storage: Storage | None = None, overwrite: bool = True) -> PrepareResult:
    """Run the prepare stage (Ray must be initialised). Returns the per-split counts and the error rows."""
    import ray

    storage = storage or Storage(cfg.storage)
    p = cfg.prepare
    keys = storage.list_files(p.input, include=p.include, exclude=p.exclude)
    if not keys:
        raise FileNotFoundError(f"prepare.input: no files under {p.input} match include={p.include} exclude={p.exclude}")
    log.info("prepare: %d files under %s", len(keys), p.input)
    partners = match_partners(storage, keys, p.input, p.paired_lq) if p.paired_lq else None
    ds = ray.data.from_items([{"key": k} for k in keys], override_num_blocks=min(len(keys), 64))
    decoded = ds.map_batches(DecodeArchiveFiles, fn_constructor_args=(storage, p.input, partners), batch_size=4,
                             compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.available_resources().get("CPU", 1)))))
    decoded = decoded.materialize()
    index = decoded.select_columns(["key", "rel_key", "ok", "error", "patient_id"]).take_all()
    errors = [{"key": r["key"], "error": r["error"]} for r in index if not r["ok"]]
    ok_rows = [r for r in index if r["ok"]]
    groups = {r["key"]: patient_of(r["rel_key"], r["patient_id"], p.split) for r in ok_rows}
    mapping = assign_splits(list(groups.values()), p.split, cfg.run.seed)
    split_of_key = {k: mapping[g] for k, g in groups.items()}

    pafs, out_path = storage.pyarrow_fs(p.output)
    counts, patients = {}, {}
    for split in SPLITS:
        keys_in = {k for k, s in split_of_key.items() if s == split}
        counts[split] = len(keys_in)
        patients[split] = len({groups[k] for k in keys_in})
        if not keys_in:
            continue
        part = decoded.filter(lambda row, _keys=frozenset(keys_in): row["ok"] and row["key"] in _keys)
        part = part.map_batches(_with_group(groups), batch_format="pyarrow").drop_columns(["ok", "error"])
        if split == "train" and not p.paired_lq and (p.multiscale.enabled or p.subimages.enabled):
            part = part.map_batches(ExpandTrainImages, fn_constructor_args=(p.multiscale, p.subimages), batch_size=1,
                                    compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2))
        part.write_parquet(f"{out_path.rstrip('/')}/{split}", filesystem=pafs, min_rows_per_file=p.rows_per_shard,
                           mode="overwrite" if overwrite else "error")
    _write_table(storage, storage.join(p.output, "errors.parquet"), errors, {"key": pa.string(), "error": pa.string()})
    summary = {"input": p.input, "files": len(keys), "counts": counts, "patients": patients, "errors": len(errors),
               "split": p.split.model_dump(), "multiscale": p.multiscale.model_dump(), "subimages": p.subimages.model_dump(),
               "paired_lq": p.paired_lq}
    storage.write_bytes(storage.join(p.output, "summary.json"), json.dumps(summary, indent=2).encode())
    return PrepareResult(output=p.output, counts=counts, patients=patients, errors=errors)


def _with_group(groups: dict[str, str]):
    def add(table: pa.Table) -> pa.Table:
        keys = table.column("key").to_pylist()
        return table.set_column(table.schema.get_field_index("patient_id"), "patient_id", pa.array([groups[k] for k in keys], pa.string()))
    return add


def _write_table(storage: Storage, uri: str, rows: list[dict], schema: dict) -> None:
    table = pa.Table.from_pylist(rows, schema=pa.schema(list(schema.items())))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())
