"""Dataset preparation pieces: patient grouping and split, multi-scale copies, sub-images, pairing."""
from __future__ import annotations

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
