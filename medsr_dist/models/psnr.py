"""PSNR-oriented family: the generator alone, L1 loss only (RRDBNet or MSRResNet, x2/x3/x4).

The "L1" baseline of SR papers and the pre-training stage of ESRGAN / RealESRNet: its export (``params_ema``) is
the ``model.pretrained_g`` of any GAN family trained next.
"""
from __future__ import annotations

import torch
from torch import nn

import medsr_dist.compat  # noqa: F401  (before basicsr)
from medsr_dist.config import MedsrConfig
from medsr_dist.models.base import StepContext
from medsr_dist.models.generator_family import GeneratorFamily
from medsr_dist.models.registry import register_family


class PSNRFamily(GeneratorFamily):
    name = "psnr"
    has_discriminator = False

    def build_losses(self, cfg: MedsrConfig, device: torch.device) -> dict[str, nn.Module]:
        from basicsr.losses.basic_loss import L1Loss

        return {"pix": L1Loss(loss_weight=cfg.model.losses.l1_weight, reduction="mean").to(device)}

    def train_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        s = ctx.strategy
        s.zero_grad("net_g")
        with s.autocast():
            l_pix = ctx.losses["pix"](s.module("net_g")(batch["lq"]), batch["gt"])
        s.backward("net_g", l_pix)
        s.step("net_g")
        return {"l_g_pix": l_pix.item(), "l_g_total": l_pix.item()}


FAMILY = register_family("psnr")(PSNRFamily())
