"""Specification of `medsr eval`: the papers' protocols, the statistics, LPIPS availability, the Ray Data job
and the report a reader opens.

Metric parity with basicsr is specified in tests/test_metrics_report.py.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import medsr_dist.compat  # noqa: F401  (must precede basicsr)
from basicsr.archs.rrdbnet_arch import RRDBNet
from basicsr.utils.matlab_functions import imresize as matlab_imresize
from medsr_dist.config import ConfigError, load_config
from medsr_dist.data.synthetic import make_fundus, make_radiograph
from medsr_dist.eval.evaluate import ProtocolPairs, plan_evaluation, run_evaluation
from medsr_dist.eval.perceptual import LpipsScorer, check_lpips
from medsr_dist.eval.plan import EvalModel
from medsr_dist.eval.results import build_report, figure_key
from medsr_dist.eval.html_report import svg_metric_plot, write_eval_report
from medsr_dist.eval.protocols import PRESETS, VOLUME_PRESETS, ProtocolError, resolve_protocol
from medsr_dist.eval.stats import paired_bootstrap, summarize
from medsr_dist.infer.engine import ENGINE_REVISION
from medsr_dist.io.image import ImageMeta, encode_image
from medsr_dist.models.weights import save_basicsr_checkpoint
from medsr_dist.storage import Storage

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
def gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    k = 2 * math.ceil(3 * sigma) + 1
    out = cv2.GaussianBlur(image, (k, k), sigma, borderType=cv2.BORDER_REFLECT_101)
    return out[:, :, None] if out.ndim == 2 else out


def cubic(image: np.ndarray, size: int) -> np.ndarray:
    out = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
    return out[:, :, None] if out.ndim == 2 else out


def gray(size: int, seed: int = 0) -> np.ndarray:
    return make_radiograph(seed, size)[:, :, None]


def write_png16(path: Path, pixels: np.ndarray) -> None:
    meta = ImageMeta(format="png", dtype="uint16", bits_stored=16, channels=pixels.shape[2], photometric="MONOCHROME2"
                     if pixels.shape[2] == 1 else "RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_image(pixels, meta))


def write_model(folder: Path, scale: int, *, meta: bool = True, seed: int = 0) -> Path:
    """A tiny random RRDBNet as a model file (BasicSR layout), with or without meta.json beside it."""
    torch.manual_seed(seed)
    generator = {"type": "RRDBNet", "num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_block": 1, "num_grow_ch": 4}
    net = RRDBNet(num_in_ch=3, num_out_ch=3, scale=scale, num_feat=8, num_block=1, num_grow_ch=4)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pth"
    save_basicsr_checkpoint(net, str(path), ema=net)
    if meta:
        (folder / "meta.json").write_text(json.dumps({"family": "realesrgan", "scale": scale, "generator": generator,
                                                      "name": folder.name}))
    return path


def test_a_safetensors_model_file_loads_and_runs_like_its_pth(tmp_path):
    """A plain RRDBNet state dict saved as .safetensors (no pickle at all) is a model file like the .pth: the
    architecture is read from its tensor shapes and the network gives the same output."""
    from safetensors.torch import save_file

    from medsr_dist.eval.plan import resolve_models
    from medsr_dist.infer.model_file import read_model_file

    pth = write_model(tmp_path / "pth", 2, meta=False, seed=3)
    state = torch.load(pth, weights_only=True)["params_ema"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "x2.safetensors"))
    model = read_model_file(str(tmp_path / "x2.safetensors"))
    assert (model.scale, model.generator["num_feat"], model.generator["num_block"]) == (2, 8, 1)
    lr = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        np.testing.assert_array_equal(model.build(Storage())(lr).numpy(), read_model_file(str(pth)).build(Storage())(lr).numpy())
    cfg = load_config(None, [f"run.root={tmp_path}", f"eval.models=[{{name: st, source: {tmp_path / 'x2.safetensors'}}}]"])
    assert resolve_models(cfg)[0].model_file.sha256 == model.sha256


def random_alexnet_backbone(path: Path) -> Path:
    """TEST ONLY: a randomly initialised AlexNet trunk in torchvision's key layout (``features.*``).

    Stands in for ImageNet weights, which cannot be downloaded here; LPIPS values computed with it are
    meaningless, and the report must say the weights are not torchvision's.
    """
    import torchvision

    torch.manual_seed(0)
    trunk = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items() if k.startswith("features.")}
    torch.save(trunk, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Protocols: sizes and degradations on known images
# ---------------------------------------------------------------------------------------------------------
def test_drive_x2_lanczos_ground_truth_then_bicubic_x2_then_gaussian_blur():
    source = cv2.resize(make_fundus(3, 128), (400, 300), interpolation=cv2.INTER_AREA)  # DRIVE is 565x584, not square
    pair = PRESETS["drive-x2"].make_pair(source)
    hr = cv2.resize(source, (512, 512), interpolation=cv2.INTER_LANCZOS4).clip(0, 1)
    assert pair.hr.shape == (512, 512, 3) and pair.lr.shape == (256, 256, 3)
    np.testing.assert_allclose(pair.hr, hr, atol=1e-6)
    np.testing.assert_allclose(pair.lr, gaussian(cubic(hr, 256), 1.0).clip(0, 1), atol=1e-6)
    # sigma is a parameter; 0 leaves the bicubic input unblurred
    sharp = resolve_protocol("drive-x2", {"blur_sigma": 0.0}).make_pair(source)
    np.testing.assert_allclose(sharp.lr, cubic(hr, 256).clip(0, 1), atol=1e-6)
    assert np.abs(np.diff(sharp.lr, axis=1)).mean() > 1.2 * np.abs(np.diff(pair.lr, axis=1)).mean()


def test_nih_x4_keeps_the_1024_image_as_ground_truth_and_rejects_other_sizes():
    source = gray(1024, seed=1)
    pair = PRESETS["nih-x4"].make_pair(source)
    assert pair.hr.shape == (1024, 1024, 1) and pair.lr.shape == (256, 256, 1)
    np.testing.assert_array_equal(pair.hr, source)
    np.testing.assert_allclose(pair.lr, gaussian(cubic(source, 256), 1.0).clip(0, 1), atol=1e-6)
    with pytest.raises(ProtocolError, match="1024x1024"):
        PRESETS["nih-x4"].make_pair(gray(512))
    # with the size check lifted, any image works (modcropped to a multiple of 4)
    small = resolve_protocol("nih-x4", {"source_size": None}).make_pair(gray(66)[:, :63])
    assert small.hr.shape == (64, 60, 1) and small.lr.shape == (16, 15, 1)


def test_cxr14_ldm_makes_256_hr_and_64_lr_by_two_opencv_bicubic_resizes_of_the_source():
    source = gray(1024, seed=2)
    pair = PRESETS["cxr14-ldm"].make_pair(source)
    assert pair.hr.shape == (256, 256, 1) and pair.lr.shape == (64, 64, 1)
    np.testing.assert_allclose(pair.hr, cubic(source, 256).clip(0, 1), atol=1e-6)
    np.testing.assert_allclose(pair.lr, cubic(source, 64).clip(0, 1), atol=1e-6)
    chained = resolve_protocol("cxr14-ldm", {"lr_from": "hr"}).make_pair(source)
    np.testing.assert_allclose(chained.lr, cubic(pair.hr, 64).clip(0, 1), atol=1e-6)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_classic_bicubic_protocols_modcrop_and_use_matlab_bicubic_with_y_channel_metrics(scale):
    source = make_fundus(5, 101)[:, :98]  # 101 x 98: not a multiple of 2, 3 or 4
    protocol = PRESETS[f"bicubic-x{scale}"]
    pair = protocol.make_pair(source)
    h, w = 101 - 101 % scale, 98 - 98 % scale
    assert pair.hr.shape == (h, w, 3) and pair.lr.shape == (h // scale, w // scale, 3)
    np.testing.assert_array_equal(pair.hr, source[:h, :w])
    expected = np.clip(matlab_imresize(np.ascontiguousarray(source[:h, :w]), 1 / scale, antialiasing=True), 0, 1)
    np.testing.assert_allclose(pair.lr, expected, atol=1e-6)
    assert (protocol.test_y_channel, protocol.crop_border, protocol.blur_sigma) == (True, scale, 0.0)


def test_the_model_input_is_rounded_like_a_low_resolution_file_of_the_source():
    """lr_quantization: source (every preset) rounds the input to the source's levels, 8bit to 255, none keeps it."""
    source = gray(64, seed=4)
    for levels in (255, 4095, 65535):
        lr = resolve_protocol("bicubic-x4").make_pair(source, source_levels=levels).lr
        np.testing.assert_allclose(lr * levels, np.round(lr * levels), atol=levels * 1e-7 + 1e-3)
    float_lr = resolve_protocol("bicubic-x4", {"lr_quantization": "none"}).make_pair(source, source_levels=255).lr
    assert np.abs(float_lr * 255 - np.round(float_lr * 255)).max() > 0.1  # really not rounded
    eight = resolve_protocol("bicubic-x4", {"lr_quantization": "8bit"}).make_pair(source, source_levels=65535).lr
    np.testing.assert_allclose(eight * 255, np.round(eight * 255), atol=1e-3)
    assert np.abs(eight - float_lr).max() <= 0.5 / 255 + 1e-6  # rounding moves no value by more than half a level
    assert "rounded to the source's bit depth" in resolve_protocol("nih-x4").degradation
    with pytest.raises(ConfigError, match="lr_quantization"):
        load_config(None, ["eval.params.lr_quantization=4bit"])


def test_pairs_of_files_and_prepared_rows_are_rounded_to_their_own_bit_depth(tmp_path):
    """ProtocolPairs knows each source's levels: a 12-bit DICOM (4095), its prepared 16-bit PNG (sBIT 12), an
    8-bit PNG (255)."""
    from medsr_dist.data.prepare import to_training_png
    from medsr_dist.eval.evaluate import ProtocolPairs
    from medsr_dist.io.dicom import build_radiograph_dataset, dataset_to_bytes

    image = gray(64, seed=5)
    (tmp_path / "ct12.dcm").write_bytes(dataset_to_bytes(build_radiograph_dataset(image[:, :, 0], bits_stored=12)))
    (tmp_path / "eight.png").write_bytes(encode_image(image, ImageMeta(format="png", dtype="uint8", bits_stored=8,
                                                                     channels=1, photometric="MONOCHROME2")))
    stage = ProtocolPairs(Storage(), resolve_protocol("bicubic-x4"), {}, [])
    files = stage({"key": np.array([str(tmp_path / "ct12.dcm"), str(tmp_path / "eight.png")])})
    prepared = stage({"key": np.array(["row"]), "image": np.array([to_training_png(image, 12)], dtype=object)})
    for lr, levels in ((files["lr"][0], 4095), (files["lr"][1], 255), (prepared["lr"][0], 4095)):
        np.testing.assert_allclose(lr * levels, np.round(lr * levels), atol=2e-3)
        assert np.abs(lr * 255 - np.round(lr * 255)).max() > 0.1 or levels == 255  # not 8-bit in disguise


def test_a_decode_past_eval_decode_memory_bytes_is_an_error_row_and_good_images_beside_it_are_paired(tmp_path):
    """eval's pair-making stage (called directly, no Ray) decodes under eval.decode_memory_bytes: an honest
    1024 x 1024 16-bit PNG under a 4 MiB cap is stopped in its child (an error row), a small one beside it is
    paired exactly as in-process."""
    big = (np.arange(1024 * 1024, dtype=np.uint32).reshape(1024, 1024) * 2654435761 % 65536).astype(np.uint16)
    (tmp_path / "big.png").write_bytes(cv2.imencode(".png", big)[1].tobytes())
    (tmp_path / "small.png").write_bytes(cv2.imencode(".png", big[:64, :64])[1].tobytes())
    keys = np.array([str(tmp_path / "big.png"), str(tmp_path / "small.png")])
    capped = ProtocolPairs(Storage(), resolve_protocol("bicubic-x4"), {}, [], None, 4 << 20, 60.0)({"key": keys})
    assert list(capped["status"]) == ["error", "ok"]
    assert "DecodeKilled" in capped["error"][0] and "more than 4,194,304 bytes; stopped" in capped["error"][0]
    plain = ProtocolPairs(Storage(), resolve_protocol("bicubic-x4"), {}, [])({"key": keys[1:]})
    np.testing.assert_array_equal(capped["lr"][1], plain["lr"][0])
    np.testing.assert_array_equal(capped["hr"][1], plain["hr"][0])


def test_protocol_parameters_are_validated_in_the_config(tmp_path):
    cfg = load_config(REPO / "configs" / "eval_nih-x4.yaml", ["eval.params.blur_sigma=0.5", "eval.params.source_size=null"])
    from medsr_dist.eval.plan import protocol_of

    protocol = protocol_of(cfg.eval)
    assert protocol.blur_sigma == 0.5 and protocol.source_size is None and protocol.scale == 4
    with pytest.raises(ConfigError, match="unknown evaluation protocol 'nih-x8'.*known: drive-x2"):
        load_config(None, ["eval.protocol=nih-x8"])
    with pytest.raises(ConfigError, match="eval.params.blur_radius: unknown key"):
        load_config(None, ["eval.params.blur_radius=2"])
    with pytest.raises(ConfigError, match="hr_size 510 is not a multiple of scale 4"):
        load_config(None, ["eval.params.hr_size=510", "eval.params.hr_resize=lanczos"])
    with pytest.raises(ConfigError, match="unique"):
        load_config(None, ["eval.models=[{name: a, source: bicubic}, {name: a, source: bicubic}]"])


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------
def test_bootstrap_interval_contains_the_true_shift_and_is_reproducible():
    rng = np.random.default_rng(7)
    covered = 0
    for trial in range(40):
        baseline = rng.normal(30.0, 2.0, size=60)  # image-to-image spread shared by both models
        model = baseline + 0.4 + rng.normal(0.0, 0.3, size=60)  # true mean difference 0.4 dB
        comp = paired_bootstrap(model, baseline, samples=2000, seed=trial)
        assert comp.ci_low <= comp.mean_difference <= comp.ci_high
        assert comp.excludes_zero  # pairing removes the shared 2 dB spread: 0.4 dB is clearly resolved
        covered += comp.ci_low <= 0.4 <= comp.ci_high
    assert covered >= 34  # nominal 95% of 40 = 38; binomial slack
    again = paired_bootstrap(model, baseline, samples=2000, seed=39)
    assert (again.ci_low, again.ci_high) == (comp.ci_low, comp.ci_high)


def test_bootstrap_of_no_difference_straddles_zero_and_skips_missing_pairs():
    rng = np.random.default_rng(1)
    a = rng.normal(0.9, 0.05, size=50)
    b = a + rng.normal(0.0, 0.01, size=50)
    values = list(a) + [None, math.inf]
    baseline = list(b) + [0.9, 0.9]
    comp = paired_bootstrap(values, baseline, samples=1000, confidence=0.9)
    assert comp.n == 50 and comp.ci_low < 0 < comp.ci_high and comp.confidence == 0.9
    assert paired_bootstrap([None], [1.0]).n == 0 and math.isnan(paired_bootstrap([None], [1.0]).mean_difference)
    one = paired_bootstrap([2.0], [1.5])
    assert (one.n, one.mean_difference, one.ci_low, one.ci_high) == (1, 0.5, 0.5, 0.5)


def test_summary_has_mean_sample_std_and_counts_only_finite_values():
    s = summarize([1.0, 2.0, 3.0, None, math.inf, math.nan])
    assert (s.n, s.mean, s.min, s.max) == (3, 2.0, 1.0, 3.0) and s.std == pytest.approx(1.0)
    assert summarize([]).n == 0 and math.isnan(summarize([5.0]).std)


# ---------------------------------------------------------------------------------------------------------
# LPIPS: available only with its backbone weights, and the report says which
# ---------------------------------------------------------------------------------------------------------
def test_lpips_without_backbone_weights_is_unavailable_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    cfg = load_config(None)
    status = check_lpips(cfg.eval.lpips)
    assert not status.available
    assert "alexnet-owt-7be5be79.pth" in status.reason and str(tmp_path / "torch-home") in status.reason
    assert "download" in status.reason
    missing = load_config(None, [f"eval.lpips.backbone={tmp_path}/nowhere.pth"])
    assert f"{tmp_path}/nowhere.pth" in check_lpips(missing.eval.lpips).reason
    assert "disabled" in check_lpips(load_config(None, ["eval.lpips.enabled=false"]).eval.lpips).reason


def test_lpips_with_a_backbone_file_is_computed_and_flags_non_imagenet_weights(tmp_path):
    backbone = random_alexnet_backbone(tmp_path / "random-alexnet-TEST-ONLY.pth")
    cfg = load_config(None, [f"eval.lpips.backbone={backbone}"])
    status = check_lpips(cfg.eval.lpips, Storage())
    assert status.available and status.imagenet is False
    assert "NOT torchvision's ImageNet alex" in status.reason and "not comparable" in status.reason
    scorer = LpipsScorer(status, Storage())
    image = gray(64, seed=3)
    noisy = np.clip(image + np.random.default_rng(0).normal(0, 0.1, image.shape), 0, 1).astype(np.float32)
    assert scorer(image, image) == pytest.approx(0.0, abs=1e-6)
    assert scorer(noisy, image) > 0
    bad = tmp_path / "not-alexnet.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    broken = check_lpips(load_config(None, [f"eval.lpips.backbone={bad}"]).eval.lpips)
    assert not broken.available and "do not load" in broken.reason and "features.0.weight" in broken.reason


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------
def test_missing_models_and_datasets_fail_before_any_ray_work(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path / "zoo-cache"))  # an empty model-zoo cache
    write_png16(tmp_path / "images" / "a.png", gray(32))
    base = [f"run.root={tmp_path}", f"eval.dataset={tmp_path / 'images'}", "eval.split=null"]
    with pytest.raises(ValueError, match="model file .*/absent/model.pth does not exist"):
        plan_evaluation(load_config(None, [*base, f"eval.models=[{{name: x, source: {tmp_path}/absent/model.pth}}]"]))
    with pytest.raises(ValueError, match="model 'RealESRGAN_x4plus' not found.*zoo-cache.*import-ncnn"):
        plan_evaluation(load_config(None, [*base, "eval.models=[{name: x4plus, source: RealESRGAN_x4plus}]"]))
    with pytest.raises(ValueError, match="no images under"):
        plan_evaluation(load_config(None, [f"run.root={tmp_path}", f"eval.dataset={tmp_path / 'empty'}", "eval.split=null"]))
    with pytest.raises(ValueError, match="no prepared split 'test'"):
        plan_evaluation(load_config(None, [f"run.root={tmp_path}", f"eval.dataset={tmp_path / 'images'}"]))
    with pytest.raises(ValueError, match="figure_images: no image named"):
        plan_evaluation(load_config(None, [*base, "eval.figure_images=[b.png]"]))
    # a zoo name resolves under eval.weights_dir (e.g. what `medsr weights import-ncnn` wrote)
    write_model(tmp_path / "weights" / "RealESRGAN_x4plus", 4)
    plan = plan_evaluation(load_config(None, [*base, "eval.models=[{name: x4plus, source: RealESRGAN_x4plus}]"]))
    assert plan.models[0].model_file.uri.endswith("weights/RealESRGAN_x4plus/model.pth")


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
def test_report_without_lpips_says_unavailable_and_keeps_error_cells(tmp_path, monkeypatch):
    """Report level: rows with an error cell and no LPIPS weights render, with reasons, never zeros."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for k in range(3):
        write_png16(tmp_path / "images" / f"im{k}.png", gray(32, seed=k))
    cfg = load_config(None, [f"run.root={tmp_path}", f"eval.dataset={tmp_path / 'images'}", "eval.split=null",
                             "eval.figures=0", "eval.bootstrap.samples=200"])
    plan = plan_evaluation(cfg, models=[EvalModel("bicubic", "bicubic"), EvalModel("net", "bicubic")])
    rows = []
    for k, item in enumerate(plan.items):
        for i, name in enumerate(("bicubic", "net")):
            failed = name == "net" and k == 1
            rows.append({"image": item["name"], "key": item["key"], "model": name, "model_index": i,
                         "status": "error" if failed else "ok", "error": "inference: RuntimeError: boom" if failed else "",
                         "psnr": math.nan if failed else 30.0 + i + k, "ssim": math.nan if failed else 0.8,
                         "lpips": math.nan, "consistency_psnr_db": 40.0, "seconds": 0.1, "figure": ""})
    report = build_report(cfg, plan, rows)
    files: dict[str, bytes] = {}
    write_eval_report(report, {}, files.__setitem__)
    assert report["summary"]["net"]["errors"] == 1 and report["summary"]["net"]["psnr"]["n"] == 2
    # bicubic is averaged over the same two images (intersection), not over its three
    assert report["summary"]["bicubic"]["psnr"]["n"] == 2 and report["summary"]["bicubic"]["psnr"]["mean"] == 31.0
    assert report["summary"]["bicubic"]["scored"] == 3 and report["common_images"] == 2
    assert report["comparisons"]["net"]["psnr"]["n"] == 2 and report["comparisons"]["net"]["psnr"]["mean_difference"] == 1.0
    table = list(csv.DictReader(io.StringIO(files["results.csv"].decode())))
    assert len(table) == 6 and {r["lpips"] for r in table if r["status"] == "ok"} == {"unavailable"}
    failed = [r for r in table if r["status"] == "error"]
    assert len(failed) == 1 and failed[0]["psnr_db"] == "" and "boom" in failed[0]["error"]
    page = files["report.html"].decode()
    assert "LPIPS: <b>unavailable</b>" in page and "alexnet-owt-7be5be79.pth" in page
    assert page.count('class="unavailable"') >= 2 and '<td class="error" title="inference: RuntimeError: boom">error</td>' in page
    assert "unavailable" in files["results.md"].decode() and json.loads(files["results.json"])["lpips"]["available"] is False
    for text in (page, files["results.md"].decode()):
        assert "over the 2 of 3 images every model scored (net scored 2)" in text


def test_figure_region_is_where_the_compared_models_disagree_and_big_panels_are_capped():
    from medsr_dist.eval.report import side_by_side

    gt = np.full((256, 256), 0.5, np.float32)
    model_a, model_b, lr = gt.copy(), gt.copy(), gt[::4, ::4].copy()
    model_a[200:232, 16:48] = 1.0  # the models disagree only here (bottom left) ...
    gt[8:40, 200:232] = 0.0  # ... while the ground truth differs from both elsewhere (top right)
    png = side_by_side([("LR", lr), ("a", model_a), ("b", model_b), ("gt", gt)], compare=[1, 2], zoom=4, max_panel=128)
    canvas = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert canvas.shape[1] == 4 * 128 + 3 * 4  # 256-pixel panels drawn at 128
    caption_h = int(np.clip(128 // 10, 14, 36))
    crops = canvas[caption_h + 128 + 4 :]  # the magnified 64 x 64 region, drawn at 128 x 128
    crop_a, crop_gt = crops[:, 132:260, 0], crops[:, 396:524, 0]
    assert (crop_a == 255).mean() == pytest.approx(0.25, abs=0.02)  # the whole 32 x 32 square of disagreement
    assert (crop_gt == 0).sum() == 0  # not the region where only the ground truth differs
    with pytest.raises(ValueError, match="two or more panel indices"):
        side_by_side([("a", gt), ("b", gt)], compare=[0])


def test_svg_plot_draws_a_point_per_value_and_a_gap_for_errors():
    svg = svg_metric_plot("PSNR (dB)", ["a", "b", "c"], {"m1": [30.0, 31.0, 29.5], "m2": [28.0, None, 27.0]})
    assert svg.startswith("<svg") and svg.count("<circle") == 5 and svg.count("<polyline") == 1
    assert "<title>m2, c: 27.00</title>" in svg


# ---------------------------------------------------------------------------------------------------------
# The Ray Data job, end to end
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def fragile_model():
    """A x4 'model' (nearest upsampling) that fails on inputs 10 pixels wide, like an out-of-memory on one image.

    Defined in a function so that Ray pickles the class by value (the test module is not importable there).
    """

    class FailsOnNarrowInputs:
        scale = 4
        size_multiple = 1

        def __call__(self, batch):
            if batch.shape[-1] == 10:
                raise RuntimeError("simulated failure on a 10-pixel-wide input")
            return np.ascontiguousarray(np.repeat(np.repeat(batch, 4, axis=2), 4, axis=3))

    return FailsOnNarrowInputs


@pytest.fixture(scope="module")
def evaluated(ray_local, tmp_path_factory):
    """One evaluation of four models on a folder of radiographs (one narrow, one corrupt) under nih-x4."""
    root = tmp_path_factory.mktemp("eval")
    images = root / "holdout"
    for k in range(4):
        write_png16(images / f"cxr{k}.png", gray(48, seed=10 + k))
    write_png16(images / "narrow.png", gray(48, seed=20)[:, :40])  # LR 12 x 10: the fragile model fails here
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    x4 = write_model(root / "models" / "tiny-x4", 4)
    x2 = write_model(root / "models" / "plain-x2", 2, meta=False)  # no meta.json: architecture read off the tensors
    backbone = random_alexnet_backbone(root / "random-alexnet-TEST-ONLY.pth")
    cfg = load_config(REPO / "configs" / "eval_nih-x4.yaml", [
        f"run.root={root}", f"eval.dataset={images}", "eval.split=null", "eval.params.source_size=null",
        "ray.progress=false", f"eval.models=[{{name: bicubic, source: bicubic}}, {{name: tiny-x4, source: {x4}}}, "
        f"{{name: plain-x2, source: {x2}}}]", "eval.figures=2", "eval.figure_images=[cxr1.png, narrow.png]",
        "eval.tile=8", "eval.tile_overlap=2", "eval.batch_size=2", "eval.cpus_per_replica=0.5",
        f"eval.lpips.backbone={backbone}", "eval.bootstrap.samples=500",
        "eval.precision=fp16",  # a CPU replica runs fp32, and the report says so
    ])
    storage = Storage(cfg.storage)
    models = [*plan_evaluation(cfg, storage).models, EvalModel("fragile", "python", factory=fragile_model())]
    plan = plan_evaluation(cfg, storage, models=models)
    result = run_evaluation(cfg, storage, plan=plan)
    return {"cfg": cfg, "result": result, "root": root, "out": Path(result.output)}


def test_every_image_and_model_gets_a_row_and_failures_are_error_cells(evaluated):
    result = evaluated["result"]
    names = ["corrupt.png", "cxr0.png", "cxr1.png", "cxr2.png", "cxr3.png", "narrow.png"]
    models = ["bicubic", "tiny-x4", "plain-x2", "fragile"]
    assert [(r["image"], r["model"]) for r in result.rows] == [(n, m) for n in names for m in models]
    errors = {(r["image"], r["model"]): r["error"] for r in result.rows if r["status"] != "ok"}
    assert set(errors) == {("corrupt.png", m) for m in models} | {("narrow.png", "fragile")}
    assert "simulated failure" in errors[("narrow.png", "fragile")] and errors[("corrupt.png", "bicubic")].startswith("input:")
    for r in result.rows:
        if r["status"] == "ok":
            assert all(np.isfinite(r[k]) for k in ("psnr", "ssim", "lpips", "consistency_psnr_db")), r
    summary = result.report["summary"]
    assert summary["fragile"]["psnr"]["n"] == 4 and summary["fragile"]["errors"] == 2
    # every model is averaged over the same 4 images (fragile failed on narrow.png), and the report says so
    assert summary["bicubic"]["psnr"]["n"] == 4 and summary["bicubic"]["scored"] == 5 and summary["fragile"]["scored"] == 4
    assert result.report["common_images"] == 4 and "4 of 6 images every model scored" in result.report["note"]
    assert "fragile scored 4" in result.report["note"]
    # the x2 network is run at x2 and Lanczos-resized to the protocol's x4 (and the report says so)
    x2 = next(m for m in result.report["models"] if m["name"] == "plain-x2")
    assert x2["native_scale"] == 2 and "resized to x4" in x2["note"]
    assert result.report["engine"]["precision"] == ("fp16" if torch.cuda.is_available() else "fp32")
    assert result.report["engine"]["revision"] == ENGINE_REVISION  # which tiling made the numbers


def test_metrics_are_the_protocol_metrics_of_the_model_outputs(evaluated):
    """The bicubic row equals PSNR/SSIM of cv2 bicubic against the protocol's ground truth, computed here."""
    from medsr_dist.eval.metrics import bicubic_upscale, psnr, ssim

    protocol = resolve_protocol("nih-x4", {"source_size": None})
    pair = protocol.make_pair(gray(48, seed=11), source_levels=65535)  # a 16-bit PNG source
    up = bicubic_upscale(pair.lr, 4)
    row = next(r for r in evaluated["result"].rows if (r["image"], r["model"]) == ("cxr1.png", "bicubic"))
    assert row["psnr"] == pytest.approx(psnr(up, pair.hr, max_value=1.0), abs=1e-3)  # 16-bit PNG round trip
    assert row["ssim"] == pytest.approx(ssim(up, pair.hr, max_value=1.0), abs=1e-4)


def test_report_files_contain_every_model_image_figure_and_comparison(evaluated):
    out = evaluated["out"]
    assert {p.name for p in out.iterdir()} >= {"report.html", "results.csv", "results.json", "results.md", "figures"}
    page = (out / "report.html").read_text()
    for model in ("bicubic", "tiny-x4", "plain-x2", "fragile"):
        assert f"<th>{model}</th>" in page
    for image in ("corrupt.png", "cxr0.png", "cxr1.png", "cxr2.png", "cxr3.png", "narrow.png"):
        assert image in page
    assert page.count('<figure><img src="data:image/png;base64,') == 2  # the two images asked for
    assert page.count("<svg") == 2 and "Paired difference with the baseline <code>bicubic</code>" in page
    assert "NOT torchvision" in page  # the test backbone is named as such
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page)  # self-contained
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == sorted(Path(figure_key(n)).name for n in ("cxr1.png", "narrow.png"))
    panel = cv2.imread(str(out / figure_key("narrow.png")), cv2.IMREAD_COLOR)
    # LR | bicubic | tiny-x4 | plain-x2 | fragile (error) | ground truth, each 48 x 40, 4 px apart; crop row below
    assert panel.shape[1] == 6 * 40 + 5 * 4 and panel.shape[0] > 2 * 48
    data = json.loads((out / "results.json").read_text())
    assert set(data["comparisons"]) == {"tiny-x4", "plain-x2", "fragile"}
    ci = data["comparisons"]["tiny-x4"]["psnr"]
    assert ci["ci_low"] <= ci["mean_difference"] <= ci["ci_high"] and ci["n"] == 4  # the images every model scored
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert len(rows) == 24 and {r["model"] for r in rows} == {"bicubic", "tiny-x4", "plain-x2", "fragile"}
    md = (out / "results.md").read_text()
    assert "| fragile |" in md and "error" in md and "## Errors" in md


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent: CI installs it with "
                    "`apt-get install -y --no-install-recommends chromium` (Debian package)")
def test_report_opens_in_headless_chromium_with_every_image_loaded(evaluated, tmp_path):
    page = (evaluated["out"] / "report.html").read_text()
    probe = ("<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
             "const ok=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;"
             "document.body.insertAdjacentHTML('beforeend',`<p id=probe>images ${ok}/${imgs.length} "
             "svgs ${document.querySelectorAll('svg circle').length}</p>`)});</script>")
    checked = tmp_path / "report-probe.html"
    checked.write_text(page.replace("</body>", probe + "</body>"))
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", checked.as_uri()],
        capture_output=True, text=True, timeout=90,
    )
    match = re.search(r"images (\d+)/(\d+) svgs (\d+)", proc.stdout)
    assert match, proc.stderr[-2000:]
    loaded, total, points = map(int, match.groups())
    assert total == 2 and loaded == total and points > 0


def test_cli_eval_runs_a_preset_on_a_prepared_split_with_models_from_the_command_line(ray_local, tmp_path):
    """`medsr eval -c configs/eval_cxr14-ldm.yaml -m NAME=SOURCE` on a prepared dataset's test split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medsr_dist.cli import app
    from medsr_dist.data.prepare import to_training_png

    split = tmp_path / "dataset" / "test"
    split.mkdir(parents=True)
    rows = [{"key": f"s3://archive/p{k}_000.png", "rel_key": f"p{k}_000.png", "image": to_training_png(gray(128, 30 + k), 16)}
            for k in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), split / "shard-0.parquet")
    model = write_model(tmp_path / "models" / "tiny", 4)
    result = CliRunner().invoke(app, [
        "eval", "-c", str(REPO / "configs" / "eval_cxr14-ldm.yaml"), "-m", f"tiny={model}",
        "eval.models=[{name: bicubic, source: bicubic, baseline: true}]",  # the file's ldm/GAN exports are not here
        f"run.root={tmp_path}", f"eval.dataset={tmp_path / 'dataset'}", "eval.params.source_size=128",
        "eval.params.hr_size=64", "ray.progress=false", "eval.figures=1", "eval.cpus_per_replica=0.5",
        f"eval.lpips.backbone={tmp_path}/absent.pth", "eval.bootstrap.samples=200",
    ])
    assert result.exit_code == 0, result.output
    out = tmp_path / "eval" / "cxr14-ldm"
    data = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in data["models"]] == ["bicubic", "tiny"]
    assert [i["name"] for i in data["images"]] == ["p0_000.png", "p1_000.png", "p2_000.png"]
    assert data["lpips"]["available"] is False and "absent.pth" in data["lpips"]["reason"]
    assert data["summary"]["tiny"]["lpips"] == "unavailable" and data["summary"]["tiny"]["psnr"]["n"] == 3
    assert data["protocol"]["hr_size"] == 64 and len(list((out / "figures").iterdir())) == 1
    assert "report:" in result.output


def test_shipped_eval_configs_select_their_presets():
    for path in sorted((REPO / "configs").glob("eval_*.yaml")):
        cfg = load_config(path)
        name = path.stem.removeprefix("eval_")
        assert cfg.eval.protocol == name
        declared = yaml.safe_load(path.read_text())["eval"]["params"]
        preset = (PRESETS.get(name) or VOLUME_PRESETS[name]).parameters()
        assert {k: preset[k] for k in declared} == declared, path.name  # the file spells out the preset


# ---------------------------------------------------------------------------------------------------------
# Real low-resolution files: lr_from paired / no_reference
# ---------------------------------------------------------------------------------------------------------
def write_png8(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels)


def hand_made_pairs(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Ground truths (128x128) and LR files (32x32) made by hand, not by any protocol: a nearest-neighbour
    decimation plus noise, so a synthetic BI input would score differently. Plus 'odd': an LR of the wrong size."""
    rng = np.random.default_rng(7)
    pairs = {}
    for k in range(2):
        hr = np.clip(make_radiograph(30 + k, 128) * 255, 0, 255).astype(np.uint8)
        lr = np.clip(hr[1::4, 2::4].astype(np.int16) + rng.integers(-6, 7, (32, 32)), 0, 255).astype(np.uint8)
        write_png8(root / "hr" / f"scan{k}.png", hr)
        write_png8(root / "lr" / f"scan{k}.png", lr)
        pairs[f"scan{k}.png"] = (hr, lr)
    write_png8(root / "hr" / "odd.png", np.zeros((128, 128), np.uint8))
    write_png8(root / "lr" / "odd.png", np.zeros((30, 32), np.uint8))
    return pairs


def test_paired_lr_files_are_scored_exactly_as_given(ray_local, tmp_path):
    from medsr_dist.eval.metrics import bicubic_upscale, haarpsi, psnr, ssim

    pairs = hand_made_pairs(tmp_path)
    cfg = load_config(REPO / "configs" / "eval_bicubic-x4.yaml", [
        f"run.root={tmp_path}", f"eval.dataset={tmp_path / 'hr'}", f"eval.lr_dataset={tmp_path / 'lr'}",
        "eval.split=null", "eval.params.lr_from=paired", "ray.progress=false", "eval.bootstrap.samples=200",
        "eval.models=[{name: bicubic, source: bicubic}]", "eval.cpus_per_replica=0.5", "eval.figures=1",
    ])
    result = run_evaluation(cfg, Storage(cfg.storage))
    rows = {r["image"]: r for r in result.rows}
    for name, (hr, lr) in pairs.items():
        up = bicubic_upscale(lr[:, :, None] / np.float32(255), 4)
        truth = hr[:, :, None] / np.float32(255)
        args = {"crop_border": 4, "test_y_channel": True, "max_value": 1.0}
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["psnr"] == pytest.approx(psnr(up, truth, **args), abs=1e-9)
        assert rows[name]["ssim"] == pytest.approx(ssim(up, truth, **args), abs=1e-9)
        assert rows[name]["haarpsi"] == pytest.approx(haarpsi(up, truth, crop_border=4, max_value=1.0), abs=1e-9)
    # the synthetic BI input of the same ground truth is a different image: the given file was used
    synthetic = resolve_protocol("bicubic-x4").make_pair(pairs["scan0.png"][0][:, :, None] / np.float32(255), 255).lr
    assert not np.allclose(synthetic[:, :, 0], pairs["scan0.png"][1] / 255, atol=2 / 255)
    odd = rows["odd.png"]
    assert odd["status"] == "error"
    assert "odd.png is 128x128 and odd.png is 32x30" in odd["error"] and "exactly x4" in odd["error"]
    assert result.report["metrics"] == ["psnr", "ssim", "lpips", "haarpsi", "consistency_psnr_db"] or \
        "haarpsi" in result.report["metrics"]
    assert "as given" in result.report["protocol"]["degradation"]
    md = (Path(result.output) / "results.md").read_text()
    assert "HaarPSI" in md


def test_paired_names_that_do_not_match_fail_before_ray_naming_the_files(tmp_path):
    hand_made_pairs(tmp_path)
    write_png8(tmp_path / "hr" / "lonely.png", np.zeros((128, 128), np.uint8))
    write_png8(tmp_path / "lr" / "stray.png", np.zeros((32, 32), np.uint8))
    cfg = load_config(None, [f"run.root={tmp_path}", f"eval.dataset={tmp_path / 'hr'}", "eval.split=null",
                             f"eval.lr_dataset={tmp_path / 'lr'}", "eval.params.lr_from=paired",
                             "eval.params.source_size=null", "eval.models=[{name: bicubic, source: bicubic}]"])
    with pytest.raises(ValueError, match=r"1 ground-truth file\(s\) without .*lonely\.png.*1 low-resolution file\(s\) "
                                         r"without a ground truth \(e\.g\. stray\.png\)"):
        plan_evaluation(cfg)
    with pytest.raises(ConfigError, match="eval.lr_dataset"):
        load_config(None, [f"eval.dataset={tmp_path / 'hr'}", "eval.split=null", "eval.params.lr_from=paired",
                           "eval.params.source_size=null"])
    with pytest.raises(ConfigError, match="synthetic input"):
        load_config(None, ["eval.split=null", f"eval.lr_dataset={tmp_path}", "eval.params.lr_from=paired",
                           "eval.params.blur_sigma=1"])


def test_no_reference_mode_scores_consistency_and_niqe_of_lr_files_without_ground_truth(ray_local, tmp_path):
    from medsr_dist.eval.metrics import bicubic_upscale, niqe
    from medsr_dist.infer.consistency import consistency_psnr

    rng = np.random.default_rng(3)
    files = {}
    for k in range(2):  # 64x64 -> 256x256 outputs: NIQE needs two 96x96 blocks after the crop border
        files[f"acq{k}.png"] = np.clip(make_radiograph(40 + k, 64) * 255 + rng.normal(0, 3, (64, 64)), 0, 255).astype(np.uint8)
        write_png8(tmp_path / "lr" / f"acq{k}.png", files[f"acq{k}.png"])
    write_png8(tmp_path / "lr" / "tiny.png", np.full((16, 16), 99, np.uint8))  # too small for NIQE
    cfg = load_config(REPO / "configs" / "eval_bicubic-x4.yaml", [
        f"run.root={tmp_path}", f"eval.dataset={tmp_path / 'lr'}", "eval.split=null", "eval.params.lr_from=no_reference",
        "ray.progress=false", "eval.bootstrap.samples=200", "eval.cpus_per_replica=0.5", "eval.figures=1",
        "eval.models=[{name: bicubic, source: bicubic}, {name: nearest, source: bicubic}]",
    ])
    result = run_evaluation(cfg, Storage(cfg.storage))
    assert result.report["metrics"] == ["consistency_psnr_db", "niqe"]
    tiny = [r for r in result.rows if r["image"] == "tiny.png"]
    assert all(r["status"] == "ok" and "NIQE needs at least two 96x96 blocks" in r["error"] and math.isnan(r["niqe"])
               and math.isfinite(r["consistency_psnr_db"]) for r in tiny), tiny
    for r in result.rows:
        if r["image"] == "tiny.png":
            continue
        assert r["status"] == "ok" and not r["error"], r
        lr = files[r["image"]][:, :, None] / np.float32(255)
        up = bicubic_upscale(lr, 4)
        assert r["niqe"] == pytest.approx(niqe(up, crop_border=4, max_value=1.0), rel=1e-9)
        assert r["consistency_psnr_db"] == pytest.approx(consistency_psnr(up, lr), rel=1e-9)
        assert math.isnan(r["psnr"]) and math.isnan(r["haarpsi"])
    md = (Path(result.output) / "results.md").read_text()
    assert "NIQE (no reference)" in md and "PSNR" not in md.split("## Per image")[0].split("| model |")[1]


def test_an_image_too_small_for_haarpsi_keeps_its_psnr_and_says_why():
    from medsr_dist.eval.evaluate import ScoreImages
    from medsr_dist.eval.perceptual import LpipsStatus

    scorer = ScoreImages([], resolve_protocol("bicubic-x4"), LpipsStatus(False, "off"), Storage(), "unused", None, 4)
    hr = np.ascontiguousarray(gray(32, seed=3)[:20, :20])  # 12 px after the crop border: less than HaarPSI needs
    scores = scorer._scores(np.clip(hr + 0.01, 0, 1), hr, hr[::4, ::4])
    assert math.isfinite(scores["psnr"]) and math.isnan(scores["haarpsi"])
    assert scores["error"].startswith("haarpsi: HaarPSI needs images of at least 16x16 pixels")
