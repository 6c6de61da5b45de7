"""`medsr prepare`: an image archive on the store -> a sharded Parquet dataset with a patient-level split.

Flow (Ray Data): list the archive -> read + decode each file in parallel tasks (unreadable files
become error rows, never exceptions) -> patient-level train/val/test assignment on the driver from
the small index -> one Parquet folder per split under ``prepare.output``.

Row schema of the dataset (``<output>/<split>/*.parquet``):
``key`` (the source's pseudonym ``img-<32 hex>``, with a ``#...`` suffix on derived train rows), ``rel_key`` (the
source's pseudonym), ``group`` (the patient group: a pseudonym, see below), ``image``
(lossless PNG bytes, 8- or 16-bit, gray or RGB, display orientation, with a PNG ``sBIT`` chunk giving the
source's significant bits), ``height``, ``width``, ``channels``, ``bits``, ``format``, ``meta`` (ImageMeta
JSON of the source without its patient ID and free text, its Study/Series/SOP Instance UIDs pseudonymised:
:func:`scrub_meta`). Rows are written in a seeded global shuffle order (:func:`shuffle_rank`), so a shard holds rows
of many images, not the sub-images of one.

No raw path, UID or free text reaches the dataset: keys often hold names or MRNs, so rows are named by
``img-`` + HMAC-SHA256(site secret, relative key) (:func:`key_pseudonym`); ``<output>/index.jsonl`` maps each
pseudonym back to its key (and split, or error), written 0640: it sits beside the archive's data and is under
the archive's access control, not the dataset's. ``errors.parquet`` and ``summary.json`` name files by pseudonym.

Bounded before decoding: a file over ``prepare.max_input_bytes`` (from the listing) is not read, one whose header
says more than ``prepare.max_input_pixels`` (height x width x frames, ``probe_image``) is not decoded; both are
error rows, counted by reason in ``summary.json`` (``skipped``). The decode itself runs in a child process under
``prepare.decode_memory_bytes`` / ``prepare.decode_timeout_s`` (:func:`~medsr_dist.io.bounded.decode_image_capped`):
a decode stopped there is a ``decode_killed`` error row, never a failed preparation.

Patient identifiers never reach the dataset, its error file or the logs. Images are grouped by DICOM
PatientID (``split.group_by: patient_id``) through a pseudonym, ``pid-`` + HMAC-SHA256(site secret,
PatientID) (first 32 hex digits), computed in the decoding task so the PatientID never leaves it. The site
secret comes from ``prepare.group_secret_file`` or the ``MEDSR_GROUP_SECRET`` environment variable; the
same secret gives the same pseudonyms and hence the same split on every run. Preparing an archive whose DICOM
files carry PatientIDs without a secret is refused (:class:`GroupSecretError`): a random secret would make
the split irreproducible, and the raw ID must not be stored. Groups from the file-name pattern decide the split
as matched and are written as ``grp-`` pseudonyms (they are part of the key). The secret is required whatever the
archive holds, since keys are pseudonymised too; without one prepare refuses before reading anything.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass, field

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medsr_dist.config import MedsrConfig, MultiscaleConfig, PrepareConfig, SplitConfig, SubimageConfig
from medsr_dist.io.bounded import DecodeKilled, decode_image_capped
from medsr_dist.io.image import ImageDecodeError, NotAnImageObject, probe_image, single_frame_pixels
from medsr_dist.io.phi import phi_values, sanitize_reason
from medsr_dist.storage import FILE_MODE, Storage
from medsr_dist.uris import LOCAL, split_uri

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
GROUP_SECRET_ENV = "MEDSR_GROUP_SECRET"
#: The secret of synthetic sample archives (demo, benchmarks): published, so it protects nothing.
DEMO_GROUP_SECRET = "medsr-dist demo secret: synthetic patients only, not for real archives"
_MIN_SECRET_BYTES = 16
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Beside the dataset: one JSON line per listed file, pseudonym -> key (the only place keys are kept).
INDEX_FILE = "index.jsonl"


class GroupSecretError(ValueError):
    """No usable site secret for pseudonymising PatientIDs; the message says how to provide one."""


def read_group_secret(p: PrepareConfig, storage: Storage | None = None) -> bytes | None:
    """The site secret: the contents of ``prepare.group_secret_file`` (surrounding whitespace stripped), else
    the ``MEDSR_GROUP_SECRET`` environment variable, else None.

    Raises:
        GroupSecretError: the file is missing or the secret is shorter than 16 bytes.
    """
    if p.group_secret_file:
        storage = storage or Storage()
        if not storage.exists(p.group_secret_file):
            raise GroupSecretError(f"prepare.group_secret_file: {p.group_secret_file} does not exist")
        secret, where = storage.read_bytes(p.group_secret_file).strip(), f"prepare.group_secret_file ({p.group_secret_file})"
    elif os.environ.get(GROUP_SECRET_ENV):
        secret, where = os.environ[GROUP_SECRET_ENV].strip().encode(), f"the {GROUP_SECRET_ENV} environment variable"
    else:
        return None
    if len(secret) < _MIN_SECRET_BYTES:
        raise GroupSecretError(f"{where}: the group secret must be at least {_MIN_SECRET_BYTES} bytes, got {len(secret)}")
    return secret


def use_demo_group_secret() -> bool:
    """For synthetic sample archives only: set ``MEDSR_GROUP_SECRET`` to :data:`DEMO_GROUP_SECRET` unless a
    secret is set already. Returns whether it did."""
    if os.environ.get(GROUP_SECRET_ENV):
        return False
    os.environ[GROUP_SECRET_ENV] = DEMO_GROUP_SECRET
    return True


def patient_pseudonym(patient_id: str, secret: bytes) -> str:
    """``pid-`` + the first 32 hex digits of HMAC-SHA256(secret, PatientID): stable per site, not reversible
    without the secret."""
    return "pid-" + hmac.new(secret, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def key_pseudonym(rel_key: str, secret: bytes) -> str:
    """How the prepared dataset names a source file: ``img-`` + 32 hex digits of HMAC-SHA256(secret, relative
    key); ``<output>/index.jsonl`` maps it back."""
    return "img-" + hmac.new(secret, b"key\0" + rel_key.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def group_pseudonym(group: str, secret: bytes) -> str:
    """How the dataset writes a group taken from a file name (part of the key): ``grp-`` + 32 hex digits of
    HMAC-SHA256(secret, group); PatientID groups are :func:`patient_pseudonym` already."""
    return group if group.startswith("pid-") else (
        "grp-" + hmac.new(secret, b"group\0" + group.encode("utf-8"), hashlib.sha256).hexdigest()[:32])


#: DICOM summary entries (medsr_dist.io.dicom) that identify a study, series or instance: pseudonymised.
INSTANCE_UIDS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid")
#: DICOM summary entries of free text (may name the patient, the site, a finding): dropped.
FREE_TEXT = ("series_description", "window_explanation")


def scrub_meta(meta, secret: bytes):
    """``meta`` (ImageMeta) fit for the dataset: no PatientID, no file text chunks, the DICOM summary without free
    text and with its instance UIDs as ``uid-`` + HMAC-SHA256(secret, UID) (the same UID, the same pseudonym, so
    rows of one series still group together). SOP class and transfer syntax UIDs are standard, kept."""
    dicom = meta.dicom
    if dicom is not None:
        dicom = {k: v for k, v in dicom.items() if k not in FREE_TEXT}
        for k in INSTANCE_UIDS:
            if dicom.get(k):
                dicom[k] = "uid-" + hmac.new(secret, b"uid\0" + str(dicom[k]).encode(), hashlib.sha256).hexdigest()[:32]
    return dataclasses.replace(meta, patient_id=None, text={}, dicom=dicom)


class InputLimitError(ImageDecodeError):
    """An input over ``prepare.max_input_bytes`` / ``max_input_pixels``: skipped unread or undecoded."""

    def __init__(self, name: str, reason: str, limit: str):
        super().__init__(name, reason)
        self.limit = limit

    def __reduce__(self):
        return type(self), (self.name, self.reason, self.limit)


def skip_class(exc: BaseException) -> str:
    """The class of a skipped file, counted in ``summary.json``: the limit it exceeded, ``decode_killed`` (its
    decode ran past ``decode_memory_bytes`` / ``decode_timeout_s`` or crashed), ``not_an_image``, ``undecodable``
    or ``unreadable``."""
    if isinstance(exc, InputLimitError):
        return exc.limit
    if isinstance(exc, DecodeKilled):
        return "decode_killed"
    if isinstance(exc, NotAnImageObject):
        return "not_an_image"
    if isinstance(exc, ImageDecodeError):
        return "undecodable"
    return "unreadable"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def with_significant_bits(png: bytes, bits: int) -> bytes:
    """``png`` with an ``sBIT`` chunk saying ``bits`` significant bits per channel (inserted after IHDR).

    Raises:
        ValueError: not a gray or RGB PNG from OpenCV (IHDR first), or ``bits`` beyond the PNG's bit depth.
    """
    if not png.startswith(_PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("not a PNG with IHDR first")
    depth, colour = png[24], png[25]
    channels = {0: 1, 2: 3}.get(colour)
    if channels is None or not 1 <= bits <= depth:
        raise ValueError(f"sBIT {bits} does not fit a PNG of colour type {colour} and depth {depth}")
    end = 8 + 8 + 13 + 4  # signature, IHDR length + type, IHDR data, CRC
    return png[:end] + _png_chunk(b"sBIT", bytes([bits] * channels)) + png[end:]


def significant_bits(png: bytes) -> int:
    """The significant bits of a prepared PNG: its ``sBIT`` chunk, else its bit depth (8 or 16).

    Raises:
        ValueError: not a PNG.
    """
    if not png.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG")
    depth, pos = png[24], 8
    while pos + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"sBIT":
            return min(depth, max(png[pos + 8:pos + 8 + length]))
        if kind in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    return depth


def to_training_png(pixels: np.ndarray, bits: int) -> bytes:
    """float32 (H, W, C) in [0, 1] RGB(A) -> lossless PNG (16-bit when the source has more than 8 bits) whose
    ``sBIT`` chunk records ``bits``, the source's significant bits."""
    if pixels.shape[2] == 4:
        pixels = pixels[:, :, :3]
    dtype, peak = (np.uint16, 65535.0) if bits > 8 else (np.uint8, 255.0)
    arr = np.rint(np.clip(pixels, 0, 1) * peak).astype(dtype)
    return encode_training_png(arr, bits, rgb=arr.shape[2] == 3)


def encode_training_png(arr: np.ndarray, bits: int, rgb: bool = False) -> bytes:
    """uint8/uint16 (H, W) or (H, W, 3) (BGR, or RGB with ``rgb``) -> PNG bytes with ``sBIT`` = ``bits``."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if rgb and arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, enc = cv2.imencode(".png", arr)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return with_significant_bits(enc.tobytes(), min(bits, 8 * arr.dtype.itemsize))


class DecodeArchiveFiles:
    """Ray Data stage: ``{"key"[, "size"]}`` rows -> decoded rows (see module doc) with ``ok``/``error``/``reason``
    columns, ``item`` (the key's pseudonym), plus ``unkeyed_patient`` (the file has a PatientID that could not be
    pseudonymised: no secret was given).

    Per file, before any decoding: the listing's size against ``max_bytes`` (not read when over), then the header
    (``probe_image``) against ``max_pixels`` (not decoded when over); the decode runs in a child under
    ``decode_memory_bytes`` / ``decode_timeout_s`` when both are > 0 (a stopped one: ``decode_killed``). ``group`` is the patient pseudonym when the
    file has a DICOM PatientID, ``group_by`` is ``patient_id`` and a ``secret`` is given; otherwise empty (the
    driver groups by file name). The PatientID itself is dropped here, as are the source's free text (PNG/TIFF
    text chunks, SeriesDescription) and its instance UIDs (:func:`scrub_meta`). Error texts name no key and no
    header identifier.

    In paired mode (``partners``: ground-truth key -> low-resolution key) each row also gets ``lq_image``
    and ``pair_scale`` (GT size / LQ size, the same integer on both axes or the row is an error).
    """

    def __init__(self, storage: Storage, input_prefix: str, partners: dict[str, str] | None = None,
                 secret: bytes | None = None, group_by: str = "patient_id", max_pixels: int = 100_000_000,
                 max_bytes: int = 1 << 30, decode_memory_bytes: int = 0, decode_timeout_s: float = 0.0):
        self.storage, self.prefix, self.partners = storage, input_prefix.rstrip("/"), partners
        self.secret, self.group_by = secret, group_by
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.decode_memory_bytes, self.decode_timeout_s = decode_memory_bytes, decode_timeout_s

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {k: [] for k in (
            "key", "rel_key", "item", "ok", "error", "reason", "group", "unkeyed_patient", "image", "height", "width",
            "channels", "bits", "format", "meta")}
        sizes = batch.get("size")
        for i, key in enumerate(batch["key"]):
            key = str(key)
            rel = key[len(self.prefix):].lstrip("/")
            row = dict(key=key, rel_key=rel, item=key_pseudonym(rel, self.secret or b""), ok=False, error="",
                       reason="", group="", unkeyed_patient=False, image=b"", height=0, width=0, channels=0, bits=0,
                       format="", meta="")
            if self.partners is not None:
                row.update(lq_image=b"", pair_scale=0)
            data = None
            try:
                data = self._read(key, -1 if sizes is None else int(sizes[i]))
                img = self._decode(data, key)
                single_frame_pixels(img, key, "training")
                patient = img.meta.patient_id or ""
                if patient and self.group_by == "patient_id":
                    if self.secret is None:
                        row["unkeyed_patient"] = True
                    else:
                        row["group"] = patient_pseudonym(patient, self.secret)
                meta = scrub_meta(img.meta, self.secret or b"")
                row.update(
                    ok=True, image=to_training_png(img.pixels, img.meta.bits_stored),
                    height=img.pixels.shape[0], width=img.pixels.shape[1], channels=img.meta.channels,
                    bits=img.meta.bits_stored, format=img.meta.format, meta=meta.to_json(),
                )
                del img, patient
                if self.partners is not None:
                    row.update(self._partner(key, (row["height"], row["width"])))
            except Exception as exc:  # noqa: BLE001 - every failure becomes an error row, without identifiers
                text = exc.reason if isinstance(exc, ImageDecodeError) else f"{type(exc).__name__}: {exc}"
                lq = (self.partners or {}).get(key, "")
                names = {rel, lq, lq.rsplit("/", 1)[-1]} - {""}
                row.update(ok=False, reason=skip_class(exc), error=sanitize_reason(
                    text, key=key, secrets=phi_values(data) | names))
            for k, v in row.items():
                out.setdefault(k, []).append(v)
        return out

    def _read(self, key: str, size: int = -1) -> bytes:
        """The file's bytes, refused unread over ``max_bytes`` (the listing's size) and undecoded over
        ``max_pixels`` (its header)."""
        if size > self.max_bytes:
            raise InputLimitError(key, f"{size:,} bytes exceeds prepare.max_input_bytes {self.max_bytes:,}; not read",
                                  "max_input_bytes")
        data = self.storage.read_bytes(key)
        if len(data) > self.max_bytes:  # grew since it was listed
            raise InputLimitError(key, f"{len(data):,} bytes exceeds prepare.max_input_bytes {self.max_bytes:,}",
                                  "max_input_bytes")
        probe = probe_image(data, key)
        if probe.pixels > self.max_pixels:
            frames = f" x {probe.frames} frames" if probe.frames > 1 else ""
            raise InputLimitError(key, f"{probe.height} x {probe.width}{frames} = {probe.pixels:,} pixels exceeds "
                                       f"prepare.max_input_pixels {self.max_pixels:,}; not decoded", "max_input_pixels")
        return data

    def _decode(self, data: bytes, key: str):
        """decode_image, in a child under ``decode_memory_bytes`` / ``decode_timeout_s`` when both are > 0."""
        return decode_image_capped(data, key, memory_bytes=self.decode_memory_bytes, seconds=self.decode_timeout_s)

    def _partner(self, key: str, gt_hw: tuple[int, int]) -> dict:
        lq_key = self.partners.get(key)
        if lq_key is None:
            raise FileNotFoundError("paired mode: no low-resolution image with the same relative path and stem")
        lq = self._decode(self._read(lq_key), lq_key)
        h, w = single_frame_pixels(lq, lq_key, "training").shape[:2]
        if gt_hw[0] % h or gt_hw[1] % w or gt_hw[0] // h != gt_hw[1] // w:
            raise ValueError(f"paired mode: the low-resolution image is {h}x{w}, not an integer fraction of the ground "
                             f"truth {gt_hw[0]}x{gt_hw[1]}")
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
            bits = int(batch["bits"][i]) if "bits" in batch else significant_bits(bytes(batch["image"][i]))
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
                        value = encode_training_png(img, bits)
                    elif col == "height":
                        value = img.shape[0]
                    elif col == "width":
                        value = img.shape[1]
                    out.setdefault(col, []).append(value)
        return out


def patient_of(rel_key: str, pseudonym: str, split: SplitConfig) -> str:
    """The grouping key of an image: the pseudonym of its DICOM PatientID when there is one (group_by=patient_id;
    see :class:`DecodeArchiveFiles`), else the filename pattern's ``patient`` group, else the file name."""
    if split.group_by == "patient_id" and pseudonym:
        return pseudonym
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


def shuffle_rank(seed: int, key: str) -> int:
    """The position of a row in the written dataset: a seeded hash of its key (a global shuffle that does not
    depend on the order in which Ray produced the rows, so the same archive and seed give the same shards)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}|{key}".encode(), digest_size=8).digest(), "little") >> 1


def prepare_dataset(cfg: MedsrConfig, storage: Storage | None = None, overwrite: bool = True) -> PrepareResult:
    """Run the prepare stage (Ray must be initialised). Returns the per-split counts and the error rows (keys as
    pseudonyms; ``<output>/index.jsonl`` maps them back).

    Raises:
        FileNotFoundError: no input files.
        GroupSecretError: no site secret is configured (checked before anything is read), or it is unusable.
    """
    import ray

    storage = storage or Storage(cfg.storage)
    p = cfg.prepare
    secret = read_group_secret(p, storage)
    if secret is None:
        raise GroupSecretError(
            f"prepare: no site secret is configured to pseudonymise the dataset's keys, UIDs and DICOM PatientIDs: set "
            f"the {GROUP_SECRET_ENV} environment variable or prepare.group_secret_file (at least {_MIN_SECRET_BYTES} "
            f"bytes; keep the same secret to keep the same split). Nothing was read or written")
    entries = storage.list_entries(p.input, include=p.include, exclude=p.exclude)
    if not entries:
        raise FileNotFoundError(f"prepare.input: no files under {p.input} match include={p.include} exclude={p.exclude}")
    keys = [e.uri for e in entries]
    log.info("prepare: %d files under %s", len(keys), p.input)
    partners = match_partners(storage, keys, p.input, p.paired_lq) if p.paired_lq else None
    ds = ray.data.from_items([{"key": e.uri, "size": e.size} for e in entries], override_num_blocks=min(len(keys), 64))
    decoded = ds.map_batches(DecodeArchiveFiles, fn_constructor_args=(storage, p.input, partners, secret, p.split.group_by,
                                                                     p.max_input_pixels, p.max_input_bytes,
                                                                     p.decode_memory_bytes, p.decode_timeout_s),
                             batch_size=4,
                             compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.available_resources().get("CPU", 1)))))
    decoded = decoded.materialize()
    index = decoded.select_columns(["key", "rel_key", "item", "ok", "error", "reason", "group"]).take_all()
    errors = [{"key": r["item"], "error": r["error"]} for r in index if not r["ok"]]
    skipped: dict[str, int] = {}
    for r in index:
        if not r["ok"]:
            skipped[r["reason"]] = skipped.get(r["reason"], 0) + 1
    ok_rows = [r for r in index if r["ok"]]
    groups = {r["key"]: patient_of(r["rel_key"], r["group"], p.split) for r in ok_rows}
    mapping = assign_splits(list(groups.values()), p.split, cfg.run.seed)
    split_of_key = {k: mapping[g] for k, g in groups.items()}
    written_groups = {k: group_pseudonym(g, secret) for k, g in groups.items()}

    pafs, out_path = storage.pyarrow_fs(p.output)
    counts, patients = {}, {}
    for split in SPLITS:
        keys_in = {k for k, s in split_of_key.items() if s == split}
        counts[split] = len(keys_in)
        patients[split] = len({groups[k] for k in keys_in})
        if not keys_in:
            continue
        part = decoded.filter(lambda row, _keys=frozenset(keys_in): row["ok"] and row["key"] in _keys)
        part = part.map_batches(_pseudonymised(written_groups), batch_format="pyarrow").drop_columns(
            ["ok", "error", "reason", "unkeyed_patient", "item"])
        if split == "train" and not p.paired_lq and (p.multiscale.enabled or p.subimages.enabled):
            part = part.map_batches(ExpandTrainImages, fn_constructor_args=(p.multiscale, p.subimages), batch_size=1,
                                    compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2))
        # Sub-images of one image come out side by side; a seeded global order spreads them over the shards, so a
        # training batch (block order + a small local buffer) mixes many images and patients.
        part = part.map_batches(_with_rank(cfg.run.seed), batch_format="pyarrow").sort("_rank").drop_columns(["_rank"])
        part.write_parquet(f"{out_path.rstrip('/')}/{split}", filesystem=pafs, min_rows_per_file=p.rows_per_shard,
                           mode="overwrite" if overwrite else "error")
    _write_table(storage, storage.join(p.output, "errors.parquet"), errors, {"key": pa.string(), "error": pa.string()})
    trace = [{"item": r["item"], "key": r["key"], "split": split_of_key.get(r["key"], ""),
              "error": "" if r["ok"] else r["error"]} for r in sorted(index, key=lambda r: r["key"])]
    storage.write_bytes(storage.join(p.output, INDEX_FILE), "".join(json.dumps(t) + "\n" for t in trace).encode())
    summary = {"input": p.input, "files": len(keys), "counts": counts, "patients": patients, "errors": len(errors),
               "skipped": dict(sorted(skipped.items())),
               "limits": {"max_input_pixels": p.max_input_pixels, "max_input_bytes": p.max_input_bytes,
                          "decode_memory_bytes": p.decode_memory_bytes, "decode_timeout_s": p.decode_timeout_s},
               "index": f"{INDEX_FILE}: pseudonym -> source key, under the archive's access control",
               "split": p.split.model_dump(), "multiscale": p.multiscale.model_dump(), "subimages": p.subimages.model_dump(),
               "paired_lq": p.paired_lq,
               "images_grouped_by": {"patient_pseudonym": sum(1 for r in ok_rows if r["group"]),
                                     "file_name": sum(1 for r in ok_rows if not r["group"])},
               "row_order": f"seeded shuffle (run.seed {cfg.run.seed})"}
    storage.write_bytes(storage.join(p.output, "summary.json"), json.dumps(summary, indent=2).encode())
    _restrict_local(p.output)
    return PrepareResult(output=p.output, counts=counts, patients=patients, errors=errors)


def _pseudonymised(groups: dict[str, str]):
    """The rows as written: ``group`` the written group pseudonym, ``key`` and ``rel_key`` the key's pseudonym."""
    def rename(table: pa.Table) -> pa.Table:
        keys = table.column("key").to_pylist()
        table = table.set_column(table.schema.get_field_index("group"), "group",
                                 pa.array([groups[k] for k in keys], pa.string()))
        items = table.column("item")
        table = table.set_column(table.schema.get_field_index("key"), "key", items)
        return table.set_column(table.schema.get_field_index("rel_key"), "rel_key", items)
    return rename


def _restrict_local(output: str) -> None:
    """Mode 0640 on every file of a local dataset (Ray's writers create shards by the umask); object stores: the
    bucket policy."""
    backend, root = split_uri(output)
    if backend != LOCAL:
        return
    for folder, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(folder, name), FILE_MODE)


def _with_rank(seed: int):
    def add(table: pa.Table) -> pa.Table:
        ranks = [shuffle_rank(seed, k) for k in table.column("key").to_pylist()]
        return table.append_column("_rank", pa.array(ranks, pa.int64()))
    return add


def _write_table(storage: Storage, uri: str, rows: list[dict], schema: dict) -> None:
    table = pa.Table.from_pylist(rows, schema=pa.schema(list(schema.items())))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())
