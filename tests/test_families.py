"""The model families on the one loop: config validation, basicsr-exact GAN steps, the psnr -> GAN chain,
exports every inference path loads, BI pairs, and one short Ray Train run of a new family."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from medsr_dist.config import ConfigError, load_config
from medsr_dist.models.base import StepContext
from medsr_dist.models.registry import load_family
from medsr_dist.train.loop import build_training, write_export
from medsr_dist.train.strategy import DDPStrategy

CPU = torch.device("cpu")
RRDB = "model.generator={type: RRDBNet, num_feat: 8, num_block: 1, num_grow_ch: 4}"
MSRR = "model.generator={type: MSRResNet, num_feat: 8, num_block: 1}"
VGG_D = ["model.discriminator={type: VGGStyleDiscriminator, num_feat: 4, input_size: 128}", "degradation.gt_size=128"]
RANDOM_VGG = "train.vgg.weights=random-init-for-testing"
FAMILY_CASES = {  # family -> tiny overrides (every family, every generator, x2/x3/x4 among them)
    "realesrgan": ["model.family=realesrgan", RRDB, "model.discriminator.num_feat=4", "model.scale=2", RANDOM_VGG],
    "esrgan": ["model.family=esrgan", MSRR, *VGG_D, "model.scale=3", "degradation.gt_size=129", RANDOM_VGG],
    "srgan": ["model.family=srgan", MSRR, *VGG_D, "model.scale=4", RANDOM_VGG],
    "psnr": ["model.family=psnr", RRDB, "model.scale=4"],
}


def cfg_of(*overrides):
    return load_config(None, list(overrides))


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("family", ["realesrgan", "esrgan", "psnr"])
def test_rrdbnet_x3_is_refused_before_any_work(family):
    extra = VGG_D if family == "esrgan" else []
    with pytest.raises(ConfigError) as err:
        cfg_of(f"model.family={family}", "model.generator.type=RRDBNet", "model.scale=3", *extra)
    msg = str(err.value)
    assert f"model.scale: scale 3 is not supported by the {family} architecture RRDBNet" in msg
    assert "silently outputs x4" in msg


@pytest.mark.parametrize("family", ["esrgan", "srgan", "psnr"])
def test_msrresnet_does_x2_x3_x4(family):
    extra = VGG_D if family != "psnr" else []
    for scale in (2, 3, 4):
        crop = [f"degradation.gt_size={129 if scale == 3 else 128}"] if extra else []
        cfg = cfg_of(f"model.family={family}", "model.generator.type=MSRResNet", f"model.scale={scale}", *extra, *crop)
        assert cfg.model.generator.type == "MSRResNet" and cfg.model.scale == scale


def test_vgg_discriminator_input_must_match_gt_size():
    with pytest.raises(ConfigError, match=r"degradation.gt_size: 64 does not match model.discriminator.input_size 128"):
        cfg_of("model.family=esrgan", "degradation.gt_size=64")
    assert cfg_of("model.family=srgan", "degradation.gt_size=256", "model.discriminator.input_size=256")
    with pytest.raises(ConfigError, match="model.discriminator.input_size"):
        cfg_of("model.family=esrgan", "degradation.gt_size=192", "model.discriminator.input_size=192")
    # x3: 128 is no multiple of 3; the crop is 129 and D sees its first 128 px
    with pytest.raises(ConfigError, match="set degradation.gt_size=129"):
        cfg_of("model.family=srgan", "model.scale=3", "degradation.gt_size=128")
    assert cfg_of("model.family=srgan", "model.scale=3", "degradation.gt_size=129").degradation.gt_size == 129


def test_family_sections_have_their_own_keys_and_defaults():
    esrgan = cfg_of("model.family=esrgan", "degradation.gt_size=128").model
    # basicsr train_ESRGAN_x4.yml: L1 1e-2, VGG19 conv5_4 1.0, GAN 5e-3; bicubic pairs
    assert (esrgan.losses.l1_weight, esrgan.losses.perceptual_layers, esrgan.losses.gan_weight) == (1e-2, {"conv5_4": 1.0}, 5e-3)
    assert esrgan.degradation == "bicubic" and esrgan.generator.type == "RRDBNet"
    assert cfg_of("model.family=srgan", "degradation.gt_size=128").model.generator.type == "MSRResNet"
    assert cfg_of().model.degradation == "second_order"  # Real-ESRGAN keeps its pipeline
    with pytest.raises(ConfigError, match="model.discriminator: unknown key"):
        cfg_of("model.family=psnr", "model.discriminator.num_feat=8")
    with pytest.raises(ConfigError, match="train.losses: unknown key .*model.losses"):
        cfg_of("train.losses.l1_weight=0.5")


def test_shipped_family_configs_load():
    repo = Path(__file__).resolve().parent.parent
    for name, family in (("esrgan_x4.yaml", "esrgan"), ("srgan_x4.yaml", "srgan"), ("psnr_x4.yaml", "psnr")):
        assert load_config(repo / "configs" / name).model.family == family


# ------------------------------------------------------------------------------------------- GAN steps
def _basicsr_step(model_cls, family, cfg, nets, lq, gt):
    """Run basicsr's own ``optimize_parameters`` (SRGANModel / ESRGANModel) on ``nets`` in place."""
    fake = SimpleNamespace(
        net_g=nets["net_g"], net_d=nets["net_d"], lq=lq, gt=gt, net_d_iters=1, net_d_init_iters=0, ema_decay=0,
        reduce_loss_dict=lambda d: {k: float(v.detach()) for k, v in d.items()}, **{
            "cri_pix": None, "cri_perceptual": None, "cri_gan": None},
    )
    losses = family.build_losses(cfg, CPU)
    fake.cri_pix, fake.cri_perceptual, fake.cri_gan = losses.get("pix"), losses.get("percep"), losses["gan"]
    opts = family.build_optimizers(cfg, nets)
    fake.optimizer_g, fake.optimizer_d = opts["net_g"], opts["net_d"]
    model_cls.optimize_parameters(fake, current_iter=1)
    return fake.log_dict


@pytest.mark.parametrize("name", ["esrgan", "srgan"])
def test_gan_step_equals_basicsr_model(name):
    """Our step (shared GAN helper through the strategy) == basicsr's ESRGANModel / SRGANModel step: the same
    losses (relativistic average for ESRGAN, 0.5 factors included) and the same G and D weights after it."""
    import medsr_dist.compat  # noqa: F401
    from basicsr.models.esrgan_model import ESRGANModel
    from basicsr.models.srgan_model import SRGANModel

    cfg = cfg_of(f"model.family={name}", RRDB if name == "esrgan" else MSRR, *VGG_D, RANDOM_VGG, "train.lr_d=1e-3")
    family = load_family(name)
    torch.manual_seed(0)
    nets = family.build_networks(cfg)
    init = {k: copy.deepcopy(v.state_dict()) for k, v in nets.items()}
    ref = copy.deepcopy(nets)
    torch.manual_seed(3)
    gt = torch.rand(2, 3, 128, 128)
    lq = torch.nn.functional.avg_pool2d(gt, 4)

    ref_logs = _basicsr_step(ESRGANModel if name == "esrgan" else SRGANModel, family, cfg, ref, lq, gt)

    strategy = DDPStrategy(CPU, distributed=False)
    strategy.setup(nets, ["net_g", "net_d"], family.build_optimizers(cfg, nets), {})
    nets["net_d"].train()
    logs = family.train_step(StepContext(strategy=strategy, losses=family.build_losses(cfg, CPU), iteration=1),
                             {"lq": lq, "gt": gt})
    for key in ("l_g_pix", "l_g_percep", "l_g_gan", "l_d_real", "l_d_fake", "out_d_real", "out_d_fake"):
        assert logs[key] == pytest.approx(ref_logs[key], rel=1e-5, abs=1e-7), key
    for net in ("net_g", "net_d"):
        ours, theirs = nets[net].state_dict(), ref[net].state_dict()
        for k in theirs:
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6, msg=f"{net}.{k}")
        assert any(not torch.equal(init[net][k], v) for k, v in ours.items() if v.is_floating_point()), net


def test_relativistic_loss_is_esrgan_model_formula():
    """L_G^Ra and L_D^Ra on fixed predictions, against the lines of basicsr ESRGANModel.optimize_parameters."""
    from basicsr.losses.gan_loss import GANLoss

    from medsr_dist.models.gan import relativistic_d_fake_loss, relativistic_d_real_loss, relativistic_g_loss

    gan = GANLoss("vanilla", loss_weight=5e-3)
    real = torch.tensor([[0.3], [-1.2], [2.0]])
    fake = torch.tensor([[-0.5], [0.7], [0.1]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    # ESRGANModel: (cri_gan(real - mean(fake), False) + cri_gan(fake - mean(real), True)) / 2, weight 5e-3
    expected_g = 5e-3 * (bce(real - fake.mean(), torch.zeros(3, 1)) + bce(fake - real.mean(), torch.ones(3, 1))) / 2
    torch.testing.assert_close(relativistic_g_loss(gan, real, fake), expected_g)
    # D halves: is_disc=True ignores the loss weight; each times 0.5
    torch.testing.assert_close(relativistic_d_real_loss(gan, real, fake), 0.5 * bce(real - fake.mean(), torch.ones(3, 1)))
    torch.testing.assert_close(relativistic_d_fake_loss(gan, fake, real), 0.5 * bce(fake - real.mean(), torch.zeros(3, 1)))


def test_psnr_step_trains_the_generator_only():
    cfg = cfg_of(*FAMILY_CASES["psnr"], "train.lr_g=1e-3")
    family, strategy, ema, schedulers, losses = build_training(cfg, CPU, distributed=False)
    assert set(family.network_roles(cfg)) == {"net_g"} and set(ema) == {"net_g"} and set(schedulers) == {"net_g"}
    before = copy.deepcopy(strategy.raw("net_g").state_dict())
    gt = torch.rand(2, 3, 32, 32)
    logs = family.train_step(StepContext(strategy=strategy, losses=losses), {"lq": torch.nn.functional.avg_pool2d(gt, 4), "gt": gt})
    assert set(logs) == {"l_g_pix", "l_g_total"}
    assert all(not torch.equal(before[k], v) for k, v in strategy.raw("net_g").state_dict().items())


# ------------------------------------------------------------------------------------- exports, chain
def _train_and_export(cfg, folder: Path, steps: int = 2) -> Path:
    family, strategy, ema, schedulers, losses = build_training(cfg, CPU, distributed=False)
    torch.manual_seed(5)
    s = cfg.model.scale
    gt_side = cfg.degradation.gt_size if hasattr(cfg.model, "discriminator") and cfg.model.discriminator.type == "VGGStyleDiscriminator" else 12 * s
    gt = torch.rand(2, 3, gt_side, gt_side)
    batch = {"lq": torch.nn.functional.interpolate(gt, scale_factor=1 / s, mode="area"), "gt": gt, "gt_usm": gt}
    ctx = StepContext(strategy=strategy, losses=losses)
    for _ in range(steps):
        family.train_step(ctx, batch)
        from medsr_dist.train.loop import ema_update

        for k, e in ema.items():
            ema_update(e, strategy.raw(k), 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    write_export(str(folder), cfg, steps, family, {k: strategy.raw(k) for k in family.network_roles(cfg)}, ema)
    return folder / "model.pth"


@pytest.mark.parametrize("name", sorted(FAMILY_CASES))
def test_every_family_export_loads_without_family_flags(tmp_path, name):
    """export -> ModelFile (meta.json says family + architecture) -> torch backend -> engine; and ONNX."""
    from medsr_dist.infer.engine import enhance_array
    from medsr_dist.infer.export import export_model_file
    from medsr_dist.infer.model_file import build_model_backend, read_model_file
    from medsr_dist.storage import Storage

    cfg = cfg_of(*FAMILY_CASES[name])
    path = _train_and_export(cfg, tmp_path / name)
    meta = json.loads((path.parent / "meta.json").read_text())
    assert meta["family"] == name and meta["generator"]["type"] == cfg.model.generator.type
    model = read_model_file(str(path))
    assert (model.family, model.scale) == (name, cfg.model.scale)
    net = model.build(Storage())
    ema = torch.load(path, weights_only=True)["params_ema"]
    for k, v in net.state_dict().items():  # the EMA weights are what inference runs
        torch.testing.assert_close(v, ema[k])
    backend = build_model_backend(model, "torch", Storage(), device="cpu")
    image = np.random.default_rng(0).random((20, 24), dtype=np.float32)
    out = enhance_array(backend, image)
    assert out.shape == (20 * cfg.model.scale, 24 * cfg.model.scale) and np.isfinite(out).all()
    if name in ("psnr", "esrgan"):  # RRDBNet and MSRResNet through ONNX (parity is checked by the export)
        export = export_model_file(model, Storage())
        assert export.max_abs_diff <= 1e-4 and Path(export.uri).is_file()


def test_psnr_export_is_the_first_stage_of_a_gan_family(tmp_path):
    psnr = cfg_of(*FAMILY_CASES["psnr"])
    export = _train_and_export(psnr, tmp_path / "psnr")
    esrgan = cfg_of("model.family=esrgan", RRDB, *VGG_D, RANDOM_VGG, f"model.pretrained_g={export}")
    nets = load_family("esrgan").build_networks(esrgan)
    ema = torch.load(export, weights_only=True)["params_ema"]
    for k, v in nets["net_g"].state_dict().items():
        torch.testing.assert_close(v, ema[k])
    with pytest.raises(Exception, match="does not fit"):  # a psnr RRDBNet export cannot start an MSRResNet G
        load_family("srgan").build_networks(cfg_of("model.family=srgan", MSRR, *VGG_D, RANDOM_VGG, f"model.pretrained_g={export}"))


# --------------------------------------------------------------------------------------------- BI pairs
def _png(size: int, seed: int) -> bytes:
    from medsr_dist.data.synthetic import make_radiograph

    img = (make_radiograph(seed, size) * 65535).astype(np.uint16)
    return cv2.imencode(".png", img)[1].tobytes()


def test_bicubic_pairs_are_seeded_matlab_bicubic_with_optional_blur_and_noise():
    import medsr_dist.compat  # noqa: F401
    from basicsr.utils.matlab_functions import imresize

    from medsr_dist.data.bicubic import BicubicDegradation

    cfg = cfg_of("model.family=psnr", "degradation.gt_size=32")
    stage = BicubicDegradation(cfg.degradation, 4, run_seed=0)
    data = _png(64, 1)
    a, b = stage.degrade_one(data, "k", 0), stage.degrade_one(data, "k", 0)
    assert a["gt"].shape == (32, 32, 3) and a["lq"].shape == (8, 8, 3)
    np.testing.assert_array_equal(a["lq"], b["lq"])  # seeded by (run seed, key, epoch)
    np.testing.assert_allclose(a["lq"], np.clip(imresize(a["gt"], 0.25), 0, 1), atol=1e-6)
    assert not np.array_equal(stage.degrade_one(data, "k", 1)["gt"], a["gt"])  # another epoch, another crop
    noisy = BicubicDegradation(cfg_of("model.family=psnr", "degradation.gt_size=32", "degradation.bicubic.noise_sigma=[5, 5]",
                                      "degradation.bicubic.blur_sigma=[1, 1]").degradation, 4, 0).degrade_one(data, "k", 0)
    np.testing.assert_array_equal(noisy["gt"], a["gt"])
    assert 0.005 < np.abs(noisy["lq"] - a["lq"]).mean() < 0.1
    batch = stage({"image": [data, data], "key": ["k", "j"], "epoch": [0, 0]})
    assert batch["lq"].shape == (2, 3, 8, 8) and batch["gt"].shape == (2, 3, 32, 32) and "gt_usm" not in batch
    with pytest.raises(ConfigError, match="degradation.bicubic.noise_sigma"):
        cfg_of("degradation.bicubic.noise_sigma=[-1, 2]")


# ------------------------------------------------------------------------------------- Ray Train (slow)
@pytest.mark.slow
def test_esrgan_trains_under_ray_train_on_bicubic_pairs(tmp_path):
    """2 DDP workers, ESRGAN (VGG D with BatchNorm, relativistic GAN) fed by the BI stage in Ray Data: checkpoint +
    export that the inference side loads."""
    import ray

    from medsr_dist.data.bicubic import BicubicDegradation
    from medsr_dist.infer.model_file import read_model_file
    from medsr_dist.storage import Storage
    from medsr_dist.train.trainer import export_checkpoint, make_trainer

    cfg = cfg_of("model.family=esrgan", RRDB, *VGG_D, RANDOM_VGG, "ray.progress=false", f"run.root={tmp_path}",
                 "run.name=esrgan", "train.num_workers=2", "train.batch_size=1", "train.iterations=2",
                 "train.checkpoint_every=2", "train.cpus_per_worker=1", "degradation.shuffle_buffer=0")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        rows = [{"image": _png(160, i), "key": f"img{i}", "epoch": 0} for i in range(6)]
        data = ray.data.from_items(rows).map_batches(
            BicubicDegradation, fn_constructor_args=(cfg.degradation, cfg.model.scale, cfg.run.seed), batch_size=2,
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1).select_columns(["lq", "gt"])
        result = make_trainer(cfg, Storage(), {"train": data}).fit()
        state = torch.load(Path(result.checkpoint.path) / "state.pt", weights_only=True)
        assert state["iteration"] == 2 and set(state["nets"]) == {"net_g", "net_d"} and set(state["ema"]) == {"net_g"}
        assert {"l_g_gan", "l_d_real", "l_d_fake"} <= set(result.metrics)
        export, _ = export_checkpoint(result.checkpoint, cfg, Storage())
    finally:
        ray.shutdown()
    model = read_model_file(export)
    assert (model.family, model.scale) == ("esrgan", 4)
    model.build(Storage())
