"""The nightly job on volumes (`medsr enhance`, medsr_dist/enhance/volumes.py) and `medsr eval` mri-aniso-x4, on one
local Ray: a folder of NIfTI volumes, a DICOM series folder and a 2-D image enhanced together; a rerun skips them
unread; bad volumes (4-D, sheared orientation matrix, missing slices, over the voxel limit) are error rows naming
the item and the problem, with nothing written.

Starts Ray: run under the heavy lock (flock /tmp/medsr-heavy.lock ...).
"""
from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import write_tiny_model
from medsr_dist.config import load_config
from medsr_dist.mri.sample_data import build_mr_series, dataset_bytes
from medsr_dist.mri.volume import read_dicom_series, resampled_affine

pytestmark = pytest.mark.slow

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
DCIODVFY = shutil.which("dciodvfy")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def nifti_bytes(data, affine, dtype, slope=None, inter=None, gz=True) -> bytes:
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.header.set_qform(affine, code=1)
    raw = img.to_bytes()
    if slope is not None:  # nibabel resets scaling on write: patch scl_slope/scl_inter (NIfTI-1 offsets 112/116)
        raw = raw[:112] + np.array([slope, inter], "<f4").tobytes() + raw[120:]
    return gzip.compress(raw) if gz else raw


def thick_anatomy() -> np.ndarray:
    """nibabel's real T1 (33 x 41 x 25, 2 mm), every 4th axial slice's slab averaged: a thick-slice volume."""
    data = np.asarray(nib.load(str(NIB_DATA / "anatomical.nii")).dataobj, np.float32)[:, :, :24]
    return data.reshape(33, 41, 6, 4).mean(axis=3)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("mri-archive")
    inp = root / "in"
    (inp / "mri").mkdir(parents=True)
    thick = thick_anatomy()
    affine = np.diag([-2.0, 2.0, 8.0, 1.0])
    affine[:3, 3] = [60.0, -80.0, -20.0]
    # int16 with scaling: stored = (value - 10) / 0.5
    (inp / "mri" / "t1_thick.nii.gz").write_bytes(
        nifti_bytes(np.rint((thick - 10) / 0.5), affine, np.int16, slope=0.5, inter=10.0))
    # float32, uncompressed, thick along i, rotated grid
    theta = np.deg2rad(20)
    rot = np.eye(4)
    rot[:3, :3] = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]])
    sag = np.ascontiguousarray(thick.transpose(2, 1, 0)[:, :, :20])  # (6, 41, 20): axis 0 thick
    (inp / "mri" / "sag_float.nii").write_bytes(nifti_bytes(sag, rot @ np.diag([6.0, 1.5, 1.5, 1.0]), np.float32, gz=False))
    shutil.copy(NIB_DATA / "example4d.nii.gz", inp / "mri" / "dwi_4d.nii.gz")
    skew = np.diag([1.0, 1.0, 4.0, 1.0])
    skew[0, 2] = 1.5
    (inp / "mri" / "sheared.nii.gz").write_bytes(nifti_bytes(thick, skew, np.int16))
    big = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.diag([1.0, 1.0, 4.0, 1.0]))
    big.header.set_data_shape((4000, 4000, 4000))  # a header bomb: declares 64 G voxels, holds 8
    (inp / "mri" / "bomb.nii.gz").write_bytes(gzip.compress(big.header.binaryblock + b"\0" * 4 + b"\0" * 16))
    # a DICOM series folder, and one missing a slice
    series = build_mr_series(thick[:24, :20], spacing=(1.0, 1.1, 4.0), patient_id="PHI-SECRET-77")
    for name, sets in (("ax_t1", series), ("gap", [s for i, s in enumerate(series) if i != 3])):
        (inp / "series" / name).mkdir(parents=True)
        for i, ds in enumerate(sets):
            (inp / "series" / name / f"IM{i:04d}.dcm").write_bytes(dataset_bytes(ds))
    # a 2-D image beside them: the x4 job model enhances it as before
    (inp / "xr").mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(inp / "xr" / "hand.png"), (cv2.GaussianBlur(rng.random((24, 20)), (5, 5), 2) * 255).astype(np.uint8))
    models = root / "models"
    (models / "x4").mkdir(parents=True)
    (models / "x1").mkdir()
    write_tiny_model(lambda n, d: (models / "x4" / n).write_bytes(d), scale=4)
    write_tiny_model(lambda n, d: (models / "x1" / n).write_bytes(d), scale=1, seed=1, name="tiny-mri@1",
                     generator="MSRResNet")  # the through-plane refiner (RRDBNet x1 is refused)
    return root


def job_config(root: Path, *extra: str):
    return load_config(None, [
        f"enhance.input={root / 'in'}", f"enhance.output={root / 'out'}", f"enhance.checkpoint={root / 'models/x4/model.pth'}",
        f"enhance.volumes.checkpoint={root / 'models/x1/model.pth'}", 'enhance.volumes.series_folders=["series/*"]',
        "enhance.max_input_pixels=2000000", "mri.factor=4", "mri.fusion=mean", "ray.num_cpus=4", "ray.progress=false",
        *extra])


def test_nightly_job_enhances_nifti_volumes_and_a_dicom_series_and_refuses_bad_volumes(archive, ray_local):
    from medsr_dist.enhance.job import run_enhance_job
    from medsr_dist.enhance.manifest import read_manifest
    from medsr_dist.storage import Storage

    cfg = job_config(archive)
    result = run_enhance_job(cfg)
    rows = {Path(r["input_key"].rstrip("/")).name: r for r in result.rows}
    assert set(rows) == {"t1_thick.nii.gz", "sag_float.nii", "dwi_4d.nii.gz", "sheared.nii.gz", "bomb.nii.gz",
                         "ax_t1", "gap", "hand.png"}, rows
    for name in ("t1_thick.nii.gz", "sag_float.nii", "ax_t1", "hand.png"):
        assert rows[name]["status"] == "done", (name, rows[name]["error"])
    # bad volumes: error rows naming the item and what is wrong, nothing written
    errors = {n: rows[n]["error"] for n in ("dwi_4d.nii.gz", "sheared.nii.gz", "bomb.nii.gz", "gap")}
    assert all(rows[n]["status"] == "error" for n in errors), errors
    assert "volume: expected a 3-D volume, the header declares shape (128, 96, 24, 2) (a 4-D series" in errors["dwi_4d.nii.gz"]
    assert "volume: the orientation matrix is not orthonormal" in errors["sheared.nii.gz"]
    assert "4000 x 4000 x 4000" in errors["bomb.nii.gz"] and "exceeds enhance.max_input_pixels" in errors["bomb.nii.gz"]
    assert "series input: 1 missing slice(s) between IM0002.dcm and IM0003.dcm" in errors["gap"]
    assert all("PHI-SECRET" not in r["error"] for r in result.rows)
    written = sorted(str(p.relative_to(archive / "out")) for p in (archive / "out").rglob("*") if p.is_file()
                     and "_manifest" not in p.parts)
    assert not any(n in w for w in written for n in ("dwi", "sheared", "bomb", "gap"))

    # NIfTI: the source's dtype and scaling, the fine grid's affine and pixdim, provenance inside the file
    vol_sha = json.loads((archive / "models/x1/meta.json").read_text())["sha256"]
    src = nib.Nifti1Image.from_bytes(gzip.decompress((archive / "in/mri/t1_thick.nii.gz").read_bytes()))
    t1 = rows["t1_thick.nii.gz"]
    out = nib.Nifti1Image.from_bytes(gzip.decompress((Path(t1["output_key"])).read_bytes()))
    assert t1["output_key"].endswith(".nii.gz") and out.shape == (33, 41, 24) and out.get_data_dtype() == np.int16
    assert (out.dataobj.slope, out.dataobj.inter) == (0.5, 10.0)
    np.testing.assert_allclose(out.affine, resampled_affine(src.affine, 2, 0.25), atol=1e-4)
    np.testing.assert_allclose(out.header.get_zooms(), [2.0, 2.0, 2.0], rtol=1e-6)
    provenance = json.loads(out.header.extensions[-1].get_content())
    assert provenance["medsr:model_sha256"] == vol_sha == t1["model_sha256"]
    assert provenance["medsr:source"] == t1["item_id"]  # the item id, not the key (enhance.provenance_source)
    assert json.loads(t1["params"])["factor"] == 4 and t1["input_format"] == "nifti" and t1["frames"] == 6
    assert np.isfinite(t1["consistency_psnr_db"]) and t1["output_width"] == 33 and t1["output_height"] == 41
    sag = nib.load(rows["sag_float.nii"]["output_key"])
    assert sag.shape == (24, 41, 20) and sag.get_data_dtype() == np.float32
    np.testing.assert_allclose(sag.header.get_zooms(), [1.5, 1.5, 1.5], rtol=1e-5)

    # the derived series: 24 slices, a new DERIVED series on the fine grid
    ax = rows["ax_t1"]
    folder = Path(ax["output_key"]).parent
    assert ax["output_key"].endswith("ax_t1.sr-" + ax["output_key"].split(".sr-")[1]) or folder.name.startswith("ax_t1.sr-")
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 24 and ax["input_format"] == "dicom-series"
    derived = read_dicom_series([(f.name, f.read_bytes()) for f in files], "derived")
    source = read_dicom_series([(f.name, f.read_bytes()) for f in sorted((archive / "in/series/ax_t1").glob("*.dcm"))], "src")
    np.testing.assert_allclose(derived.affine, resampled_affine(source.affine, 2, 0.25), atol=1e-4)
    first = pydicom.dcmread(files[0])
    assert list(first.ImageType[:2]) == ["DERIVED", "SECONDARY"] and float(first.SliceThickness) == pytest.approx(1.0)
    assert first.SeriesInstanceUID != pydicom.dcmread(next((archive / "in/series/ax_t1").glob("*.dcm"))).SeriesInstanceUID
    if DCIODVFY:
        found = subprocess.run([DCIODVFY, str(files[5])], capture_output=True, text=True, timeout=60)
        assert not [ln for ln in (found.stdout + found.stderr).splitlines() if ln.startswith(("Error", "Warning"))]
    manifest = {Path(r["input_key"].rstrip("/")).name: r for r in read_manifest(Storage(), result.manifest)}
    assert {"t1_thick.nii.gz", "sag_float.nii", "ax_t1", "hand.png"} <= set(manifest)

    # a rerun skips every done item without reading it; error rows are tried again
    again = run_enhance_job(cfg)
    statuses = {Path(r["input_key"].rstrip("/")).name: r["status"] for r in again.rows}
    assert {n: statuses[n] for n in ("t1_thick.nii.gz", "sag_float.nii", "ax_t1", "hand.png")} == dict.fromkeys(
        ("t1_thick.nii.gz", "sag_float.nii", "ax_t1", "hand.png"), "skipped")
    assert again.read_items == 4  # the four error items, read again; nothing done was read


def test_volume_items_without_a_scale_1_model_are_error_rows_saying_so(archive, ray_local, tmp_path):
    from medsr_dist.enhance.job import run_enhance_job

    cfg = job_config(archive, f"enhance.output={tmp_path / 'out'}", "enhance.volumes.checkpoint=null",
                     'enhance.include=["mri/t1_thick.nii.gz", "xr/*"]')
    rows = {Path(r["input_key"]).name: r for r in run_enhance_job(cfg).rows}
    assert rows["hand.png"]["status"] == "done"
    assert rows["t1_thick.nii.gz"]["status"] == "error"
    assert "needs a scale-1 through-plane model; enhance.checkpoint is x4: set enhance.volumes.checkpoint" in \
        rows["t1_thick.nii.gz"]["error"]


def test_a_non_integer_factor_in_the_nightly_job_keeps_the_field_of_view_with_the_exact_affine(archive, ray_local,
                                                                                                tmp_path):
    """mri.factor 3.3 on 6 slices of 8 mm: round(6 x 3.3) = 20 fine slices of 8 x 6 / 20 = 2.4 mm over the same
    extent; the written affine is the source's resampled by 6 / 20, the params and provenance say 3.3."""
    from medsr_dist.enhance.job import run_enhance_job

    cfg = job_config(archive, f"enhance.output={tmp_path / 'out'}", "mri.factor=3.3",
                     'enhance.include=["mri/t1_thick.nii.gz"]')
    (row,) = run_enhance_job(cfg).rows
    assert row["status"] == "done", row["error"]
    src = nib.Nifti1Image.from_bytes(gzip.decompress((archive / "in/mri/t1_thick.nii.gz").read_bytes()))
    out = nib.Nifti1Image.from_bytes(gzip.decompress(Path(row["output_key"]).read_bytes()))
    assert out.shape == (33, 41, 20) and json.loads(row["params"])["factor"] == 3.3
    np.testing.assert_allclose(out.affine, resampled_affine(src.affine, 2, 6 / 20), atol=1e-4)
    np.testing.assert_allclose(out.header.get_zooms(), [2.0, 2.0, 2.4], rtol=1e-6)
    first, last = src.affine @ [0, 0, -0.5, 1], src.affine @ [0, 0, 5.5, 1]  # the field of view's two faces
    np.testing.assert_allclose(out.affine @ [0, 0, -0.5, 1], first, atol=1e-4)
    np.testing.assert_allclose(out.affine @ [0, 0, 19.5, 1], last, atol=1e-4)
    assert np.isfinite(row["consistency_psnr_db"])


def test_eval_preset_mri_aniso_x4_on_ray(archive, ray_local, tmp_path):
    from medsr_dist.eval.evaluate import plan_evaluation, run_evaluation

    (tmp_path / "iso").mkdir()
    shutil.copy(NIB_DATA / "anatomical.nii", tmp_path / "iso" / "anatomical.nii")
    cfg = load_config("configs/eval_mri-aniso-x4.yaml", [
        f"eval.dataset={tmp_path / 'iso'}", f"eval.output={tmp_path / 'report'}", "eval.bootstrap.samples=300",
        f'eval.models=[{{"name": "tiny", "source": "{archive / "models/x1/model.pth"}"}}]', "eval.figure_panel=64"])
    result = run_evaluation(cfg, plan=plan_evaluation(cfg))
    summary = result.report["summary"]
    assert set(summary) == {"trilinear", "bspline", "tiny"} and result.n_errors == 0
    assert summary["bspline"]["psnr"]["mean"] > summary["trilinear"]["psnr"]["mean"]
    comp = result.report["comparisons"]["tiny"]["psnr"]
    assert comp["n"] >= 5 and comp["ci_low"] <= comp["mean_difference"] <= comp["ci_high"]
    assert (tmp_path / "report" / "report.html").stat().st_size > 10_000
    assert len(list((tmp_path / "report" / "figures").glob("*.png"))) == 1


def test_a_volume_items_error_rows_name_the_volume_model_and_an_images_rows_the_job_model(archive):
    """No Ray: the read and commit stages driven directly, as the job's actor pool drives them."""
    from medsr_dist.enhance.commit import EncodeCommit
    from medsr_dist.enhance.plan import list_inputs
    from medsr_dist.enhance.read import ReadDecode
    from medsr_dist.enhance.spec import JobSpec
    from medsr_dist.infer.provenance import enhance_params
    from medsr_dist.infer.model_file import read_model_file
    from medsr_dist.enhance.volumes import plan_volume_job
    from medsr_dist.storage import Storage

    def stages(cfg):
        e, storage = cfg.enhance, Storage(cfg.storage)
        model = read_model_file(e.checkpoint, cfg.storage)
        volumes = plan_volume_job(cfg, storage, model, list_inputs(storage, e), "fp32")
        spec = JobSpec(storage=storage, input=e.input, output=e.output, model=model, params=enhance_params(e, model),
                       run_id="t", threshold_db=e.consistency_threshold_db, max_input_pixels=e.max_input_pixels,
                       max_output_pixels=e.max_output_pixels, volumes=volumes)
        return model, volumes, lambda key: EncodeCommit(spec).one(ReadDecode(spec).one(str(key)))

    job, volumes, row_of = stages(job_config(archive))
    vol = volumes["model"]
    assert vol.sha256 != job.sha256
    row = row_of(archive / "in" / "mri" / "dwi_4d.nii.gz")  # a 4-D series: refused from its header
    assert row["status"] == "error" and "expected a 3-D volume" in row["error"], row["error"]
    assert (row["model_name"], row["model_sha256"]) == ("tiny-mri@1", vol.sha256)
    assert json.loads(row["params"]) == volumes["params"] and json.loads(row["params"])["factor"] == 4
    (archive / "in" / "xr" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    try:
        image = row_of(archive / "in" / "xr" / "broken.png")
    finally:
        (archive / "in" / "xr" / "broken.png").unlink()
    assert image["status"] == "error" and (image["model_name"], image["model_sha256"]) == (job.name, job.sha256)
    # no volume model (enhance.checkpoint x4, no enhance.volumes.checkpoint): no model named for the volume
    _, none, row_of = stages(job_config(archive, "enhance.volumes.checkpoint=null"))
    row = row_of(archive / "in" / "mri" / "t1_thick.nii.gz")
    assert none["model"] is None and row["status"] == "error" and "scale-1 through-plane model" in row["error"]
    assert (row["model_name"], row["model_sha256"]) == ("", "")
