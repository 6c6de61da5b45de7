"""Real-ESRGAN family: basicsr RRDBNet generator + UNetDiscriminatorSN, L1 + perceptual + GAN losses.

The optimisation step is Real-ESRGAN's ``RealESRGANModel.optimize_parameters`` without the data
synthesis (that lives in the Ray Data degradation stage): L1 and perceptual losses against the
USM-sharpened ground truth, the GAN losses against the plain ground truth, one D step per G step.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from types import SimpleNamespace

import torch
from torch import nn

import medsr_dist.compat  # noqa: F401  (makes basicsr importable)
from basicsr.archs import vgg_arch
from basicsr.archs.discriminator_arch import UNetDiscriminatorSN
from basicsr.archs.rrdbnet_arch import RRDBNet
from basicsr.losses.basic_loss import L1Loss, PerceptualLoss
from basicsr.losses.gan_loss import GANLoss

from medsr_dist.config import MedsrConfig
from medsr_dist.models.base import StepContext
from medsr_dist.models.weights import load_state_dict_into

log = logging.getLogger(__name__)

VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = f"https://download.pytorch.org/models/{VGG19_FILE}"
RANDOM_VGG = "random-init-for-testing"


class VGGWeightsMissing(RuntimeError):
    """The perceptual loss needs ImageNet VGG19 weights that are not available."""


def build_generator(cfg: MedsrConfig) -> RRDBNet:
    g = cfg.model.generator
    return RRDBNet(
        num_in_ch=g.num_in_ch, num_out_ch=g.num_out_ch, scale=cfg.model.scale,
        num_feat=g.num_feat, num_block=g.num_block, num_grow_ch=g.num_grow_ch,
    )


def build_discriminator(cfg: MedsrConfig) -> UNetDiscriminatorSN:
    d = cfg.model.discriminator
    return UNetDiscriminatorSN(num_in_ch=d.num_in_ch, num_feat=d.num_feat, skip_connection=d.skip_connection)


def resolve_vgg19_weights(source: str, storage=None) -> str | None:
    """Local file of ImageNet VGG19 weights for ``source``; None for the explicit random test VGG.

    ``source``: 'torchvision' (the torch hub cache under TORCH_HOME), a local path or a store URI.
    Raises :class:`VGGWeightsMissing` saying how to provide them.
    """
    if source == RANDOM_VGG:
        return None
    if source == "torchvision":
        path = os.path.join(torch.hub.get_dir(), "checkpoints", VGG19_FILE)
        if os.path.isfile(path):
            return path
        raise VGGWeightsMissing(
            f"train.vgg.weights=torchvision: {path} not found. The perceptual loss needs ImageNet VGG19 "
            f"weights: download {VGG19_URL} on a machine with internet access and copy it to {path} "
            f"(or set TORCH_HOME), or set train.vgg.weights to a local path or s3:// URI of that file. "
            f"For tests only, train.vgg.weights={RANDOM_VGG} uses a randomly initialised VGG."
        )
    if "://" in source and not source.startswith("file://"):
        from medsr_dist.storage import Storage

        storage = storage or Storage()
        cache = os.path.join(tempfile.gettempdir(), "medsr-vgg", VGG19_FILE)
        if not os.path.isfile(cache):
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            data = storage.read_bytes(source)
            tmp = f"{cache}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, cache)
        return cache
    path = source.removeprefix("file://")
    if not os.path.isfile(path):
        raise VGGWeightsMissing(f"train.vgg.weights: {source} does not exist")
    return path


@contextlib.contextmanager
def _vgg_weights_for_basicsr(path: str | None):
    """Point basicsr's VGGFeatureExtractor at ``path``; for None, at a randomly initialised VGG19.

    basicsr loads ``VGG_PRETRAIN_PATH`` when it exists and otherwise asks torchvision to download
    ImageNet weights, which must never happen silently here.
    """
    saved_path, saved_vgg = vgg_arch.VGG_PRETRAIN_PATH, vgg_arch.vgg
    try:
        if path is None:
            import torchvision.models as tvm

            vgg_arch.VGG_PRETRAIN_PATH = "/nonexistent/medsr-random-vgg"
            vgg_arch.vgg = SimpleNamespace(**{
                name: (lambda pretrained=False, _n=name: getattr(tvm, _n)(weights=None))
                for name in ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")
            })
        else:
            vgg_arch.VGG_PRETRAIN_PATH = path
        yield
    finally:
        vgg_arch.VGG_PRETRAIN_PATH, vgg_arch.vgg = saved_path, saved_vgg


def build_perceptual_loss(cfg: MedsrConfig) -> PerceptualLoss:
    path = resolve_vgg19_weights(cfg.train.vgg.weights)
    if path is None:
        log.warning("perceptual loss uses a RANDOMLY INITIALISED VGG19 (train.vgg.weights=%s): test/demo only", RANDOM_VGG)
    # fork_rng + a fixed seed: the random test VGG is the same on every rank and after a resume
    with _vgg_weights_for_basicsr(path), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return PerceptualLoss(
            layer_weights=dict(cfg.train.losses.perceptual_layers), vgg_type="vgg19", use_input_norm=True,
            range_norm=False, perceptual_weight=cfg.train.losses.perceptual_weight, style_weight=0.0, criterion="l1",
        )


class RealESRGANFamily:
    name = "realesrgan"
    inference_net = "net_g"

    def build_networks(self, cfg: MedsrConfig) -> dict[str, nn.Module]:
        net_g, net_d = build_generator(cfg), build_discriminator(cfg)
        if cfg.model.pretrained_g:
            load_state_dict_into(net_g, cfg.model.pretrained_g, storage_cfg=cfg.storage)
        if cfg.model.pretrained_d:
            load_state_dict_into(net_d, cfg.model.pretrained_d, storage_cfg=cfg.storage)
        return {"net_g": net_g, "net_d": net_d}

    def build_losses(self, cfg: MedsrConfig, device: torch.device) -> dict[str, nn.Module]:
        w = cfg.train.losses
        losses: dict[str, nn.Module] = {}
        if w.l1_weight > 0:
            losses["pix"] = L1Loss(loss_weight=w.l1_weight, reduction="mean")
        if w.perceptual_weight > 0:
            losses["percep"] = build_perceptual_loss(cfg)
        if w.gan_weight > 0:
            losses["gan"] = GANLoss(w.gan_type, real_label_val=1.0, fake_label_val=0.0, loss_weight=w.gan_weight)
        return {k: v.to(device) for k, v in losses.items()}

    def build_optimizers(self, cfg: MedsrConfig, nets: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        t = cfg.train
        return {
            "net_g": torch.optim.Adam(nets["net_g"].parameters(), lr=t.lr_g, betas=t.betas),
            "net_d": torch.optim.Adam(nets["net_d"].parameters(), lr=t.lr_d, betas=t.betas),
        }

    def train_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        lq, gt = batch["lq"], batch["gt"]
        gt_usm = batch.get("gt_usm", gt)
        net_g, net_d = ctx.nets["net_g"], ctx.nets["net_d"]
        opt_g, opt_d = ctx.optimizers["net_g"], ctx.optimizers["net_d"]
        logs: dict[str, float] = {}
        use_gan = "gan" in ctx.losses

        # ---- generator ----
        for p in ctx.raw_nets["net_d"].parameters():
            p.requires_grad_(False)
        opt_g.zero_grad(set_to_none=True)
        with torch.autocast(device_type=lq.device.type, enabled=ctx.autocast):
            output = net_g(lq)
            l_g_total = output.new_zeros(())
            if "pix" in ctx.losses:
                l_pix = ctx.losses["pix"](output, gt_usm)
                l_g_total = l_g_total + l_pix
                logs["l_g_pix"] = l_pix.item()
            if "percep" in ctx.losses:
                l_percep, _ = ctx.losses["percep"](output, gt_usm)
                l_g_total = l_g_total + l_percep
                logs["l_g_percep"] = l_percep.item()
            if use_gan:
                # The unwrapped D: its parameters take no gradient here, so DDP must not wait for them.
                fake_pred = ctx.raw_nets["net_d"](output)
                l_g_gan = ctx.losses["gan"](fake_pred, True, is_disc=False)
                l_g_total = l_g_total + l_g_gan
                logs["l_g_gan"] = l_g_gan.item()
        _backward(l_g_total, ctx.scalers.get("net_g"))
        _step(opt_g, ctx.scalers.get("net_g"))
        logs["l_g_total"] = l_g_total.item()

        # ---- discriminator ----
        if use_gan:
            for p in ctx.raw_nets["net_d"].parameters():
                p.requires_grad_(True)
            opt_d.zero_grad(set_to_none=True)
            # Real and fake each get their own forward and backward (as Real-ESRGAN does): one DDP
            # forward per backward, so each parameter's gradient is reduced once.
            with torch.autocast(device_type=lq.device.type, enabled=ctx.autocast):
                real_pred = net_d(gt)
                l_d_real = ctx.losses["gan"](real_pred, True, is_disc=True)
            _backward(l_d_real, ctx.scalers.get("net_d"))
            with torch.autocast(device_type=lq.device.type, enabled=ctx.autocast):
                fake_pred = net_d(output.detach().clone())
                l_d_fake = ctx.losses["gan"](fake_pred, False, is_disc=True)
            _backward(l_d_fake, ctx.scalers.get("net_d"))
            _step(opt_d, ctx.scalers.get("net_d"))
            logs.update(l_d_real=l_d_real.item(), l_d_fake=l_d_fake.item(),
                        out_d_real=real_pred.detach().mean().item(), out_d_fake=fake_pred.detach().mean().item())
        return logs


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


FAMILY = RealESRGANFamily()
