"""Real-ESRGAN second-order degradation: shapes, seeding, and the configured probabilities."""
from __future__ import annotations

import math
from collections import Counter

import cv2
import numpy as np
import pytest

from medsr_dist.config import DegradationConfig
from medsr_dist.data.degrade import KernelSampler, SecondOrderDegradation, degrade_second_order, sample_seed
from medsr_dist.data.synthetic import make_radiograph

CFG = DegradationConfig(gt_size=32)


def binomial_ok(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def png16(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", np.rint(img * 65535).astype(np.uint16))[1].tobytes()


def test_pair_shapes_ranges_and_usm():
    gt = np.repeat(make_radiograph(1, 64)[:, :, None], 3, axis=2)
    out = degrade_second_order(gt, DegradationConfig(gt_size=64), scale=4, seed=3)
    assert out["lq"].shape == (16, 16, 3) and out["gt"].shape == out["gt_usm"].shape == (64, 64, 3)
    for name in ("lq", "gt", "gt_usm"):
        assert out[name].dtype == np.float32 and out[name].min() >= 0 and out[name].max() <= 1
    # USM sharpening raises local contrast of the ground truth used by the L1/perceptual losses
    lap = lambda x: np.abs(cv2.Laplacian(x[:, :, 0], cv2.CV_32F)).mean()  # noqa: E731
    assert lap(out["gt_usm"]) > lap(out["gt"])
    # lq values lie on the 8-bit grid, as Real-ESRGAN's final rounding leaves them
    np.testing.assert_allclose(out["lq"] * 255, np.round(out["lq"] * 255), atol=1e-3)


def test_same_sample_same_degradation_and_epochs_differ():
    gt = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    a = degrade_second_order(gt, CFG, 2, sample_seed(0, "k", 1))
    b = degrade_second_order(gt, CFG, 2, sample_seed(0, "k", 1))
    c = degrade_second_order(gt, CFG, 2, sample_seed(0, "k", 2))
    np.testing.assert_array_equal(a["lq"], b["lq"])
    assert a["log"] == b["log"]
    assert not np.array_equal(a["lq"], c["lq"])
    assert sample_seed(0, "k", 1) != sample_seed(1, "k", 1) != sample_seed(0, "j", 1)


def test_actor_stage_is_order_independent():
    """The Ray Data stage gives a sample the same pair whatever batch or actor it lands in."""
    imgs = {f"img{i}": png16(make_radiograph(i, 80)) for i in range(3)}
    stage = SecondOrderDegradation(CFG, scale=4, run_seed=7)
    batch = {"image": list(imgs.values()), "key": list(imgs), "epoch": [0, 0, 0]}
    full = stage(batch)
    assert full["lq"].shape == (3, 3, 8, 8) and full["gt"].shape == (3, 3, 32, 32)
    alone = SecondOrderDegradation(CFG, scale=4, run_seed=7)({"image": [imgs["img2"]], "key": ["img2"], "epoch": [0]})
    np.testing.assert_array_equal(alone["lq"][0], full["lq"][2])
    np.testing.assert_array_equal(alone["gt_usm"][0], full["gt_usm"][2])


def test_gt_size_must_divide_by_scale():
    with pytest.raises(ValueError, match="gt_size \\(30\\) must be divisible by model.scale \\(4\\)"):
        SecondOrderDegradation(DegradationConfig(gt_size=30), scale=4, run_seed=0)


def test_small_images_are_reflect_padded_to_gt_size():
    tiny = png16(make_radiograph(5, 64)[:20, :24])
    out = SecondOrderDegradation(CFG, 4, 0)({"image": [tiny], "key": ["t"], "epoch": [0]})
    assert out["gt"].shape == (1, 3, 32, 32)


def test_kernel_statistics_match_configured_probabilities():
    """Over many samples the kernel types and sinc use follow finetune_realesrgan_x4plus's probabilities."""
    import random

    n = 4000
    random.seed(0)
    np.random.seed(0)
    sampler = KernelSampler(DegradationConfig())
    kinds1, kinds2, final = Counter(), Counter(), 0
    for _ in range(n):
        k = sampler.sample()
        kinds1[k["kind1"]] += 1
        kinds2[k["kind2"]] += 1
        final += k["final_sinc"]
        assert k["kernel1"].shape == (21, 21) and abs(k["kernel1"].sum() - 1) < 1e-3
    cfg = DegradationConfig()
    for kinds in (kinds1, kinds2):
        assert binomial_ok(kinds["sinc"], n, cfg.sinc_prob), kinds
        for name, p in zip(cfg.kernel_list, cfg.kernel_prob):
            assert binomial_ok(kinds[name], n, (1 - cfg.sinc_prob) * p), (name, kinds)
    assert binomial_ok(final, n, cfg.final_sinc_prob)


def test_branch_statistics_of_the_full_pipeline():
    """Second blur, resize direction, noise type and final order follow the configured probabilities."""
    n = 700
    gt = np.random.default_rng(1).random((16, 16, 3), dtype=np.float32)
    cfg = DegradationConfig(gt_size=16)
    logs = [degrade_second_order(gt, cfg, 2, seed)["log"] for seed in range(n)]
    count = lambda key, value: sum(log[key] == value for log in logs)  # noqa: E731
    assert binomial_ok(count("blur2", True), n, cfg.second_blur_prob)
    for value, p in zip(("up", "down", "keep"), cfg.resize_prob):
        assert binomial_ok(count("resize1", value), n, p), value
    for value, p in zip(("up", "down", "keep"), cfg.resize_prob2):
        assert binomial_ok(count("resize2", value), n, p), value
    assert binomial_ok(count("noise1", "gaussian"), n, cfg.gaussian_noise_prob)
    assert binomial_ok(count("noise2", "gaussian"), n, cfg.gaussian_noise_prob2)
    assert binomial_ok(count("order", "sinc-then-jpeg"), n, 0.5)


def test_probabilities_are_configurable():
    cfg = DegradationConfig(gt_size=16, second_blur_prob=0.0, gaussian_noise_prob=1.0, resize_prob=[0, 0, 1])
    gt = np.random.default_rng(1).random((16, 16, 3), dtype=np.float32)
    logs = [degrade_second_order(gt, cfg, 2, seed)["log"] for seed in range(50)]
    assert not any(log["blur2"] for log in logs)
    assert all(log["noise1"] == "gaussian" and log["resize1"] == "keep" for log in logs)
