"""Dataset preparation pieces: patient grouping and split, multi-scale copies, sub-images, pairing."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from medsr_dist.config import MultiscaleConfig, SplitConfig, SubimageConfig
from medsr_dist.data.degrade import PairedCrop
from medsr_dist.config import DegradationConfig
from medsr_dist.data.prepare import (
    ExpandTrainImages,
    assign_splits,
    match_partners,
    multiscale_copies,
    patient_of,
    subimage_crops,
    to_training_png,
)
from medsr_dist.storage import Storage


def test_patient_from_dicom_id_or_nih_filename():
    split = SplitConfig()
    assert patient_of("sub/00000003_001.png", "", split) == "00000003"
    assert patient_of("x.dcm", "PAT-7", split) == "PAT-7"
    assert patient_of("x.dcm", "PAT-7", SplitConfig(group_by="filename")) == "x.dcm"
    assert patient_of("nounderscore.png", "", split) == "nounderscore.png"  # its own group


def test_split_is_deterministic_complete_and_respects_fractions():
    patients = [f"p{i}" for i in range(100)]
    mapping = assign_splits(patients, SplitConfig(), seed=0)
    assert set(mapping) == set(patients)
    counts = {s: sum(v == s for v in mapping.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 70, "val": 20, "test": 10}
    assert assign_splits(list(reversed(patients)), SplitConfig(), seed=0) == mapping
    assert assign_splits(patients, SplitConfig(), seed=1) != mapping


def test_small_archives_still_get_every_requested_split():
    mapping = assign_splits(["a", "b", "c"], SplitConfig(), seed=0)
    assert sorted(mapping.values()) == ["test", "train", "val"]
    assert set(assign_splits(["a", "b"], SplitConfig(train=1.0, val=0.0, test=0.0), 0).values()) == {"train"}


def test_multiscale_copies_follow_real_esrgan():
    img = np.zeros((300, 200), np.uint16)
    copies = dict(multiscale_copies(img, MultiscaleConfig(enabled=True)))
    assert copies["#s0.75"].shape == (225, 150)
    assert copies["#s0.5"].shape == (150, 100)
    assert copies["#s0.333"].shape == (100, 66)
    assert copies["#e400"].shape == (600, 400)  # shorter side (width 200) -> 400
    assert all(c.dtype == np.uint16 for c in copies.values())


def test_subimages_cover_the_image_like_extract_subimages():
    img = np.arange(500 * 700, dtype=np.int32).reshape(500, 700).astype(np.float32)
    crops = dict(subimage_crops(img, SubimageConfig(enabled=True, crop_size=400, step=200, thresh_size=0)))
    # rows: 0 and the flush 100; columns: 0, 200 and the flush 300
    assert sorted(crops) == sorted(f"#c{t}_{l}" for t in (0, 100) for l in (0, 200, 300))
    np.testing.assert_array_equal(crops["#c100_300"], img[100:500, 300:700])
    assert dict(subimage_crops(img[:100, :100], SubimageConfig(crop_size=400)))[""].shape == (100, 100)


def test_expand_keeps_patient_and_multiplies_images_by_five():
    png = to_training_png(np.random.default_rng(0).random((64, 48, 1), dtype=np.float32), 16)
    batch = {"key": ["p1_000.png"], "patient_id": ["p1"], "image": [png], "height": [64], "width": [48]}
    out = ExpandTrainImages(MultiscaleConfig(enabled=True, shortest_edge=32), SubimageConfig())(batch)
    assert len(out["key"]) == 5 and set(out["patient_id"]) == {"p1"}
    assert out["key"][0] == "p1_000.png" and out["image"][0] == png
    shapes = {(h, w) for h, w in zip(out["height"], out["width"])}
    assert (42, 32) in shapes  # shortest edge 32: 48 -> 32, 64 -> 42
    for data, h, w in zip(out["image"], out["height"], out["width"]):
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert decoded.shape[:2] == (h, w) and decoded.dtype == np.uint16


def test_paired_mode_matches_stems_and_crops_aligned(tmp_path):
    storage = Storage()
    for rel in ("a/x1.png", "a/x2.png", "y.png"):
        storage.write_bytes(str(tmp_path / "hr" / rel), b"hr")
    for rel in ("a/x1.tif", "y.png"):
        storage.write_bytes(str(tmp_path / "lr" / rel), b"lr")
    gt_keys = storage.list_files(str(tmp_path / "hr"))
    partners = match_partners(storage, gt_keys, str(tmp_path / "hr"), str(tmp_path / "lr"))
    assert {k.rsplit("/", 1)[-1]: v.rsplit("/", 1)[-1] for k, v in partners.items()} == {"x1.png": "x1.tif", "y.png": "y.png"}

    hr = np.random.default_rng(1).random((64, 64, 1), dtype=np.float32)
    lr = cv2.resize(hr[:, :, 0], (16, 16), interpolation=cv2.INTER_AREA)[:, :, None]
    crop = PairedCrop(DegradationConfig(gt_size=32, use_hflip=False), scale=4, run_seed=0)
    out = crop.crop_one(to_training_png(hr, 16), to_training_png(lr, 16), "k", 0)
    assert out["gt"].shape == (32, 32, 3) and out["lq"].shape == (8, 8, 3)
    # aligned: the LQ crop is the area-downsampled GT crop
    down = cv2.resize(out["gt"], (8, 8), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(down, out["lq"], atol=2e-3)
    with pytest.raises(ValueError, match="not x2"):
        PairedCrop(DegradationConfig(gt_size=32), scale=2, run_seed=0).crop_one(to_training_png(hr, 16), to_training_png(lr, 16), "k", 0)


@pytest.mark.slow
def test_prepare_bounds_inputs_before_decoding_and_keeps_no_path_uid_or_free_text(tmp_path, monkeypatch):
    """A real Ray run of prepare_dataset: good files beside an oversized file and a pixel bomb (skipped, counted by
    reason), keys holding a name and an MRN, a DICOM with UIDs and a SeriesDescription naming the patient."""
    import io
    import json
    import os

    import pydicom
    import pyarrow.parquet as pq
    import ray
    from pydicom.data import get_testdata_file

    from medsr_dist.config import load_config
    from medsr_dist.data import hostile
    from medsr_dist.data.prepare import GROUP_SECRET_ENV, GroupSecretError, key_pseudonym, prepare_dataset
    from medsr_dist.data.synthetic import make_radiograph
    from medsr_dist.io.image import encode_image
    from medsr_dist.io.medical_image import ImageMeta

    archive, secret = tmp_path / "archive", "a site secret for this test only"
    folder = archive / "DOE^JANE_MRN12345678"  # paths often hold names or MRNs
    folder.mkdir(parents=True)
    meta = ImageMeta(format="png", dtype="uint8", bits_stored=8, channels=1, photometric="MONOCHROME2")
    for i in range(4):
        (folder / f"scan{i}.png").write_bytes(encode_image(make_radiograph(i, 48)[:, :, None], meta))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SeriesDescription = "CHEST DOE JANE FOLLOW-UP"
    buf = io.BytesIO()
    ds.save_as(buf)
    (folder / "ct.dcm").write_bytes(buf.getvalue())
    uids = [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]
    (folder / "bomb.png").write_bytes(encode_image(make_radiograph(9, 320)[:, :, None], meta))  # 102,400 pixels
    (folder / "huge.png").write_bytes(b"\x89PNG" + os.urandom(700_000))  # over max_input_bytes: never read
    # issue #24's crafted files (at sizes the limits above let through to the parsers): each one error row,
    # within the test's timeout; the PNG text bomb and the malformed DS/IS decode (text dropped, values ignored)
    crafted = {"loop.tif": hostile.tiff_ifd_loop(), "j2k.dcm": hostile.dicom_j2k_lie(3000),
               "jpeg.dcm": hostile.dicom_jpeg_lie(3000), "jls.dcm": hostile.dicom_jpeg_ls_lie(3000),
               "rle.dcm": hostile.dicom_rle_lie(), "strip.tif": hostile.tiff_jpeg_strip_lie(3000),
               "deflate.dcm": hostile.dicom_deflate_bomb(64 * 1024), "flood.dcm": hostile.dicom_sequence_flood(60_000)}
    honest_crafted = {"text.png": hostile.png_text_bomb(4 << 20), "numbers.dcm": hostile.dicom_malformed_numbers()}
    for name, data in {**crafted, **honest_crafted}.items():
        (archive / name).write_bytes(data)
    cfg = load_config(None, [f"run.root={tmp_path}", f"prepare.input={archive}", f"prepare.output={tmp_path / 'ds'}",
                             "prepare.max_input_pixels=100000", "prepare.max_input_bytes=600000",
                             "prepare.split={train: 0.5, val: 0.25, test: 0.25}"])
    monkeypatch.delenv(GROUP_SECRET_ENV, raising=False)
    with pytest.raises(GroupSecretError, match=GROUP_SECRET_ENV):  # refused before anything is read
        prepare_dataset(cfg)
    monkeypatch.setenv(GROUP_SECRET_ENV, secret)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = prepare_dataset(cfg)
    finally:
        ray.shutdown()
    out = tmp_path / "ds"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == {"max_input_bytes": 1, "max_input_pixels": 1, "undecodable": len(crafted)}
    assert sum(result.counts.values()) == 5 + len(honest_crafted) and len(result.errors) == 2 + len(crafted)
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    by_name = {Path(r["key"]).name: r for r in index}
    assert {n for n, r in by_name.items() if r["error"]} == {"bomb.png", "huge.png", *crafted}
    assert by_name["bomb.png"]["error"] == ("320 x 320 = 102,400 pixels exceeds prepare.max_input_pixels 100,000; "
                                            "not decoded")
    assert by_name["huge.png"]["error"] == "700,004 bytes exceeds prepare.max_input_bytes 600,000; not read"
    assert all(r["item"] == key_pseudonym(str(Path(r["key"]).relative_to(archive)), secret.encode()) for r in index)
    assert oct((out / "index.jsonl").stat().st_mode & 0o777) == oct(0o640)
    # nothing the dataset side holds names the path, the patient, a UID or the free text
    # (not "CHEST": BodyPartExamined is a defined term, kept; the free-text SeriesDescription is dropped)
    leaks = ["DOE", "JANE", "12345678", "scan", ".png", ".dcm", "FOLLOW-UP", *uids, str(ds.PatientName), str(ds.PatientID)]
    files = [p for p in out.rglob("*") if p.is_file() and p.name != "index.jsonl"]
    assert {p.name for p in files} >= {"summary.json", "errors.parquet"}
    for path in files:
        assert oct(path.stat().st_mode & 0o777) == oct(0o640), path
        text = path.read_bytes().decode("latin-1")
        if path.suffix == ".parquet":
            text += json.dumps([{k: v for k, v in r.items() if k not in ("image", "lq_image")}
                                for r in pq.read_table(path).to_pylist()], default=str)
        assert [s for s in leaks if s in text] == [], path
    rows = [r for split in ("train", "val", "test") if (out / split).exists() for r in pq.read_table(out / split).to_pylist()]
    assert sorted(r["key"] for r in rows) == sorted(r["item"] for r in index if not r["error"])
    [ct] = [json.loads(r["meta"]) for r in rows if r["key"] == by_name["ct.dcm"]["item"]]
    assert "series_description" not in ct["dicom"] and ct["dicom"]["study_instance_uid"].startswith("uid-")
    assert ct["dicom"]["sop_class_uid"] == str(ds.SOPClassUID)  # a standard UID, kept
    assert {r["group"][:4] for r in rows} <= {"pid-", "grp-"}


def test_a_decode_past_prepare_decode_memory_bytes_is_one_decode_killed_row_beside_good_files(tmp_path):
    """The last line of defence in prepare's decode stage (called directly, no Ray): an honest 1024 x 1024 16-bit
    PNG under a 4 MiB decode cap is stopped in its child process — one ``decode_killed`` error row naming the cap —
    while a small file beside it decodes; under a sufficient cap, and in-process (0), the big one decodes the same."""
    from medsr_dist.data.prepare import DecodeArchiveFiles, key_pseudonym

    archive = tmp_path / "archive"
    archive.mkdir()
    big = (np.arange(1024 * 1024, dtype=np.uint32).reshape(1024, 1024) * 2654435761 % 65536).astype(np.uint16)
    (archive / "big.png").write_bytes(cv2.imencode(".png", big)[1].tobytes())
    (archive / "small.png").write_bytes(cv2.imencode(".png", big[:32, :32])[1].tobytes())
    keys = [str(archive / "big.png"), str(archive / "small.png")]
    secret = b"a site secret for this test only"

    def run(memory_bytes: int, seconds: float) -> dict:
        stage = DecodeArchiveFiles(Storage(), str(archive), secret=secret, decode_memory_bytes=memory_bytes,
                                   decode_timeout_s=seconds)
        out = stage({"key": keys})
        return {Path(k).name: {c: v[i] for c, v in out.items()} for i, k in enumerate(out["key"])}

    capped = run(4 << 20, 60.0)
    assert capped["big.png"]["ok"] is False and capped["big.png"]["reason"] == "decode_killed"
    assert "more than 4,194,304 bytes; stopped" in capped["big.png"]["error"]
    assert "big" not in capped["big.png"]["error"] and capped["big.png"]["item"] == key_pseudonym("big.png", secret)
    assert capped["small.png"]["ok"] is True and (capped["small.png"]["height"], capped["small.png"]["width"]) == (32, 32)
    roomy, in_process = run(2 << 30, 60.0), run(0, 0.0)
    assert roomy["big.png"]["ok"] is True and roomy["big.png"]["image"] == in_process["big.png"]["image"]
    assert roomy["small.png"]["image"] == capped["small.png"]["image"] == in_process["small.png"]["image"]
