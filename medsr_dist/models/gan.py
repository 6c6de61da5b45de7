"""The GAN step shared by every GAN family (Real-ESRGAN, ESRGAN, SRGAN), written against the strategy only.

One step = the generator half, then the discriminator half, as basicsr's ``SRGANModel`` / ``ESRGANModel`` /
``RealESRGANModel.optimize_parameters`` do:

* G: inside ``strategy.frozen(D)`` (D's parameters take no gradient, and a DeepSpeed ZeRO-2 D engine sees no
  gradient hooks fire), G's output against ``gt_pix`` (L1, perceptual) and the GAN loss through the *unwrapped*
  D (no DDP synchronisation for a net that is not being updated); one backward, one G step.
* D: real and fake each get their own forward and backward (one forward per backward, so DDP reduces each
  gradient once), then one D step. Relativistic average GAN (ESRGAN) compares each prediction with the mean
  prediction of the other kind, exactly as ``ESRGANModel`` does, including its 0.5 factors.
"""
from __future__ import annotations

import torch
from torch import nn

from medsr_dist.config import MedsrConfig
from medsr_dist.models.base import StepContext
from medsr_dist.models.generator_family import GeneratorFamily
from medsr_dist.models.perceptual import build_perceptual_loss


def relativistic_g_loss(gan: nn.Module, real_pred: torch.Tensor, fake_pred: torch.Tensor) -> torch.Tensor:
    """ESRGANModel's L_G^Ra: ``real_pred`` detached, ``fake_pred`` = D(G(lq)) with gradients to G."""
    l_g_real = gan(real_pred - torch.mean(fake_pred), False, is_disc=False)
    l_g_fake = gan(fake_pred - torch.mean(real_pred), True, is_disc=False)
    return (l_g_real + l_g_fake) / 2


def relativistic_d_real_loss(gan: nn.Module, real_pred: torch.Tensor, fake_pred_detached: torch.Tensor) -> torch.Tensor:
    """ESRGANModel's real half of L_D^Ra (weighted 0.5)."""
    return gan(real_pred - torch.mean(fake_pred_detached), True, is_disc=True) * 0.5


def relativistic_d_fake_loss(gan: nn.Module, fake_pred: torch.Tensor, real_pred_detached: torch.Tensor) -> torch.Tensor:
    """ESRGANModel's fake half of L_D^Ra (weighted 0.5)."""
    return gan(fake_pred - torch.mean(real_pred_detached), False, is_disc=True) * 0.5


def gan_train_step(ctx: StepContext, lq: torch.Tensor, gt: torch.Tensor, gt_pix: torch.Tensor, *,
                   relativistic: bool, g: str = "net_g", d: str = "net_d") -> dict[str, float]:
    """One G step and one D step.

    Args:
        lq: (B, 3, h, w) in [0, 1]; gt: (B, 3, h*s, w*s) in [0, 1], what D sees as real;
        gt_pix: target of the L1 and perceptual losses (Real-ESRGAN: the USM-sharpened gt; others: gt).
        relativistic: ESRGAN's relativistic average GAN; False: the standard GAN of SRGAN / Real-ESRGAN.
    Losses used (when present in ``ctx.losses``): ``pix``, ``percep``, ``gan``. Without ``gan`` only G is stepped.
    Returns the step's scalar logs (``l_g_*``, ``l_d_*``, ``out_d_*``).
    """
    s, losses = ctx.strategy, ctx.losses
    use_gan = "gan" in losses
    logs: dict[str, float] = {}
    # A fixed-input D (VGGStyleDiscriminator: 128/256 px) at x3 gets 129/258 px crops: it sees their first
    # input_size pixels, real and fake alike. Contiguous NCHW: VGGStyleDiscriminator flattens with .view(), which
    # fails on the channels-last outputs oneDNN convolutions can return (a no-op for contiguous tensors).
    d_size = getattr(s.raw(d), "input_size", None) if use_gan else None
    if d_size and gt.shape[-1] != d_size:
        for_d = lambda x: x[..., :d_size, :d_size].contiguous()  # noqa: E731
    else:
        for_d = lambda x: x.contiguous()  # noqa: E731
    gt_d = for_d(gt)

    # ---- generator ----
    with s.frozen(d) if use_gan else _null():
        s.zero_grad(g)
        with s.autocast():
            output = s.module(g)(lq)
            l_g_total = output.new_zeros(())
            if "pix" in losses:
                l_pix = losses["pix"](output, gt_pix)
                l_g_total = l_g_total + l_pix
                logs["l_g_pix"] = l_pix.item()
            if "percep" in losses:
                l_percep, _ = losses["percep"](output, gt_pix)
                l_g_total = l_g_total + l_percep
                logs["l_g_percep"] = l_percep.item()
            if use_gan:
                net_d = s.raw(d)  # frozen here: no DDP/engine bookkeeping for it
                if relativistic:
                    real_pred = net_d(gt_d).detach()
                    fake_pred = net_d(for_d(output))
                    l_g_gan = relativistic_g_loss(losses["gan"], real_pred, fake_pred)
                else:
                    l_g_gan = losses["gan"](net_d(for_d(output)), True, is_disc=False)
                l_g_total = l_g_total + l_g_gan
                logs["l_g_gan"] = l_g_gan.item()
        s.backward(g, l_g_total)
    s.step(g)
    logs["l_g_total"] = l_g_total.item()
    if not use_gan:
        return logs

    # ---- discriminator ----
    net_d = s.module(d)
    s.zero_grad(d)
    fake = for_d(output.detach())
    if relativistic:
        with torch.no_grad(), s.autocast():  # ESRGANModel's detached D(output): values only, no backward
            fake_pred_ref = net_d(fake)
        with s.autocast():
            real_pred = net_d(gt_d)
            l_d_real = relativistic_d_real_loss(losses["gan"], real_pred, fake_pred_ref)
        s.backward(d, l_d_real)
        with s.autocast():
            fake_pred = net_d(fake)
            l_d_fake = relativistic_d_fake_loss(losses["gan"], fake_pred, real_pred.detach())
        s.backward(d, l_d_fake)
    else:
        with s.autocast():
            real_pred = net_d(gt_d)
            l_d_real = losses["gan"](real_pred, True, is_disc=True)
        s.backward(d, l_d_real)
        with s.autocast():
            fake_pred = net_d(fake.clone())
            l_d_fake = losses["gan"](fake_pred, False, is_disc=True)
        s.backward(d, l_d_fake)
    s.step(d)
    logs.update(l_d_real=l_d_real.item(), l_d_fake=l_d_fake.item(),
                out_d_real=real_pred.detach().mean().item(), out_d_fake=fake_pred.detach().mean().item())
    return logs


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class GANFamily(GeneratorFamily):
    """A single-generator GAN family: L1 + perceptual + GAN losses from ``model.losses``, :func:`gan_train_step`."""

    has_discriminator = True
    relativistic = False
    #: Real-ESRGAN computes L1/perceptual against the USM-sharpened gt
    pixel_target = "gt"

    def build_losses(self, cfg: MedsrConfig, device: torch.device) -> dict[str, nn.Module]:
        from basicsr.losses.basic_loss import L1Loss
        from basicsr.losses.gan_loss import GANLoss

        w = cfg.model.losses
        losses: dict[str, nn.Module] = {}
        if w.l1_weight > 0:
            losses["pix"] = L1Loss(loss_weight=w.l1_weight, reduction="mean")
        if w.perceptual_weight > 0:
            losses["percep"] = build_perceptual_loss(cfg)
        if w.gan_weight > 0:
            losses["gan"] = GANLoss(w.gan_type, real_label_val=1.0, fake_label_val=0.0, loss_weight=w.gan_weight)
        return {k: v.to(device) for k, v in losses.items()}

    def train_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        gt = batch["gt"]
        gt_pix = batch.get("gt_usm", gt) if self.pixel_target == "gt_usm" else gt
        return gan_train_step(ctx, batch["lq"], gt, gt_pix, relativistic=self.relativistic)
