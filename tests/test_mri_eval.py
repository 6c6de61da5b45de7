"""`medsr eval` volume protocols (mri-aniso-x{k}): simulation of the thick-slice input, 3-D scores inside the mask,
slab bootstrap against cubic B-spline, orthogonal-view figures. No Ray here (the stage is run in-process); the Ray
run of the preset is in tests/test_mri_enhance.py."""
from __future__ import annotations

import glob
import json
import shutil

import cv2
import nibabel as nib
import numpy as np
import pytest

from medsr_dist.config import ConfigError, load_config
from medsr_dist.eval.evaluate import plan_evaluation
from medsr_dist.eval.plan import EvalInputError, EvalModel
from medsr_dist.eval.html_report import write_eval_report
from medsr_dist.eval.protocols import VOLUME_PRESETS, resolve_protocol
from medsr_dist.eval.volume_eval import VolumeScorer, build_volume_report, make_volume_pair
from medsr_dist.mri.volume import VolumeError, read_nifti, resampled_affine
from medsr_dist.storage import Storage

ANATOMICAL = glob.glob(str(__import__("pathlib").Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"))[0]


class IdentityBackend:
    """Scale-1 refinement that changes nothing: the reconstruction must then be the B-spline interpolation."""

    scale, size_multiple, precision = 1, 1, "fp32"

    def __call__(self, batch):
        return batch.copy()


def identity_factory():
    return IdentityBackend()


def test_presets_and_parameters():
    assert set(VOLUME_PRESETS) == {"mri-aniso-x2", "mri-aniso-x3", "mri-aniso-x4"}
    p = resolve_protocol("mri-aniso-x4", {"profile": "box", "fusion": "fourier", "hr_size": None})
    assert (p.scale, p.axis, p.profile, p.fusion) == (4, "axial", "box", "fourier")
    with pytest.raises(ValueError, match="do not apply to a volume protocol"):
        resolve_protocol("mri-aniso-x4", {"blur_sigma": 1.0})
    with pytest.raises(ConfigError, match="axis"):
        load_config(None, ["eval.protocol=mri-aniso-x2", "eval.params.axis=oblique"])
    with pytest.raises(ConfigError, match="unknown parameter"):  # a 2-D protocol refuses the volume keys
        load_config(None, ["eval.protocol=nih-x4", "eval.params.fusion=mean"])
    cfg = load_config("configs/eval_mri-aniso-x4.yaml", [])
    assert cfg.eval.protocol == "mri-aniso-x4" and cfg.eval.models == []


def test_the_thick_input_is_the_ground_truth_degraded_along_the_axial_normal():
    vol = read_nifti(open(ANATOMICAL, "rb").read(), "anatomical.nii")  # 33 x 41 x 25, 2 mm, int16, LAS
    pair = make_volume_pair(vol, resolve_protocol("mri-aniso-x4"))
    assert pair.axis == 2 and pair.hr.shape == (33, 41, 24) and pair.thick.shape == (33, 41, 6)
    np.testing.assert_allclose(pair.thick.spacing, [2.0, 2.0, 8.0], rtol=1e-6)
    # the thick grid has the ground truth's field of view: its fine version is the ground truth's affine
    np.testing.assert_allclose(resampled_affine(pair.thick.affine, 2, 0.25), pair.hr.affine, atol=1e-9)
    # rounded to the source's int16 levels, like a real thick-slice file; box profile = mean of 4 slices
    assert np.array_equal(pair.thick.data, np.rint(pair.thick.data))
    box = make_volume_pair(vol, resolve_protocol("mri-aniso-x4", {"profile": "box", "lr_quantization": "none"}))
    np.testing.assert_allclose(box.thick.data[:, :, 1], vol.data[:, :, 4:8].mean(axis=2), atol=1e-3)
    np.testing.assert_array_equal(read_nifti(open(ANATOMICAL, "rb").read(), "x").data, vol.data)  # input untouched
    thick = vol.with_data(vol.data[:, :, ::3], np.diag([2.0, 2.0, 6.0, 1.0]))
    with pytest.raises(VolumeError, match="anatomical.nii: mri-aniso-x4 needs an isotropic volume"):
        make_volume_pair(thick, resolve_protocol("mri-aniso-x4"))


def test_scores_figure_and_slab_bootstrap_with_an_identity_model(tmp_path):
    (tmp_path / "vols").mkdir()
    shutil.copy(ANATOMICAL, tmp_path / "vols" / "anatomical.nii")
    (tmp_path / "vols" / "bad.nii.gz").write_bytes(b"\x1f\x8b not a gzip stream")
    cfg = load_config("configs/eval_mri-aniso-x4.yaml", [
        f"eval.dataset={tmp_path / 'vols'}", f"eval.output={tmp_path / 'out'}", "eval.bootstrap.samples=500",
        "eval.figure_panel=64"])
    storage = Storage()
    plan = plan_evaluation(cfg, storage, models=[EvalModel("identity", "python", factory=identity_factory)])
    assert [i["name"] for i in plan.items] == ["anatomical.nii", "bad.nii.gz"] and not plan.lpips.available
    scorer = VolumeScorer(plan.models, plan.protocol, cfg.eval, cfg.storage, plan.output)
    rows = [r for item in plan.items for r in scorer.one(item["key"], item["name"], True)]
    by = {(r["image"], r["model"]): r for r in rows}
    good = {m: by[("anatomical.nii", m)] for m in ("trilinear", "bspline", "identity")}
    assert all(r["status"] == "ok" for r in good.values())
    # identity refinement through the one engine = the cubic B-spline it starts from (to float32 rounding)
    assert good["identity"]["psnr"] == pytest.approx(good["bspline"]["psnr"], abs=0.01)
    assert good["bspline"]["psnr"] > good["trilinear"]["psnr"] > 20 and 0 < good["trilinear"]["ssim"] < 1
    assert good["bspline"]["consistency_psnr_db"] > 30  # re-degraded, it agrees with its input
    slabs = json.loads(good["bspline"]["slabs"])
    assert len(slabs["psnr"]) == 6 and all(v is None or v > 10 for v in slabs["psnr"])
    assert all(r["status"] == "error" and "bad.nii.gz" in r["error"] for m, r in by.items() if m[0] == "bad.nii.gz")

    report = build_volume_report(cfg, plan, rows, {k: json.loads(r["slabs"]) for k, r in by.items()})
    assert report["baseline"] == "bspline" and [m["name"] for m in report["models"]] == ["trilinear", "bspline", "identity"]
    tri = report["comparisons"]["trilinear"]["psnr"]
    assert tri["n"] == sum(v is not None for v in slabs["psnr"]) and tri["ci_low"] <= tri["mean_difference"] <= tri["ci_high"] < 0
    ident = report["comparisons"]["identity"]["psnr"]
    assert abs(ident["mean_difference"]) < 0.01 and report["common_images"] == 1
    figure = good["bspline"]["figure"]
    png = storage.read_bytes(storage.join(plan.output, figure))
    picture = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape[0] > 2.5 * picture.shape[1] / 5  # three view rows (each: panels + magnified region)
    files = write_eval_report(report, {figure: png}, lambda key, data: storage.write_bytes(storage.join(plan.output, key), data))
    html = (tmp_path / "out" / "report.html").read_text()
    assert "results.json" in files and "axial, coronal, sagittal" in html and "slab" in html and "LPIPS is a 2-D" in html


def test_a_two_d_model_or_a_prepared_split_is_refused_before_ray(tmp_path, tiny_model_dir):
    (tmp_path / "vols").mkdir()
    shutil.copy(ANATOMICAL, tmp_path / "vols" / "a.nii")
    base = ["eval.protocol=mri-aniso-x4", f"eval.dataset={tmp_path / 'vols'}", "eval.models=[]"]
    with pytest.raises(EvalInputError, match="x4 model; mri-aniso-x4 reconstructs through-plane slices with a scale-1"):
        plan_evaluation(load_config(None, [*base, "eval.split=null",
                                           f'eval.models=[{{"name": "x4", "source": "{tiny_model_dir}/model.pth"}}]']))
    with pytest.raises(EvalInputError, match="no prepared split 'test'"):
        plan_evaluation(load_config(None, base))
    from conftest import write_tiny_model

    for kind in ("RRDBNet", "MSRResNet"):  # scale 1 both; only one of them can refine through-plane slices
        (tmp_path / kind).mkdir()
        write_tiny_model(lambda n, d, k=kind: (tmp_path / k / n).write_bytes(d), scale=1, generator=kind)
    x1 = [*base, "eval.split=null", "eval.models=[{{\"name\": \"x1\", \"source\": \"{}/model.pth\"}}]"]
    with pytest.raises(EvalInputError, match=r"eval.models\[x1\]: RRDBNet x1 cannot be the scale-1 through-plane "
                                             r"refiner.*use model.generator.type=MSRResNet"):
        plan_evaluation(load_config(None, [*x1[:-1], x1[-1].format(tmp_path / "RRDBNet")]))
    plan = plan_evaluation(load_config(None, [*x1[:-1], x1[-1].format(tmp_path / "MSRResNet")]))
    assert [m.name for m in plan.models][-1] == "x1"
