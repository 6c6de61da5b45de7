"""The through-plane refiner: basicsr's MSRResNet at scale 1 (out = x + f(x), the identity at initialisation), the
cosine LR schedule, and a short training on a real volume's own slices beating the B-spline it starts from.

No Ray: the family's train step and the engine are driven directly (the Ray path is tests/test_mri_cli.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medsr_dist.config import ConfigError, load_config
from medsr_dist.infer.backends import TorchBackend
from medsr_dist.infer.engine import TileSpec
from medsr_dist.models.archs import generator_from
from medsr_dist.mri.metrics import interpolation_baseline, psnr_3d
from medsr_dist.mri.profile import BOX_SHAPE, SliceProfile
from medsr_dist.mri.reconstruct import reconstruct
from medsr_dist.mri.simulate import crop_to_multiple, degrade_axis
from medsr_dist.mri.volume import Volume

X1 = {"type": "MSRResNet", "num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_block": 2}


def test_msrresnet_x1_is_basicsr_msrresnet_and_the_identity_before_training():
    torch.manual_seed(0)
    net = generator_from(X1, 1)
    assert [k for k in net.state_dict() if not k.startswith("body.")] == [
        "conv_first.weight", "conv_first.bias", "conv_hr.weight", "conv_hr.bias", "conv_last.weight", "conv_last.bias"]
    x = torch.rand(2, 3, 13, 17)  # any size: no upsampling, no pixel-unshuffle
    assert torch.equal(net(x), x)
    with torch.no_grad():  # the residual is real: once the tail is not zero the output is x + f(x)
        net.conv_last.weight.normal_(0, 0.1)
    assert not torch.equal(net(x), x) and net(x).shape == x.shape


def test_an_untrained_refiner_reconstructs_exactly_the_bspline_interpolation():
    rng = np.random.default_rng(0)
    thick = (rng.random((12, 10, 5)) * 800).astype(np.float32)
    vol = Volume(thick, np.diag([1.0, 1.0, 4.0, 1.0]), source="thick.nii.gz")
    backend = TorchBackend(generator_from(X1, 1).eval(), scale=1, device="cpu")
    out = reconstruct(vol, backend, 4, tile=TileSpec(tile=0, batch_size=3))
    np.testing.assert_allclose(out.data, interpolation_baseline(thick, 2, 4, "bspline"), rtol=0, atol=800 * 2e-6)


def test_scale_1_msrresnet_in_the_config_tree_and_the_cosine_schedule():
    from medsr_dist.models.registry import load_family

    cfg = load_config("configs/mri_psnr_x4.yaml", ["train.iterations=10", "train.lr_schedule=cosine",
                                                   "train.lr_min_ratio=0.1"])
    assert cfg.model.generator.type == "MSRResNet" and cfg.model.scale == 1
    family = load_family("psnr")
    opts = family.build_optimizers(cfg, family.build_networks(cfg))
    sched = family.build_schedulers(cfg, opts)["net_g"]
    lrs = []
    for _ in range(10):
        opts["net_g"].step()
        sched.step()
        lrs.append(opts["net_g"].param_groups[0]["lr"])
    base = cfg.train.lr_g
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.1 * base)
    assert lrs[4] == pytest.approx(base * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 5 / 10))))
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        load_config("configs/ldm_cxr_x4.yaml", ["train.lr_schedule=cosine"])


@pytest.mark.parametrize("k, slices, true, iterations, gain", [
    (4, 64, "gaussian", 150, 0.3),
    (3.3, 66, SliceProfile(3.3, BOX_SHAPE), 400, 0.3),  # a non-integer factor: 3.3 mm slices over 1 mm voxels
    # a gap: 3 mm thick every 4 mm (less blur, aliased: the B-spline is closer, measured +0.33 dB at 400 it.)
    (4, 64, SliceProfile(3.0, BOX_SHAPE), 400, 0.2),
], ids=["x4-gaussian", "x3.3-box", "gap-3-of-4"])
def test_a_short_self_supervised_training_beats_the_bspline_on_the_through_plane_slices(k, slices, true, iterations,
                                                                                        gain):
    """SMORE in miniature on a real volume (a 48 x 48 crop of the MNI152 T1, made thick along k: x4 Gaussian, a
    non-integer 3.3 and a 3 mm box every 4 mm), trained with the profile it was made with (the estimator's
    accuracy is tests/test_mri_profile.py's): the psnr family's own train step on the volume's in-plane slices
    degraded along i or j, then every through-plane slice refined; seeded and single-threaded, so the same
    numbers every run. The non-integer case's fine grid keeps the field of view (66 = 20 x 3.3 voxels: the same
    grid as the reference)."""
    from medsr_dist.mri.sample_data import sample_volume_path
    from medsr_dist.mri.simulate import intensity_window, self_supervised_pairs
    from medsr_dist.mri.volume import read_nifti
    from medsr_dist.models.base import StepContext
    from medsr_dist.train.loop import build_training

    try:
        path = sample_volume_path("mni152_t1")  # the nilearn wheel via pip when not cached (CI starts bare)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    iso = read_nifti(path.read_bytes(), path.name).data[74:122, 92:140, 60:60 + slices].astype(np.float32)
    thick = degrade_axis(iso, 2, k, true)
    window = intensity_window(thick, k, thick.shape[2])
    pairs = list(self_supervised_pairs(thick, 2, k, true, window=window))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config("configs/mri_psnr_x4.yaml", ["model.generator.num_feat=16", "model.generator.num_block=2",
                                                       f"train.iterations={iterations}", "train.lr_g=1e-3"])
        family, strategy, ema, schedulers, losses = build_training(cfg, torch.device("cpu"), distributed=False)
        ctx = StepContext(strategy=strategy, losses=losses)
        rng = np.random.default_rng(0)
        for it in range(cfg.train.iterations):
            idx = rng.integers(len(pairs), size=8)
            tops, lefts = rng.integers(0, 44 - 32 + 1, size=(2, 8))
            crop = lambda a, i, t, l: a[t:t + 32, l:l + 32]  # noqa: E731
            lq = np.stack([crop(pairs[i].lq, i, t, l) for i, t, l in zip(idx, tops, lefts)])
            gt = np.stack([crop(pairs[i].gt, i, t, l) for i, t, l in zip(idx, tops, lefts)])
            batch = {k: torch.from_numpy(v)[:, None].repeat(1, 3, 1, 1) for k, v in (("lq", lq), ("gt", gt))}
            ctx.iteration = it + 1
            family.train_step(ctx, batch)
            for s in schedulers.values():
                s.step()
        net = strategy.raw("net_g").eval()
        out = reconstruct(Volume(thick, np.diag([1.0, 1.0, float(k), 1.0]), source="crop"),
                          TorchBackend(net, scale=1, device="cpu"), k, tile=TileSpec(tile=0, batch_size=8))
    finally:
        torch.set_num_threads(threads)
    ref = crop_to_multiple(iso, 2, k)
    assert out.data.shape == ref.shape == (48, 48, slices)
    np.testing.assert_allclose(np.diag(out.affine)[:3], [1.0, 1.0, 1.0], atol=1e-9)
    mask = ref > 0.1 * ref.max()
    bspline = psnr_3d(interpolation_baseline(thick, 2, k, "bspline"), ref, mask)
    refined = psnr_3d(out.data, ref, mask)
    assert refined > bspline + gain, (refined, bspline)


def test_rrdbnet_x1_is_refused_as_the_through_plane_refiner_wherever_one_is_chosen(tmp_path):
    """RRDBNet x1 works at a quarter resolution and cannot represent the identity: training one on MRI slice pairs,
    self-sr with one, reconstructing or running nightly volumes with one fail first, naming the key and MSRResNet;
    RRDBNet x1 for 2-D images and MSRResNet x1 for volumes stay accepted."""
    from types import SimpleNamespace

    from conftest import write_tiny_model
    from medsr_dist.mri.job import reconstruct_volume
    from medsr_dist.pipeline.mri_self_sr import self_sr
    from medsr_dist.enhance.volumes import plan_volume_job
    from medsr_dist.mri.prepare import prepare_slice_pairs
    from medsr_dist.infer.model_file import read_model_file
    from medsr_dist.mri.volume import write_nifti
    from medsr_dist.storage import Storage
    from medsr_dist.train.trainer import run_training

    rrdb = ['model.generator={"type": "RRDBNet", "num_feat": 8, "num_block": 1, "num_grow_ch": 4}']
    cfg = load_config("configs/mri_psnr_x4.yaml", [*rrdb, f"run.root={tmp_path / 'run'}",
                                                   f"prepare.output={tmp_path / 'pairs'}",
                                                   f"train.dataset={tmp_path / 'pairs'}"])
    refused = r"model.generator.type RRDBNet \(model.scale 1\): RRDBNet x1 cannot .* use model.generator.type=MSRResNet"
    with pytest.raises(ConfigError, match=refused):
        prepare_slice_pairs(cfg, cfg.mri)  # before Ray and before listing prepare.input
    with pytest.raises(ConfigError, match=refused):
        self_sr(cfg, cfg.mri, str(tmp_path / "missing.nii.gz"), str(tmp_path / "out.nii.gz"))  # before reading it
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "summary.json").write_text('{"pairs": {"train": 3}, "mri": {"factor": 4}}')
    with pytest.raises(ConfigError, match=refused):
        run_training(cfg)  # MRI pairs (their summary's mri section): before Ray
    assert load_config(None, ["model.scale=1"]).model.generator.type == "RRDBNet"  # 2-D x1 restoration untouched

    for kind in ("RRDBNet", "MSRResNet"):
        (tmp_path / kind).mkdir()
        write_tiny_model(lambda n, d, k=kind: (tmp_path / k / n).write_bytes(d), scale=1, generator=kind)
    thick = Volume((np.random.default_rng(0).random((12, 10, 5)) * 800).astype(np.float32),
                   np.diag([1.0, 1.0, 4.0, 1.0]), source="thick.nii.gz")
    (tmp_path / "thick.nii.gz").write_bytes(write_nifti(thick))
    with pytest.raises(ValueError, match=r"RRDBNet/model.pth: RRDBNet x1 cannot .*MSRResNet"):
        reconstruct_volume(cfg, cfg.mri, str(tmp_path / "thick.nii.gz"), str(tmp_path / "iso.nii.gz"),
                           str(tmp_path / "RRDBNet" / "model.pth"))
    assert not (tmp_path / "iso.nii.gz").exists()

    entries = [SimpleNamespace(uri=str(tmp_path / "thick.nii.gz"))]
    job_x1 = read_model_file(str(tmp_path / "RRDBNet" / "model.pth"), None)

    def nightly(volume_model: str):
        return load_config(None, [f"enhance.volumes.checkpoint={volume_model}"] if volume_model else [])

    with pytest.raises(ValueError, match=r"enhance.volumes.checkpoint .*RRDBNet/model.pth: RRDBNet x1 cannot .*MSRResNet"):
        plan_volume_job(nightly(str(tmp_path / "RRDBNet" / "model.pth")), Storage(), job_x1, entries, "fp32")
    fallback = plan_volume_job(nightly(""), Storage(), job_x1, entries, "fp32")  # enhance.checkpoint RRDBNet x1
    assert fallback["model"] is None and "enhance.checkpoint (used when enhance.volumes.checkpoint is empty): " \
        "RRDBNet x1 cannot" in fallback["problem"] and "set enhance.volumes.checkpoint" in fallback["problem"]
    ok = plan_volume_job(nightly(str(tmp_path / "MSRResNet" / "model.pth")), Storage(), job_x1, entries, "fp32")
    assert ok["problem"] == "" and ok["model"].generator["type"] == "MSRResNet"
