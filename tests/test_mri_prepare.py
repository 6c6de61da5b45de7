"""`medsr mri prepare` on a local Ray: slice pairs as sharded Parquet, split by volume, error rows for bad volumes.

Starts Ray: run under the heavy lock (flock /tmp/medsr-heavy.lock ...).
"""
from __future__ import annotations

import json

import cv2
import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import ndimage

from medsr_dist.config import MriConfig, load_config
from medsr_dist.mri.simulate import intensity_window, supervised_pairs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def head(seed: int, shape=(12, 12, 12)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    ball = (x ** 2 + y ** 2 + z ** 2) < 0.8
    return np.rint(ndimage.gaussian_filter(ball * (400 + 300 * rng.random(shape)), 1.0)).astype(np.int16)


def save(path, data, zooms):
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    nib.save(img, str(path))


def read_split(root, split):
    return pq.read_table(str(root / split)).to_pylist()


def test_supervised_pairs_are_split_by_volume_and_bad_volumes_become_error_rows(tmp_path, ray_local):
    from medsr_dist.mri.prepare import prepare_slice_pairs

    archive = tmp_path / "archive"
    archive.mkdir()
    vols = {f"sub-{i:02d}_T1w.nii.gz": head(i, (16, 16, 16)) for i in range(5)}
    for name, data in vols.items():
        save(archive / name, data, (1.0, 1.0, 1.0))
    save(archive / "sub-09_dwi.nii.gz", np.zeros((8, 8, 8, 3), np.int16), (1.0, 1.0, 1.0))  # 4-D
    save(archive / "sub-10_thick.nii.gz", head(10), (1.0, 1.0, 4.0))  # not isotropic
    cfg = load_config(None, [f"run.root={tmp_path}", f"prepare.input={archive}", f"prepare.output={tmp_path / 'ds'}",
                             "prepare.rows_per_shard=40", "prepare.split.train=0.6", "prepare.split.val=0.2",
                             "prepare.split.test=0.2", "prepare.split.group_by=filename", "degradation.gt_size=16"])
    mri = MriConfig(mode="supervised", factor=2, profile="box", skip_empty=0.0)
    result = prepare_slice_pairs(cfg, mri)
    errors = {e["key"].rsplit("/", 1)[-1]: e["error"] for e in result.errors}
    assert set(errors) == {"sub-09_dwi.nii.gz", "sub-10_thick.nii.gz"}
    assert "expected a 3-D volume" in errors["sub-09_dwi.nii.gz"]
    assert "need an isotropic volume" in errors["sub-10_thick.nii.gz"]
    per_volume = 6 * 16  # six pairings, 16 slices each on a 16^3 volume
    ds = tmp_path / "ds"
    seen = {}
    for split in ("train", "val", "test"):
        rows = read_split(ds, split) if (ds / split).exists() else []
        assert len(rows) == result.counts[split]
        for r in rows:
            seen.setdefault(r["volume"], set()).add(split)
    assert sorted(seen) == sorted(vols) and all(len(s) == 1 for s in seen.values())  # a volume in one split only
    assert sum(result.counts.values()) == 5 * per_volume and result.counts["train"] == 3 * per_volume
    assert len(list((ds / "train").glob("*.parquet"))) >= 2  # sharded
    # a row carries exactly the simulated pair (16-bit PNG quantisation aside), degraded axis as rows
    row = next(r for r in read_split(ds, "train") if r["orientation"] == "0/2" and r["slice_index"] == 5)
    data = vols[row["volume"]].astype(np.float32)
    window = intensity_window(data, 2, 8)
    pair = next(p for p in supervised_pairs(data, 2, "box", window=window) if p.orientation == "0/2" and p.index == 5)
    gt = cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_UNCHANGED)
    lq = cv2.imdecode(np.frombuffer(row["lq_image"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert gt.dtype == np.uint16 and gt.shape == lq.shape == (16, 16)
    np.testing.assert_allclose(gt / 65535.0, pair.gt, atol=1 / 65535)
    np.testing.assert_allclose(lq / 65535.0, pair.lq, atol=1 / 65535)
    assert row["pair_scale"] == 1 and row["group"] == row["volume"].split("_")[0]
    assert json.loads(row["meta"])["window"] == pytest.approx([window.low, window.high])
    assert json.loads(row["meta"])["plane_normal_axes"] == {"sagittal": 0, "coronal": 1, "axial": 2}
    summary = json.loads((ds / "summary.json").read_text())
    assert summary["errors"] == 2 and summary["mri"]["factor"] == 2


def test_self_supervised_pairs_of_one_anisotropic_volume(tmp_path, ray_local):
    from medsr_dist.mri.prepare import prepare_slice_pairs

    archive = tmp_path / "in"
    archive.mkdir()
    save(archive / "scan.nii.gz", head(3, (16, 16, 5)), (1.0, 1.0, 4.0))
    cfg = load_config(None, [f"run.root={tmp_path}", f"prepare.input={archive}", f"prepare.output={tmp_path / 'ds'}",
                             "degradation.gt_size=16"])
    result = prepare_slice_pairs(cfg, MriConfig(mode="self", factor=4, skip_empty=0.0, val_every=5))
    assert result.errors == []
    assert result.counts == {"train": 8, "val": 2, "test": 0}  # 5 in-plane slices x 2 in-plane axes
    rows = read_split(tmp_path / "ds", "train")
    assert {r["orientation"] for r in rows} == {"2/0", "2/1"}
    assert all(json.loads(r["meta"])["lr_axis"] == 2 for r in rows)


def test_pairs_smaller_than_the_training_crop_are_left_out():
    from medsr_dist.mri.prepare import volume_pairs
    from medsr_dist.mri.volume import VolumeError

    data = nib.Nifti1Image(head(4, (16, 16, 6)), np.eye(4)).to_bytes()
    mri = MriConfig(mode="supervised", factor=2, skip_empty=0.0)
    assert len(volume_pairs(data, "v.nii", "v", "train", mri)) == 2 * 6 + 2 * 16 + 2 * 16  # every pairing
    rows = volume_pairs(data, "v.nii", "v", "train", mri, min_side=8)
    # only the 16 x 16 planes (slices along k, degraded along i or j) fit an 8-px crop; 16 x 6 planes do not
    assert len(rows) == 2 * 6 and {r["orientation"] for r in rows} == {"2/0", "2/1"}
    with pytest.raises(VolumeError, match=r"both sides >= 32 px \(degradation.gt_size\)"):
        volume_pairs(data, "v.nii", "v", "train", mri, min_side=32)


def test_sub_images_cover_the_slice_and_stay_aligned():
    from medsr_dist.mri.prepare import subimages, volume_pairs

    gt, lq = np.arange(20 * 30, dtype=np.float32).reshape(20, 30), -np.arange(20 * 30, dtype=np.float32).reshape(20, 30)
    tiles = list(subimages(gt, lq, 12))
    assert [t[0] for t in tiles] == [(r, c) for r in (0, 6, 8) for c in (0, 6, 12, 18)]
    covered = np.zeros_like(gt, bool)
    for (top, left), g, q in tiles:
        assert g.shape == q.shape == (12, 12)
        np.testing.assert_array_equal(g, gt[top:top + 12, left:left + 12])
        np.testing.assert_array_equal(q, -g)
        covered[top:top + 12, left:left + 12] = True
    assert covered.all()
    assert [t[0] for t in subimages(gt, lq, 0)] == [(0, 0)]
    assert [t[1].shape for t in subimages(gt, lq, 40)] == [(20, 30)]
    data = nib.Nifti1Image(head(4, (16, 16, 6)), np.eye(4)).to_bytes()
    rows = volume_pairs(data, "v.nii", "v", "train", MriConfig(mode="supervised", factor=2, skip_empty=0.0,
                                                               subimage=8), min_side=8)
    assert len(rows) == 2 * 6 * 9 and len({r["key"] for r in rows}) == len(rows)  # 3 x 3 sub-images per 16 x 16 plane
    assert all(r["height"] == r["width"] == 8 for r in rows)
