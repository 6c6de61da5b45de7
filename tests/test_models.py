"""The Real-ESRGAN family and the weights it loads: losses, one step, EMA, safe and strict loading."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from medsr_dist.config import load_config
from medsr_dist.models.base import StepContext
from medsr_dist.models.realesrgan import VGGWeightsMissing, resolve_vgg19_weights
from medsr_dist.models.registry import load_family
from medsr_dist.models.weights import WeightsError, load_state_dict_into, save_basicsr_checkpoint
from medsr_dist.train.loop import ema_update

TINY = ["model.generator={num_feat: 8, num_block: 1, num_grow_ch: 4}", "model.discriminator.num_feat=8",
        "train.vgg.weights=random-init-for-testing"]


def build(overrides=()):
    cfg = load_config(None, [*TINY, *overrides])
    family = load_family(cfg.model.family)
    torch.manual_seed(0)
    nets = family.build_networks(cfg)
    return cfg, family, nets


def test_missing_vgg_weights_stop_training_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(VGGWeightsMissing) as err:
        resolve_vgg19_weights("torchvision")
    message = str(err.value)
    assert "vgg19-dcbb9e9d.pth" in message and str(tmp_path) in message and "train.vgg.weights" in message
    with pytest.raises(VGGWeightsMissing, match="does not exist"):
        resolve_vgg19_weights(str(tmp_path / "nope.pth"))
    assert resolve_vgg19_weights("random-init-for-testing") is None


def test_train_step_lowers_l1_on_a_fixed_batch():
    cfg, family, nets = build(["train.lr_g=1e-3"])
    ctx = StepContext(nets=nets, raw_nets=nets, optimizers=family.build_optimizers(cfg, nets),
                      losses=family.build_losses(cfg, torch.device("cpu")), iteration=0)
    torch.manual_seed(1)
    gt = torch.rand(2, 3, 32, 32)
    batch = {"lq": torch.nn.functional.avg_pool2d(gt, 4), "gt": gt, "gt_usm": gt}
    first = family.train_step(ctx, batch)
    assert {"l_g_pix", "l_g_percep", "l_g_gan", "l_d_real", "l_d_fake"} <= set(first)
    for _ in range(15):
        last = family.train_step(ctx, batch)
    assert last["l_g_pix"] < first["l_g_pix"]


def test_discriminator_gets_no_gradient_from_the_generator_step():
    cfg, family, nets = build(["train.losses.perceptual_weight=0"])
    d_before = copy.deepcopy(nets["net_d"].state_dict())
    opt = family.build_optimizers(cfg, nets)
    opt["net_d"] = torch.optim.SGD(nets["net_d"].parameters(), lr=0.0)  # D step changes nothing
    ctx = StepContext(nets=nets, raw_nets=nets, optimizers=opt, losses=family.build_losses(cfg, torch.device("cpu")), iteration=0)
    gt = torch.rand(1, 3, 32, 32)
    family.train_step(ctx, {"lq": torch.nn.functional.avg_pool2d(gt, 4), "gt": gt})
    for k, v in nets["net_d"].state_dict().items():
        if "weight_orig" in k or k.endswith("bias"):
            torch.testing.assert_close(v, d_before[k])


def test_ema_update_matches_basicsr_formula():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = {k: 0.9 * v + 0.1 * b.state_dict()[k] for k, v in a.state_dict().items()}
    ema_update(a, b, 0.9)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, expected[k])


def test_weights_load_params_ema_strictly(tmp_path):
    cfg, family, nets = build()
    g = nets["net_g"]
    ema = copy.deepcopy(g)
    for p in ema.parameters():
        p.data.add_(1.0)
    path = tmp_path / "model.pth"
    save_basicsr_checkpoint(g, str(path), ema=ema)
    fresh = build()[2]["net_g"]
    load_state_dict_into(fresh, str(path))  # params_ema preferred, as Real-ESRGAN's inference does
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, ema.state_dict()[k])
    load_state_dict_into(fresh, str(path), key="params")
    torch.testing.assert_close(fresh.conv_first.weight, g.conv_first.weight)


def test_weights_mismatch_lists_missing_and_unexpected_keys(tmp_path):
    cfg, family, nets = build()
    state = {f"module.{k}": v for k, v in nets["net_g"].state_dict().items()}  # DDP prefix is understood
    state.pop("module.conv_last.weight")
    state["module.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"params": state}, path)
    with pytest.raises(WeightsError) as err:
        load_state_dict_into(build()[2]["net_g"], str(path))
    assert "conv_last.weight" in str(err.value) and "extra.weight" in str(err.value) and str(path) in str(err.value)


class Payload:
    def __reduce__(self):  # would run code if unpickled
        return (print, ("unpickled!",))


def test_weights_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    buf = io.BytesIO()
    torch.save({"params": Payload()}, buf, pickle_module=pickle)
    path.write_bytes(buf.getvalue())
    with pytest.raises(WeightsError, match="weights-only"):
        load_state_dict_into(build()[2]["net_g"], str(path))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (mixed-precision training step)")
def test_mixed_precision_step_on_gpu():
    cfg, family, nets = build(["train.mixed_precision=true"])
    device = torch.device("cuda")
    nets = {k: v.to(device) for k, v in nets.items()}
    opts = family.build_optimizers(cfg, nets)
    ctx = StepContext(nets=nets, raw_nets=nets, optimizers=opts, losses=family.build_losses(cfg, device), iteration=0,
                      autocast=True, scalers={k: torch.amp.GradScaler("cuda") for k in opts})
    gt = torch.rand(2, 3, 32, 32, device=device)
    logs = family.train_step(ctx, {"lq": torch.nn.functional.avg_pool2d(gt, 4), "gt": gt, "gt_usm": gt})
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
