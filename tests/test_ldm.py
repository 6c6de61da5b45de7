"""Latent diffusion family (models/ldm.py, models/samplers.py, infer/diffusion_backend.py, data/ldm_pairs.py).

Fast: tiny VAE (8/16 channels) and U-Net (16 channels), 16-64 px images, few steps; nothing here starts Ray.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from medsr_dist.config import ConfigError, NoiseScheduleConfig, load_config
from medsr_dist.preflight import check_local_inputs
from medsr_dist.models import samplers
from medsr_dist.models.base import StepContext
from medsr_dist.train.loop import build_training, write_export

TINY_VAE = ["model.vae_arch.block_out_channels=[8,16,16,16]", "model.vae_arch.norm_num_groups=8"]
TINY_UNET = ["model.unet.block_out_channels=[16,16]", "model.unet.down_block_types=[DownBlock2D,AttnDownBlock2D]"]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny networks: thread start-up costs more than it buys, and the CI machine has 2 cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _vae_cfg(iterations=4, window=2, extra=()):
    return load_config(None, ["model.family=vae", *TINY_VAE, "train.vgg.weights=random-init-for-testing",
                              "degradation.gt_size=64", f"train.iterations={iterations}",
                              f"model.scale_factor_iterations={window}", *extra])


def _train(cfg, batches):
    family, strategy, ema, _, losses = build_training(cfg, torch.device("cpu"), distributed=False)
    ctx = StepContext(strategy=strategy, losses=losses)
    logs = []
    for i, batch in enumerate(batches, 1):
        ctx.iteration = i
        logs.append(family.train_step(ctx, batch))
    return family, strategy, ema, logs


def _images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, size // 8, size // 8, generator=g)
    img = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    return img.repeat(1, 3, 1, 1).clamp(0, 1)  # smooth gray "radiographs"


@pytest.fixture(scope="module")
def vae_export(tmp_path_factory):
    torch.set_num_threads(1)
    cfg = _vae_cfg()
    batches = [{"gt": (gt := _images(2, 64, i)), "lq": gt} for i in range(4)]
    family, strategy, ema, logs = _train(cfg, batches)
    d = tmp_path_factory.mktemp("vae_export")
    write_export(str(d), cfg, 4, family, {"vae": strategy.raw("vae")}, ema)
    return d / "model.pth", strategy.raw("vae"), logs


def _ldm_cfg(vae_path, extra=()):
    return load_config(None, ["model.family=ldm", *TINY_VAE, *TINY_UNET, f"model.vae={vae_path}",
                              "degradation.gt_size=64", "train.iterations=3", "model.sampling.steps=4", *extra])


@pytest.fixture(scope="module")
def ldm_export(vae_export, tmp_path_factory):
    torch.set_num_threads(1)
    cfg = _ldm_cfg(vae_export[0], ["model.sampling.samples=3"])
    batches = [{"gt": (gt := _images(2, 64, 10 + i)), "lq": torch.nn.functional.avg_pool2d(gt, 4)} for i in range(3)]
    family, strategy, ema, _ = _train(cfg, batches)
    d = tmp_path_factory.mktemp("ldm_export")
    write_export(str(d), cfg, 3, family, {k: strategy.raw(k) for k in ("unet", "vae")}, ema)
    return d / "model.pth"


# ---------------------------------------------------------------------------------------------------------
# the noise schedule and the samplers: one DDPMScheduler config
# ---------------------------------------------------------------------------------------------------------
def test_schedule_is_the_reference_and_shared_by_every_sampler():
    cfg = NoiseScheduleConfig()
    ddpm = samplers.noise_scheduler(cfg)
    betas = torch.linspace(1e-4, 0.02, 300, dtype=torch.float32)
    assert torch.allclose(ddpm.betas, betas)
    alpha_bar = torch.cumprod(1 - betas.double(), 0)
    assert torch.allclose(ddpm.alphas_cumprod.double(), alpha_bar, atol=1e-6)
    assert float(ddpm.alphas_cumprod[0]) == pytest.approx(0.9999, abs=1e-6)
    # the pitfall the family documents: the last training step is not pure noise
    assert samplers.terminal_alpha_bar(cfg) == pytest.approx(0.0481, abs=5e-4)
    assert ddpm.config.clip_sample is False
    for name in ("ddim", "dpmsolver++"):
        s = samplers.make_sampler(cfg, name)
        assert torch.allclose(s.alphas_cumprod, ddpm.alphas_cumprod)
        assert s.config.num_train_timesteps == 300 and s.config.prediction_type == "epsilon"
        assert getattr(s.config, "clip_sample", False) is False
    # trailing spacing starts the shortened samplers at T-1; diffusers' default 'leading' would start at 294
    ddim = samplers.make_sampler(cfg, "ddim")
    ddim.set_timesteps(50)
    assert int(ddim.timesteps[0]) == 299
    leading = samplers.make_sampler(cfg.model_copy(update={"timestep_spacing": "leading"}), "ddim")
    leading.set_timesteps(50)
    assert int(leading.timesteps[0]) == 294
    dpm = samplers.make_sampler(cfg, "dpmsolver++")
    dpm.set_timesteps(20)
    assert int(dpm.timesteps[0]) == 299 and dpm.config.algorithm_type == "dpmsolver++"
    zsnr = NoiseScheduleConfig(zero_terminal_snr=True, prediction_type="v_prediction")
    assert samplers.terminal_alpha_bar(zsnr) == 0.0
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.make_sampler(cfg, "euler")


def test_noise_seed_depends_on_content_index_and_run_seed():
    a, b = samplers.content_hash(torch.zeros(3, 4, 4)), samplers.content_hash(torch.ones(3, 4, 4))
    assert a != b and a == samplers.content_hash(torch.zeros(3, 4, 4))
    assert samplers.content_hash(torch.zeros(3, 4, 4)) != samplers.content_hash(torch.zeros(3, 2, 8))
    seeds = {samplers.sample_seed(c, k, s) for c in (a, b) for k in (0, 1) for s in (0, 7)}
    assert len(seeds) == 8


# ---------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------
def test_bad_configs_fail_before_any_work(vae_export, tmp_path):
    vae = vae_export[0]
    with pytest.raises(ConfigError, match=r"model\.sampling\.sampler: Input should be 'ddpm', 'ddim' or 'dpmsolver\+\+'"):
        _ldm_cfg(vae, ["model.sampling.sampler=euler"])
    with pytest.raises(ConfigError, match=r"degradation\.gt_size: 40 px gives no whole latent grid: it must be a multiple of 16"):
        _ldm_cfg(vae, ["degradation.gt_size=40"])
    with pytest.raises(ConfigError, match="zero_terminal_snr needs prediction_type v_prediction"):
        _ldm_cfg(vae, ["model.schedule.zero_terminal_snr=true"])
    with pytest.raises(ConfigError, match="sampling.steps 301 exceeds"):
        _ldm_cfg(vae, ["model.sampling.steps=301", "model.sampling.sampler=ddpm"])
    with pytest.raises(ConfigError, match=r"model\.scale: Input should be 4"):
        _ldm_cfg(vae, ["model.scale=2"])
    with pytest.raises(ConfigError, match=r"model\.vae: Field required"):
        load_config(None, ["model.family=ldm"])
    # the U-Net's latent must be the VAE's: an export of another width is refused before Ray starts
    cfg = load_config(None, ["model.family=ldm", *TINY_UNET, f"model.vae={vae}", "train.dataset=" + str(tmp_path),
                             "degradation.gt_size=64"])
    with pytest.raises(ConfigError, match=r"model\.vae_arch: .* does not match the VAE export"):
        check_local_inputs(cfg, "train")
    check_local_inputs(_ldm_cfg(vae, ["train.dataset=" + str(tmp_path)]), "train")
    with pytest.raises(ConfigError, match=r"model\.vae: path /nonexistent/vae.pth does not exist"):
        check_local_inputs(_ldm_cfg("/nonexistent/vae.pth", ["train.dataset=" + str(tmp_path)]), "train")


def test_default_unet_has_the_reference_size():
    from medsr_dist.models.ldm import LatentUNet, parameter_count

    cfg = load_config(None, ["model.family=ldm", "model.vae=x"]).model
    unet = LatentUNet(cfg.unet, 4, cfg.schedule.model_dump(), cfg.sampling.model_dump())
    n = parameter_count(unet)
    print(f"default ldm U-Net: {n:,} parameters (reference ~813k)")
    assert n == 820_220
    assert unet.unet.conv_in.in_channels == 8 and unet.unet.conv_out.out_channels == 4


# ---------------------------------------------------------------------------------------------------------
# VAE stage
# ---------------------------------------------------------------------------------------------------------
def test_vae_stage_measures_the_latent_scale_factor(vae_export):
    path, vae, logs = vae_export
    s, ss, n = vae.latent_stats.tolist()
    # the last 2 of 4 iterations, batch 2, 4 x 8 x 8 latents
    assert n == 2 * 2 * 4 * 8 * 8
    std = (ss / n - (s / n) ** 2) ** 0.5
    assert float(vae.scale_factor) == pytest.approx(1 / std, rel=1e-5)
    assert logs[-1]["latent_scale_factor"] == pytest.approx(float(vae.scale_factor), rel=1e-6)
    assert all(np.isfinite(l["recon_psnr_train"]) for l in logs)
    meta = json.loads((path.parent / "meta.json").read_text())
    assert meta["family"] == "vae" and meta["scale"] == 1 and meta["generator"]["size_multiple"] == 8
    from medsr_dist.models.ldm import load_vae

    loaded = load_vae(str(path))
    assert float(loaded.scale_factor) == float(vae.scale_factor)


def test_vae_export_without_statistics_is_refused(tmp_path):
    from medsr_dist.models.ldm import load_vae

    cfg = _vae_cfg(iterations=10, window=2, extra=["model.losses.perceptual_weight=0"])
    family, strategy, ema, _ = _train(cfg, [{"gt": (g := _images(1, 64, 0)), "lq": g}])  # stopped at iteration 1
    write_export(str(tmp_path), cfg, 1, family, {"vae": strategy.raw("vae")}, ema)
    with pytest.raises(ValueError, match="has no latent statistics"):
        load_vae(str(tmp_path / "model.pth"))


def test_vae_reconstruction_module_is_the_validation_of_the_vae_stage(vae_export):
    from medsr_dist.models.registry import load_family

    family = load_family("vae")
    module = family.inference_module({"vae": vae_export[1]})
    x = _images(1, 64, 3)
    out = module(x)
    assert out.shape == x.shape and module.size_multiple == 8


def test_diffusers_folder_vae_loads_with_its_scaling_factor(tmp_path):
    from diffusers import AutoencoderKL

    from medsr_dist.models.ldm import load_vae, vae_config
    from medsr_dist.config import VAEArchConfig

    ae = AutoencoderKL(**{**vae_config(VAEArchConfig(block_out_channels=[8, 16], norm_num_groups=8)),
                          "scaling_factor": 0.3})
    ae.save_pretrained(tmp_path / "vae")
    vae = load_vae(str(tmp_path / "vae"))
    assert float(vae.scale_factor) == pytest.approx(0.3) and vae.downsampling == 2
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ref = ae.encode(x * 2 - 1).latent_dist.mode() * 0.3
        assert torch.allclose(vae.encode(x), ref)


# ---------------------------------------------------------------------------------------------------------
# ldm stage: frozen VAE, 8-channel conditioning
# ---------------------------------------------------------------------------------------------------------
def test_ldm_vae_is_frozen_and_the_unet_sees_noisy_latent_plus_lr_latent(vae_export):
    from medsr_dist.models.ldm import upsample_lr

    cfg = _ldm_cfg(vae_export[0])
    family, strategy, ema, _, losses = build_training(cfg, torch.device("cpu"), distributed=False)
    vae, unet = strategy.raw("vae"), strategy.raw("unet")
    assert strategy.module("vae") is vae and "vae" not in strategy.trained
    assert not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(KeyError):
        strategy.optimizer("vae")
    assert set(ema) == {"unet"}
    assert unet.unet.conv_in.in_channels == 8
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    seen = {}
    hook = unet.unet.conv_in.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0].detach()))
    gt = _images(2, 64, 5)
    lq = torch.nn.functional.avg_pool2d(gt, 4)
    torch.manual_seed(0)
    family.train_step(StepContext(strategy=strategy, losses=losses, iteration=1), {"gt": gt, "lq": lq})
    hook.remove()
    for k, v in vae.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in vae.parameters())
    assert any(p.grad is not None for p in unet.parameters())
    x = seen["x"]
    assert x.shape == (2, 8, 8, 8)
    with torch.no_grad():
        cond = vae.encode(upsample_lr(lq))
    assert torch.allclose(x[:, 4:], cond, atol=1e-6)  # channels 4..7: the LR latent
    assert not torch.allclose(x[:, :4], cond, atol=1e-2)  # channels 0..3: the noisy HR latent


def test_ldm_export_round_trip_and_model_file(ldm_export):
    from medsr_dist.infer.model_file import read_model_file
    from medsr_dist.storage import Storage

    mf = read_model_file(str(ldm_export))
    assert mf.family == "ldm" and mf.scale == 4 and mf.size_multiple == 4
    module = mf.build(Storage())
    assert module.unet.sampling.samples == 3 and module.unet.schedule.num_train_timesteps == 300
    out = module(torch.rand(1, 3, 8, 8))
    assert out.shape == (1, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------------
# determinism, batching, uncertainty (through the one engine)
# ---------------------------------------------------------------------------------------------------------
def _backend(ldm_export, **kw):
    from medsr_dist.infer.model_file import build_model_backend, read_model_file
    from medsr_dist.storage import Storage

    be = build_model_backend(read_model_file(str(ldm_export)), "torch", Storage())
    for k, v in kw.items():
        setattr(be, k, v)
    return be


def test_sampling_is_bit_reproducible_and_batch_independent(ldm_export):
    be = _backend(ldm_export)
    rng = np.random.default_rng(0)
    tiles = rng.random((3, 3, 8, 8), dtype=np.float32)
    out1, std1 = be.sample(tiles)
    out2, std2 = be.sample(tiles.copy())
    assert np.array_equal(out1, out2) and np.array_equal(std1, std2)
    # a tile's noise does not depend on which tiles share its batch; the arithmetic depends on the batch *size*
    # (CPU kernels are chosen by it) by ~1e-6, so a prepared backend (as every ModelReplica prepares it) pads
    alone, _ = be.sample(tiles[1:2])
    np.testing.assert_allclose(alone[0], out1[1], atol=2e-6)
    from medsr_dist.infer.engine import TileSpec

    fresh = _backend(ldm_export)  # another instance (a rerun): the same bits
    fresh.prepare(TileSpec(batch_size=4))
    padded, padded_std = fresh.sample(tiles)
    assert padded.shape == out1.shape and padded_std.shape == std1.shape
    others = np.random.default_rng(9).random((3, 3, 8, 8), dtype=np.float32)
    for i in range(3):
        assert np.array_equal(fresh.sample(tiles[i:i + 1])[0][0], padded[i])  # alone, padded to 4
        mixed = np.concatenate([others[:i], tiles[i:i + 1], others[i:]])[:4]  # among other tiles, elsewhere
        assert np.array_equal(fresh.sample(mixed)[0][i], padded[i])
    with pytest.raises(ValueError, match="exceeds the fixed batch 4"):
        fresh.sample(np.concatenate([tiles, tiles]))
    other = _backend(ldm_export, seed=1).sample(tiles)[0]
    assert np.abs(other - out1).max() > 1e-3  # the run seed changes the noise
    assert std1.shape == out1.shape and (std1 > 0).all()


def test_uncertainty_map_is_tiled_like_the_image(ldm_export):
    from medsr_dist.infer.diffusion_backend import enhance_with_uncertainty, std_to_png16, uncertainty_p99
    from medsr_dist.infer.engine import TileSpec, enhance_array

    be = _backend(ldm_export)
    image = np.random.default_rng(1).random((12, 20), dtype=np.float32)  # gray; 12 x 20 -> 48 x 80
    spec = TileSpec(tile=8, overlap=4, blend=2, batch_size=4)
    (out, std), = list(enhance_with_uncertainty(be, [image], spec))
    assert out.shape == std.shape == (48, 80)
    assert np.array_equal(out, enhance_array(be, image, spec))  # the mean image is the plain engine output
    assert std.min() >= 0 and std.max() > 0
    # untiled, the std map is the samples' per-pixel std (gray: averaged over RGB like the image)
    whole = np.random.default_rng(2).random((8, 8), dtype=np.float32)
    (_, std_whole), = list(enhance_with_uncertainty(be, [whole], TileSpec()))
    direct = be.sample(np.repeat(whole[None, None], 3, axis=1))[1][0].mean(axis=0)
    np.testing.assert_allclose(std_whole, np.clip(direct, 0, 1), atol=1e-6)
    assert 0 < uncertainty_p99(std) <= std.max()
    png = std_to_png16(std)
    assert png.dtype == np.uint16 and png.shape == std.shape
    be.samples = 1
    (_, none), = list(enhance_with_uncertainty(be, [whole], TileSpec()))
    assert none is None


def test_onnx_export_parity_and_onnxruntime_backend(ldm_export):
    from medsr_dist.infer.diffusion_backend import onnx_part_uri
    from medsr_dist.infer.export import export_model_file
    from medsr_dist.infer.model_file import build_model_backend, read_model_file
    from medsr_dist.storage import Storage

    mf = read_model_file(str(ldm_export))
    result = export_model_file(mf, Storage())
    assert result.max_abs_diff <= 1e-4
    for part in ("unet", "vae_encoder", "vae_decoder"):
        assert os.path.exists(onnx_part_uri(mf.onnx_uri, part))
    import onnx

    unet = onnx.load(onnx_part_uri(mf.onnx_uri, "unet"))
    assert [i.name for i in unet.graph.input] == ["latent", "timestep"]
    assert unet.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 8
    ort_be = build_model_backend(mf, "onnxruntime", Storage())
    torch_be = build_model_backend(mf, "torch", Storage())
    x = np.random.default_rng(3).random((2, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(ort_be(x), torch_be(x), atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# samplers agree on a tiny trained model
# ---------------------------------------------------------------------------------------------------------
def test_ddpm_ddim_dpmsolver_agree_on_a_trained_model():
    """A U-Net trained (1,000 steps, ~10 s) on a deterministic map cond -> z0; the three samplers from the same
    seeds. Stated tolerances (MSE in latent units, target variance 0.25): DDIM-50 vs DPM-Solver++-20 <= 1e-3 (two
    solvers of the same ODE); each sampler vs the truth and DDPM-300 vs the ODE samplers <= 0.08."""
    from medsr_dist.models.ldm import DiffusionLoss, LatentUNet

    torch.manual_seed(0)
    sch = NoiseScheduleConfig()
    unet = LatentUNet({"block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "DownBlock2D"],
                       "norm_num_groups": 8}, 4, sch.model_dump(), {})
    loss_fn = DiffusionLoss(sch)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    target = lambda c: 0.5 * c.flip(1) + 0.3  # noqa: E731
    for _ in range(1000):
        c = torch.randn(32, 4, 8, 8)
        loss = loss_fn(unet, target(c), c)
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    c = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    res = {}
    for name, steps in (("ddpm", 300), ("ddim", 50), ("dpmsolver++", 20)):
        gens = [g for i in range(8) for g in samplers.generators([bytes([i])], 0, 0)]
        res[name] = samplers.sample(unet, c, sch, name, steps, gens)
    mse = lambda a, b: float(((a - b) ** 2).mean())  # noqa: E731
    report = {k: mse(v, target(c)) for k, v in res.items()}
    print("MSE vs truth:", report, "ddim-dpm:", mse(res["ddim"], res["dpmsolver++"]))
    assert mse(res["ddim"], res["dpmsolver++"]) <= 1e-3
    assert max(report.values()) <= 0.08
    assert mse(res["ddpm"], res["ddim"]) <= 0.08


# ---------------------------------------------------------------------------------------------------------
# augmentation of the pairs
# ---------------------------------------------------------------------------------------------------------
def _png(img: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", (img * 255).round().astype(np.uint8))
    assert ok
    return buf.tobytes()


def test_augmented_pairs_stay_aligned_and_are_seeded():
    from medsr_dist.config import DegradationConfig
    from medsr_dist.data.bicubic import degrade_bicubic
    from medsr_dist.data.ldm_pairs import AugmentedBicubicPairs, augment_hr

    rng = np.random.default_rng(0)
    src = rng.random((80, 90)).astype(np.float32)
    data = _png(src)
    cfg = DegradationConfig(gt_size=64)
    stage = AugmentedBicubicPairs(cfg, 4, 0)
    a, b = stage.degrade_one(data, "k", 0), stage.degrade_one(data, "k", 0)
    assert np.array_equal(a["gt"], b["gt"]) and np.array_equal(a["lq"], b["lq"])
    assert a["gt"].shape == (64, 64, 3) and a["lq"].shape == (16, 16, 3)
    # LR is the bicubic image of the augmented HR (alignment by construction)
    np.testing.assert_allclose(a["lq"], degrade_bicubic(a["gt"], cfg.bicubic, 4, np.random.default_rng(0)), atol=1e-6)
    # about 70 % of samples are augmented (every augmentation forced on the chosen ones, so changed = chosen)
    changed = 0
    always = cfg.augment.model_copy(update={"hflip": 1.0, "rotate": 0.0, "resized_crop": 1.0, "cutout": 1.0})
    for e in range(400):
        gt = np.random.default_rng(e).random((32, 32, 3)).astype(np.float32)
        keep = gt.copy()
        out = augment_hr(gt, always, np.random.default_rng(1000 + e))
        assert np.array_equal(gt, keep)  # input never modified
        changed += not np.array_equal(out, gt)
    assert 0.63 <= changed / 400 <= 0.77
    # each augmentation on its own
    gt = np.random.default_rng(1).random((40, 40, 3)).astype(np.float32)
    only = lambda **kw: cfg.augment.model_copy(update={"prob": 1.0, "hflip": 0, "rotate": 0, "resized_crop": 0,  # noqa: E731
                                                       "cutout": 0, **kw})
    assert np.array_equal(augment_hr(gt, only(hflip=1.0), np.random.default_rng(0)), gt[:, ::-1])
    rot = augment_hr(gt, only(rotate=1.0), np.random.default_rng(0))
    assert any(np.array_equal(rot, np.rot90(gt, k)) for k in (1, 2, 3))
    cut = augment_hr(gt, only(cutout=1.0), np.random.default_rng(0))
    zero = np.all(cut == 0, axis=2)
    assert zero.sum() == 8 * 8 and np.array_equal(cut[~zero], gt[~zero])
    crop = augment_hr(gt, only(resized_crop=1.0), np.random.default_rng(0))
    assert crop.shape == gt.shape and not np.array_equal(crop, gt)
    # the vae stage (scale 1): the pair is (crop, crop)
    v = AugmentedBicubicPairs(cfg, 1, 0).degrade_one(data, "k", 0)
    assert np.array_equal(v["gt"], v["lq"])


def test_shipped_ldm_configs_load():
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    vae = load_config(repo / "configs/ldm_cxr_x4_vae.yaml")
    ldm = load_config(repo / "configs/ldm_cxr_x4.yaml")
    assert vae.model.family == "vae" and ldm.model.family == "ldm"
    assert ldm.model.vae == f"{vae.train.output}/export/model.pth"  # stage 2 reads stage 1's export
    assert ldm.model.vae_arch == vae.model.vae_arch and ldm.degradation.augment == vae.degradation.augment
    assert ldm.model.schedule.num_train_timesteps == 300 and ldm.enhance.tile == 64


def test_final_vae_export_meta_records_the_scale_factor(vae_export):
    from medsr_dist.models.registry import load_family

    path, vae, _ = vae_export
    meta = load_family("vae").meta_from_weights(path.read_bytes())
    assert meta["latent_scale_factor"] == pytest.approx(float(vae.scale_factor))
    assert meta["latent_stats"]["values"] == 2 * 2 * 4 * 8 * 8
    assert meta["latent_stats"]["std"] == pytest.approx(1 / float(vae.scale_factor), rel=1e-5)


def test_loop_validation_and_pair_stage_for_both_stages(vae_export, ldm_export):
    """What the Ray Train loop does with these families besides train_step: the stream's pair stage, and validation
    through the family's inference module (vae: reconstruction PSNR at scale 1; ldm: the SR PSNR at x4)."""
    from medsr_dist.data.ldm_pairs import AugmentedBicubicPairs
    from medsr_dist.infer.model_file import read_model_file
    from medsr_dist.models.registry import load_family
    from medsr_dist.storage import Storage
    from medsr_dist.train.loop import validate
    from medsr_dist.train.trainer import pair_stage

    vae_cfg, ldm_cfg = _vae_cfg(), _ldm_cfg(vae_export[0])
    for cfg in (vae_cfg, ldm_cfg):
        assert pair_stage(cfg, paired=False) == (AugmentedBicubicPairs, ["lq", "gt"])
    gt = _images(2, 64, 9).numpy()
    vae_pairs = [{"lq": g, "gt": g} for g in gt]
    rec = validate(load_family("vae").inference_module({"vae": vae_export[1]}), vae_pairs, torch.device("cpu"), 1)
    assert np.isfinite(rec["val_psnr"]) and rec["val_psnr_bicubic"] == 100.0  # bicubic at x1 is exact: capped
    module = read_model_file(str(ldm_export)).build(Storage())
    lq = torch.nn.functional.avg_pool2d(torch.from_numpy(gt), 4).numpy()
    sr = validate(module, [{"lq": a, "gt": b} for a, b in zip(lq, gt)], torch.device("cpu"), 4)
    assert np.isfinite(sr["val_psnr"]) and np.isfinite(sr["val_psnr_bicubic"])


# ---------------------------------------------------------------------------------------------------------
# sampling settings of a run (enhance.sampling, eval.models[].sampling): part of the output's identity
# ---------------------------------------------------------------------------------------------------------
def test_sampling_overrides_run_and_key_the_outputs(ldm_export, tiny_model_dir):
    from medsr_dist.config import EnhanceConfig
    from medsr_dist.enhance.identity import output_id
    from medsr_dist.infer.provenance import enhance_params
    from medsr_dist.infer.model_file import read_model_file
    from medsr_dist.storage import Storage

    mf = read_model_file(str(ldm_export))
    assert mf.sampling == {"sampler": "ddim", "steps": 4, "samples": 3, "output": "mean", "seed": 0}
    ddpm = mf.with_sampling({"sampler": "ddpm", "steps": 300}, "enhance.sampling")
    assert ddpm.sha256 == mf.sha256 and ddpm.sampling == {**mf.sampling, "sampler": "ddpm", "steps": 300}
    assert mf.with_sampling({}, "x") is mf and mf.with_sampling(None, "x") is mf
    s = ddpm.build(Storage()).unet.sampling  # what every replica the ModelFile is pickled to samples with
    assert (s.sampler, s.steps, s.samples) == ("ddpm", 300, 3)
    e = EnhanceConfig()
    base = enhance_params(e, mf)
    assert base["sampling"] == mf.sampling and base["schedule"]["zero_terminal_snr"] is False
    ids = {output_id("0" * 64, mf.sha256, base)}
    for change in ({"sampler": "ddpm", "steps": 300}, {"steps": 5}, {"samples": 2}, {"seed": 1}, {"output": "first"}):
        ids.add(output_id("0" * 64, mf.sha256, enhance_params(e, mf.with_sampling(change))))
    assert len(ids) == 6  # every sampling setting makes another output: a DDIM-4 output is never taken for DDPM-300
    zsnr = dataclasses.replace(mf, generator={**mf.generator, "schedule": {**mf.generator["schedule"],
                                                                           "zero_terminal_snr": True}})
    assert output_id("0" * 64, mf.sha256, enhance_params(e, zsnr)) not in ids
    with pytest.raises(ValueError, match=r"enhance\.sampling\.steps: 301 exceeds the model's num_train_timesteps 300"):
        mf.with_sampling({"steps": 301}, "enhance.sampling")
    with pytest.raises(ValueError, match=r"enhance\.sampling: sampler: Input should be 'ddpm', 'ddim' or"):
        mf.with_sampling({"sampler": "euler"}, "enhance.sampling")
    gan = read_model_file(os.path.join(tiny_model_dir, "model.pth"))
    assert gan.sampling is None and "sampling" not in enhance_params(e, gan)  # other families' keys unchanged
    with pytest.raises(ValueError, match=r"enhance\.sampling: \['samples'\] apply to iterative-sampler models"):
        gan.with_sampling({"samples": 2}, "enhance.sampling")
    with pytest.raises(ConfigError, match=r"enhance\.sampling\.samples: Input should be less than or equal to 64"):
        load_config(None, ["enhance.sampling.samples=65"])
    # `medsr enhance` checks them against the model before Ray starts
    for ckpt, extra, match in ((ldm_export, "enhance.sampling.steps=301", "exceeds the model's num_train_timesteps"),
                               (gan.uri, "enhance.sampling.samples=2", "apply to iterative-sampler models")):
        with pytest.raises(ConfigError, match=match):
            check_local_inputs(load_config(None, [f"enhance.checkpoint={ckpt}", f"enhance.input={tiny_model_dir}",
                                                  extra]), "enhance")


def test_nightly_stages_write_the_uncertainty_map_beside_the_output(ldm_export, tmp_path):
    """ReadDecode -> EnhanceReplica -> EncodeCommit in this process (as Ray Data chains them) with K = 3 samples:
    each output gets its std map (16-bit PNG beside a PNG; a DICOM derived object of its own series beside a DICOM),
    the manifest row its uncertainty_p99 and key, and rows above enhance.uncertainty_threshold are flagged."""
    import cv2
    import pydicom

    from medsr_dist.infer.diffusion_backend import STD_FULL_SCALE
    from medsr_dist.enhance.commit import EncodeCommit
    from medsr_dist.enhance.read import ReadDecode
    from medsr_dist.enhance.replicas import EnhanceReplica
    from medsr_dist.enhance.spec import JobSpec
    from medsr_dist.infer.provenance import enhance_params
    from medsr_dist.infer.rows import batch_rows as _rows
    from medsr_dist.infer.model_file import read_model_file
    from medsr_dist.io.dicom import build_radiograph_dataset, dataset_to_bytes
    from medsr_dist.io.image import decode_image
    from medsr_dist.storage import Storage

    archive = tmp_path / "archive"
    archive.mkdir()
    image = _images(1, 16, 4)[0, 0].numpy()
    assert cv2.imwrite(str(archive / "a.png"), np.round(image * 65535).astype(np.uint16))
    ds = build_radiograph_dataset(image, bits_stored=12, patient_id="PID-TEST-1", series_description="CHEST PA")
    (archive / "b.dcm").write_bytes(dataset_to_bytes(ds))
    cfg = load_config(None, [f"enhance.input={archive}", f"enhance.output={tmp_path / 'out'}",
                             f"enhance.checkpoint={ldm_export}", "enhance.tile=8", "enhance.tile_overlap=2",
                             "enhance.tile_blend=1", "enhance.batch_size=4", "enhance.uncertainty_threshold=0.0"])
    e = cfg.enhance
    model = read_model_file(str(ldm_export))
    spec = JobSpec(storage=Storage(), input=str(archive), output=e.output, model=model, params=enhance_params(e, model),
                   run_id="local", threshold_db=-1e9, uncertainty_threshold=e.uncertainty_threshold)
    decoded = ReadDecode(spec)({"key": np.array([str(archive / "a.png"), str(archive / "b.dcm")])})
    replica = EnhanceReplica(model, cfg.storage, e)
    assert replica.uncertainty and replica.backend.fixed_batch == 4
    enhanced = [r for b in replica(decoded) for r in _rows(b)]
    assert replica.backend._std == {}  # every kept std tile was consumed by its image's map
    rows = {Path(r["input_key"]).name: r for r in (EncodeCommit(spec).one(r) for r in enhanced)}
    for name, r in rows.items():
        assert r["status"] == "done", r["error"]
        assert 0 < r["uncertainty_p99"] <= STD_FULL_SCALE and r["flagged"]  # threshold 0: every map flags
        assert r["uncertainty_key"] == r["output_key"].rsplit(".", 1)[0] + (".std.dcm" if name == "b.dcm" else ".std.png")
    std = decode_image(Path(rows["a.png"]["uncertainty_key"]).read_bytes(), "std")
    assert std.pixels.shape[:2] == (64, 64) and std.meta.dtype == "uint16"
    assert "3 diffusion samples" in std.meta.text["medsr:uncertainty"]
    values = std.pixels[..., 0] * STD_FULL_SCALE
    assert np.percentile(values, 99) == pytest.approx(rows["a.png"]["uncertainty_p99"], abs=1e-4)
    out_ds = pydicom.dcmread(rows["b.dcm"]["output_key"])
    std_ds = pydicom.dcmread(rows["b.dcm"]["uncertainty_key"])
    assert std_ds.SeriesInstanceUID not in (out_ds.SeriesInstanceUID, ds.SeriesInstanceUID)
    assert std_ds.SOPInstanceUID != out_ds.SOPInstanceUID and std_ds.StudyInstanceUID == ds.StudyInstanceUID
    assert list(std_ds.ImageType) == ["DERIVED", "SECONDARY", "UNCERTAINTY"] and std_ds.BitsStored == 16
    assert std_ds.SeriesDescription.endswith("[SR std]") and "standard deviation of 3" in std_ds.DerivationDescription
    assert (std_ds.Rows, std_ds.Columns) == (64, 64) and "RescaleSlope" in std_ds
    # the same night again: nothing redone, and a K = 1 run writes no map and flags nothing for it
    spec1 = JobSpec(storage=Storage(), input=str(archive), output=str(tmp_path / "k1"),
                    model=model.with_sampling({"samples": 1}), params=enhance_params(e, model.with_sampling({"samples": 1})),
                    run_id="k1", threshold_db=-1e9, uncertainty_threshold=0.0)
    one = [EncodeCommit(spec1).one(r) for b in EnhanceReplica(spec1.model, cfg.storage, e)(
        ReadDecode(spec1)({"key": np.array([str(archive / "a.png")])})) for r in _rows(b)]
    assert one[0]["status"] == "done" and one[0]["uncertainty_key"] == "" and not one[0]["flagged"]
    assert np.isnan(one[0]["uncertainty_p99"])


def test_served_ldm_answers_record_their_sampling_and_k_above_1_is_refused(ldm_export, tmp_path):
    """An LDM over Serve: the request function answers the engine's pixels with the sampler settings that drew them
    in the file's provenance and a header; a model that would sample K > 1 times is refused when the app is built
    (its uncertainty map has no place in a one-file answer)."""
    import cv2

    from medsr_dist.infer.replica import EngineSettings, ModelReplica
    from medsr_dist.io.image import decode_image
    from medsr_dist.serve.app import build_app, served_model_file
    from medsr_dist.serve.model import enhance_file
    from medsr_dist.storage import Storage

    def cfg(sampling: str):
        path = tmp_path / "serve.yaml"
        path.write_text(f"serve:\n  gpus_per_replica: 0\n  models:\n    - name: ldm-x4\n      checkpoint: {ldm_export}\n"
                        f"      sampling: {sampling}\n")
        return load_config(str(path))

    with pytest.raises(ValueError, match=r"serve\.models\[0\]\.sampling \(ldm-x4\): model .* samples K = 3 times per "
                                         r"image .* set samples: 1"):
        build_app(cfg("{steps: 2}"))  # the export's K = 3
    c = cfg("{samples: 1, steps: 2, sampler: dpmsolver++}")
    model = served_model_file(c, 0, c.serve.models[0])
    assert model.sampling == {"sampler": "dpmsolver++", "steps": 2, "samples": 1, "output": "mean", "seed": 0}
    replica = ModelReplica.load(model, Storage(), EngineSettings.of(c.serve, precision="fp32", outscale=None))
    lr = (np.random.default_rng(3).random((16, 16, 3)) * 255).astype(np.uint8)
    answer = enhance_file(replica, cv2.imencode(".png", lr)[1].tobytes(), None,
                          limits={"max_input_pixels": 1 << 20, "max_output_pixels": 1 << 22})
    assert answer["status"] == 200 and answer["media_type"] == "image/png"
    assert json.loads(answer["headers"]["X-Medsr-Sampling"]) == model.sampling
    out = decode_image(answer["body"], "answer")
    assert json.loads(out.meta.text["medsr:params"])["sampling"] == model.sampling
    assert out.pixels.shape == (64, 64, 3)
    (_, direct), = replica.enhance_each([lr[:, :, ::-1].astype(np.float32) / 255])  # the engine alone, RGB
    assert np.array_equal(out.pixels, np.rint(np.clip(direct, 0, 1) * 255) / 255)


def test_a_pacs_output_gets_each_uncertainty_map_as_its_own_series_and_never_lists_it_as_input(
        ldm_export, orthanc, tmp_path, monkeypatch):
    """K = 3 samples into a real PACS (Orthanc over DICOMweb), the stages in this process: the enhanced object and
    its std map land as two derived series of the source's study at their own UIDs (a PACS stores by UID, not beside
    a file name), read back over WADO-RS; the PACS as the next night's input lists neither; again: nothing sent."""
    import io

    import pydicom

    from medsr_dist.enhance.commit import EncodeCommit
    from medsr_dist.enhance.read import ReadDecode
    from medsr_dist.enhance.replicas import EnhanceReplica
    from medsr_dist.enhance.spec import JobSpec
    from medsr_dist.infer.provenance import enhance_params
    from medsr_dist.infer.rows import batch_rows as _rows
    from medsr_dist.enhance.plan import list_inputs
    from medsr_dist.infer.model_file import read_model_file
    from medsr_dist.io.dicom import build_radiograph_dataset, dataset_to_bytes
    from medsr_dist.pacs.storage import PacsStorage

    for name, value in orthanc.env.items():  # credentials as medsr-dist reads them
        monkeypatch.setenv(name, value)
    archive = tmp_path / "archive"
    archive.mkdir()
    ds = build_radiograph_dataset(_images(1, 16, 5)[0, 0].numpy(), bits_stored=12, patient_id="PID-TEST-2",
                                  series_description="CHEST PA")
    (archive / "b.dcm").write_bytes(dataset_to_bytes(ds))
    cfg = load_config(None, [f"enhance.input={archive}", f"enhance.output={orthanc.uri}",
                             f"enhance.manifest={tmp_path / 'manifest'}", f"enhance.checkpoint={ldm_export}",
                             "enhance.tile=8", "enhance.tile_overlap=2", "enhance.tile_blend=1", "enhance.batch_size=4"])
    e = cfg.enhance
    model = read_model_file(str(ldm_export))
    storage = PacsStorage(cfg.storage, cfg.pacs)  # what run_enhance_job uses for a DICOMweb input or output
    spec = JobSpec(storage=storage, input=str(archive), output=e.output, model=model, params=enhance_params(e, model),
                   run_id="pacs", threshold_db=-1e9, uncertainty_threshold=e.uncertainty_threshold, manifest=e.manifest)

    def night():
        decoded = ReadDecode(spec)({"key": np.array([str(archive / "b.dcm")])})
        return [EncodeCommit(spec).one(r) for b in EnhanceReplica(model, cfg.storage, e)(decoded) for r in _rows(b)]

    (row,) = night()
    assert row["status"] == "done", row["error"]
    assert row["uncertainty_key"].startswith(orthanc.uri) and "/instances/" in row["uncertainty_key"]
    stored = orthanc.series_instances()
    assert len(stored) == 2 and all(len(sops) == 1 for sops in stored.values())  # enhanced + std, nothing else
    out = pydicom.dcmread(io.BytesIO(storage.read_bytes(row["output_key"])))
    std = pydicom.dcmread(io.BytesIO(storage.read_bytes(row["uncertainty_key"])))
    assert {out.SeriesInstanceUID, std.SeriesInstanceUID} == set(stored)
    assert out.StudyInstanceUID == std.StudyInstanceUID == ds.StudyInstanceUID
    assert list(std.ImageType) == ["DERIVED", "SECONDARY", "UNCERTAINTY"] and std.SeriesDescription.endswith("[SR std]")
    assert (std.Rows, std.Columns) == (out.Rows, out.Columns) == (64, 64)
    # the PACS as input: medsr-dist's own series (enhanced and std) are not inputs of the next night
    pacs_in = load_config(None, [f"enhance.input={orthanc.uri}", f"enhance.output={tmp_path / 'elsewhere'}"]).enhance
    assert list_inputs(storage, pacs_in) == []
    # the same night again: the output is recorded and listed, so nothing is computed or sent
    (again,) = night()
    assert again["status"] == "skipped", again
    assert orthanc.series_instances() == stored
