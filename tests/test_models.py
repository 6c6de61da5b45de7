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
from medsr_dist.models.weights import load_state_dict_into, save_basicsr_checkpoint
from medsr_dist.models.weights_error import WeightsError
from medsr_dist.train.loop import build_training, ema_update
from medsr_dist.train.strategy import DDPStrategy

TINY = ["model.generator={num_feat: 8, num_block: 1, num_grow_ch: 4}", "model.discriminator.num_feat=8",
        "train.vgg.weights=random-init-for-testing"]
CPU = torch.device("cpu")


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


def training(overrides=(), device=CPU):
    """Family step context as a worker builds it, in one process (DDP strategy without Ray Train)."""
    cfg = load_config(None, [*TINY, *overrides])
    family, strategy, ema, schedulers, losses = build_training(cfg, device, distributed=False)
    return cfg, family, StepContext(strategy=strategy, losses=losses, iteration=0)


def test_train_step_lowers_l1_on_a_fixed_batch():
    cfg, family, ctx = training(["train.lr_g=1e-3"])
    torch.manual_seed(1)
    gt = torch.rand(2, 3, 32, 32)
    batch = {"lq": torch.nn.functional.avg_pool2d(gt, 4), "gt": gt, "gt_usm": gt}
    first = family.train_step(ctx, batch)
    assert {"l_g_pix", "l_g_percep", "l_g_gan", "l_d_real", "l_d_fake"} <= set(first)
    for _ in range(15):
        last = family.train_step(ctx, batch)
    assert last["l_g_pix"] < first["l_g_pix"]


class GradientSpy(DDPStrategy):
    """Records, when G is stepped (right after the G half's backward), whether D holds any gradient."""

    def __init__(self):
        super().__init__(CPU, distributed=False)
        self.d_grads_at_g_step: list[bool] = []

    def step(self, name):
        if name == "net_g":
            self.d_grads_at_g_step.append(any(p.grad is not None for p in self.raw("net_d").parameters()))
        super().step(name)


def test_discriminator_gets_no_gradient_from_the_generator_step():
    cfg = load_config(None, [*TINY, "train.vgg.weights=random-init-for-testing"])
    family = load_family(cfg.model.family)
    torch.manual_seed(0)
    nets = family.build_networks(cfg)
    opts = family.build_optimizers(cfg, nets)
    spy = GradientSpy()
    spy.setup(nets, ["net_g", "net_d"], opts, {})
    ctx = StepContext(strategy=spy, losses=family.build_losses(cfg, CPU), iteration=0)
    gt = torch.rand(1, 3, 32, 32)
    logs = family.train_step(ctx, {"lq": torch.nn.functional.avg_pool2d(gt, 4), "gt": gt})
    assert "l_g_gan" in logs  # the G half really went through D
    assert spy.d_grads_at_g_step == [False]
    assert all(p.grad is not None for p in spy.raw("net_d").parameters())  # ... and the D half did train D
    assert all(p.requires_grad for p in spy.raw("net_d").parameters())  # frozen only during the G half


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
    cfg, family, ctx = training(["train.mixed_precision=true"], device=torch.device("cuda"))
    assert ctx.strategy.use_amp
    gt = torch.rand(2, 3, 32, 32, device="cuda")
    logs = family.train_step(ctx, {"lq": torch.nn.functional.avg_pool2d(gt, 4), "gt": gt, "gt_usm": gt})
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
