"""`medsr mri self-sr` and `medsr mri reconstruct` end to end on a local Ray (tiny volume, a few iterations).

Starts Ray: run under the heavy lock (flock /tmp/medsr-heavy.lock ...).
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from medsr_dist.cli import app
from medsr_dist.mri.sample_data import build_mr_series, dataset_bytes
from medsr_dist.mri.volume import read_dicom_series, read_nifti

pytestmark = pytest.mark.slow

TINY = ["ray.num_cpus=4",  # logical: trainer + pair-crop actor + Ray Data tasks
         "ray.progress=false", "train.iterations=4", "train.batch_size=2", "train.num_workers=1",
        "train.cpus_per_worker=1", "train.checkpoint_every=4", "train.val_every=4", "train.log_every=2",
        "degradation.gt_size=16", "degradation.shuffle_buffer=4", "prepare.rows_per_shard=8",
        "model.generator.num_feat=8", "model.generator.num_block=1", "enhance.batch_size=2"]


def thick_head(shape=(24, 20, 6)) -> np.ndarray:
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    ball = (x ** 2 + y ** 2 + z ** 2) < 0.8
    return np.rint(ndimage.gaussian_filter(ball * (500 + 200 * np.sin(5 * x) * np.cos(4 * y)), 1.0)).astype(np.int16)


@pytest.fixture(scope="module")
def ray_shutdown():
    yield
    import ray

    ray.shutdown()


def test_self_sr_then_reconstruct_a_dicom_series_with_its_model(tmp_path, ray_shutdown):
    affine = np.diag([1.0, 1.1, 4.0, 1.0])
    affine[:3, 3] = [-12.0, -10.0, 5.0]
    src = tmp_path / "thick.nii.gz"
    nib.save(nib.Nifti1Image(thick_head(), affine), str(src))
    out = tmp_path / "iso.nii.gz"
    runner = CliRunner()
    res = runner.invoke(app, ["mri", "self-sr", str(src), "-o", str(out), "-c", "configs/mri_psnr_x4.yaml",
                              f"run.root={tmp_path / 'run'}", *TINY, "--factor", "4"])
    assert res.exit_code == 0, res.output
    iso = read_nifti(out.read_bytes(), "iso")
    assert iso.shape == (24, 20, 24) and iso.stored_dtype == np.int16
    np.testing.assert_allclose(iso.spacing, [1.0, 1.1, 1.0], rtol=1e-6)
    prov = json.loads((tmp_path / "iso.nii.gz.provenance.json").read_text())
    assert prov["factor"] == 4 and prov["lr_axis"] == 2 and prov["model"].endswith("@4")
    assert np.isfinite(prov["consistency_psnr_db"]) and prov["fusion"] == "fourier"  # the config's mri.fusion
    export = tmp_path / "run" / "self-sr" / "thick" / "train" / "export" / "model.pth"
    assert export.is_file()
    meta = json.loads((export.parent / "meta.json").read_text())
    assert meta["scale"] == 1 and meta["generator"]["type"] == "MSRResNet"
    assert "training CPU s" in said(res)  # the budget that was spent is reported

    # the same model on a DICOM series: a derived series comes out
    series = tmp_path / "series"
    series.mkdir()
    for k, ds in enumerate(build_mr_series(thick_head((20, 16, 5)), (0.9, 0.9, 3.6))):
        (series / f"IM{k:03d}.dcm").write_bytes(dataset_bytes(ds))
    derived = tmp_path / "derived"
    res = runner.invoke(app, ["mri", "reconstruct", str(series), "-o", str(derived), "-m", str(export),
                              "--factor", "4", "--fusion", "fourier", "enhance.batch_size=2"])
    assert res.exit_code == 0, res.output
    files = sorted(derived.iterdir())
    assert len(files) == 20
    vol = read_dicom_series([(p.name, p.read_bytes()) for p in files], "derived")
    np.testing.assert_allclose(vol.spacing, [0.9, 0.9, 0.9], rtol=1e-6)
    first = pydicom.dcmread(files[0])
    assert "DERIVED" in first.ImageType and "not a new acquisition" in first.DerivationDescription


def test_supervised_esrgan_x2_prepare_train_reconstruct(tmp_path, ray_shutdown):
    """configs/mri_esrgan_x2.yaml end to end at tiny size: two isotropic volumes -> the six pairings (planes smaller
    than the 128-px crop the VGG discriminator takes are left out) -> the esrgan family at scale 1 -> a thick x2
    volume reconstructed with the export (the config's mri.factor and fusion)."""
    archive = tmp_path / "iso"
    archive.mkdir()
    for i in range(2):
        nib.save(nib.Nifti1Image(thick_head((128, 128, 8)) + i, np.eye(4)), str(archive / f"sub-{i:02d}_T1w.nii.gz"))
    runner = CliRunner()
    common = ["-c", "configs/mri_esrgan_x2.yaml", f"run.root={tmp_path / 'run'}", "ray.num_cpus=4",
              "ray.progress=false", "prepare.split.train=0.5", "prepare.split.val=0.5", "prepare.split.test=0",
              "mri.skip_empty=0"]
    res = runner.invoke(app, ["mri", "prepare", *common, f"prepare.input={archive}"])
    assert res.exit_code == 0, res.output
    assert "{'train': 16, 'val': 16, 'test': 0}" in said(res)  # 8 slices along k x 2 degraded axes per volume
    res = runner.invoke(app, ["train", *common, "train.iterations=2", "train.batch_size=2", "train.checkpoint_every=2",
                              "train.val_every=2", "train.log_every=1", "train.cpus_per_worker=1",
                              "model.generator.num_feat=8", "model.generator.num_block=1",
                              "model.discriminator.num_feat=8", "train.vgg.weights=random-init-for-testing",
                              "degradation.shuffle_buffer=4"])
    assert res.exit_code == 0, res.output
    export = tmp_path / "run" / "train" / "export" / "model.pth"
    meta = json.loads((export.parent / "meta.json").read_text())
    assert meta["family"] == "esrgan" and meta["scale"] == 1 and meta["generator"]["type"] == "MSRResNet"
    thick = tmp_path / "thick.nii.gz"
    nib.save(nib.Nifti1Image(thick_head((20, 16, 6)), np.diag([1.0, 1.0, 2.0, 1.0])), str(thick))
    out = tmp_path / "iso.nii.gz"
    res = runner.invoke(app, ["mri", "reconstruct", str(thick), "-o", str(out), "-m", str(export), *common[:2]])
    assert res.exit_code == 0, res.output
    iso = read_nifti(out.read_bytes(), "iso")
    assert iso.shape == (20, 16, 12)
    np.testing.assert_allclose(iso.spacing, [1.0, 1.0, 1.0], rtol=1e-6)
    prov = json.loads((tmp_path / "iso.nii.gz.provenance.json").read_text())
    assert prov["factor"] == 2 and prov["fusion"] == "fourier" and prov["profile"] == "gaussian"


def said(res) -> str:
    return " ".join(res.output.split())  # rich wraps long lines


def test_bad_volumes_fail_before_ray_with_a_clear_message(tmp_path):
    four_d = tmp_path / "dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 4), np.int16), np.eye(4)), str(four_d))
    runner = CliRunner()
    res = runner.invoke(app, ["mri", "self-sr", str(four_d), "-o", str(tmp_path / "o.nii.gz"), "-c",
                              "configs/mri_psnr_x4.yaml", f"run.root={tmp_path}"])
    assert res.exit_code == 1 and "dwi.nii.gz: expected a 3-D volume" in said(res)
    iso = tmp_path / "iso.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), str(iso))
    res = runner.invoke(app, ["mri", "self-sr", str(iso), "-o", str(tmp_path / "o.nii.gz"), "-c",
                              "configs/mri_psnr_x4.yaml", f"run.root={tmp_path}"])
    assert res.exit_code == 1 and "no single low-resolution axis" in said(res)
    res = runner.invoke(app, ["mri", "self-sr", str(iso), "-o", str(tmp_path / "o.nii.gz"), "--factor", "1"])
    assert res.exit_code == 2 and "--factor" in said(res)
    series = tmp_path / "gap"
    series.mkdir()
    for k, ds in enumerate(build_mr_series(np.zeros((8, 8, 5)), (1.0, 1.0, 3.0))):
        if k != 2:
            (series / f"IM{k:03d}.dcm").write_bytes(dataset_bytes(ds))
    res = runner.invoke(app, ["mri", "reconstruct", str(series), "-o", str(tmp_path / "x"), "-m", "nope.pth"])
    assert res.exit_code == 1 and "1 missing slice(s) between IM001.dcm and IM003.dcm" in said(res)
    assert "SAMPLE^" not in said(res) and "MRI00001" not in said(res)


def test_reconstruct_takes_a_non_integer_factor_and_records_it(tmp_path):
    """No Ray: `medsr mri reconstruct --factor 3.3` (3.3 mm slices to ~1 mm) on 6 slices: round(6 x 3.3) = 20 fine
    slices over the same field of view, the factor and the grid in the provenance beside the output."""
    from conftest import write_tiny_model

    thick = tmp_path / "thick.nii.gz"
    nib.save(nib.Nifti1Image(thick_head(), np.diag([1.0, 1.0, 3.3, 1.0])), str(thick))
    (tmp_path / "m").mkdir()
    write_tiny_model(lambda n, d: (tmp_path / "m" / n).write_bytes(d), scale=1, generator="MSRResNet")
    out = tmp_path / "iso.nii.gz"
    res = CliRunner().invoke(app, ["mri", "reconstruct", str(thick), "-o", str(out), "-m", str(tmp_path / "m/model.pth"),
                                   "--factor", "3.3", "--profile", "box", "enhance.batch_size=4"])
    assert res.exit_code == 0, said(res)
    img = nib.load(str(out))
    assert img.shape == (24, 20, 20)
    np.testing.assert_allclose(img.header.get_zooms(), [1.0, 1.0, 3.3 * 6 / 20], rtol=1e-6)
    provenance = json.loads((tmp_path / "iso.nii.gz.provenance.json").read_text())
    assert provenance["factor"] == 3.3 and provenance["output_shape"] == [24, 20, 20]
    assert np.isfinite(provenance["consistency_psnr_db"])
