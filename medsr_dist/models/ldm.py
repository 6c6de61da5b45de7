"""Latent diffusion super-resolution (x4 chest X-ray, 64 -> 256) in two stages, both through the one training loop.

Stage ``vae`` (family ``vae``): a diffusers ``AutoencoderKL`` (3 x 256 x 256 in [-1, 1] -> 4 x 32 x 32 with the
default four levels) trained on HR crops with L1 + perceptual (VGG19 features) + KL, as MONAI's latent-diffusion
tutorials do. The pairs are (crop, crop) (``model.scale`` 1), so the loop's validation PSNR *is* the VAE's own
reconstruction PSNR — the ceiling of the whole model's fidelity. Over the last ``model.scale_factor_iterations``
iterations the posterior samples' moments are accumulated; the latent scale factor 1/std is kept in the VAE's
``scale_factor`` buffer (so it travels in the export's weights and every checkpoint). The adversarial term of the
tutorials is not offered.

Stage ``ldm`` (family ``ldm``): ``model.vae`` names the VAE (a ``vae`` export, or a local diffusers folder loaded
with ``AutoencoderKL.from_pretrained``, e.g. one a site downloaded elsewhere). The VAE is **frozen** (role
``trained=False``: the strategy never wraps it, it has no grads, no optimiser). A diffusers ``UNet2DModel(in=8,
out=4)`` sees [noisy HR latent, LR latent] where the LR latent is the LR bicubic-upsampled x4 to the HR grid
(:func:`upsample_lr`) and encoded with the posterior mean. Loss: MSE on epsilon (or v with zero-terminal-SNR).
The reference's LPIPS-between-noises loss is *not* offered: LPIPS compares natural-image features, and noise
fields are not images (it needs ImageNet backbone weights we cannot fetch here, and its gradient on Gaussian noise
is not a meaningful denoising objective).

Inference: :class:`LatentDiffusionSR` (the family's inference module: (B, 3, h, w) in [0, 1] -> (B, 3, 4h, 4w))
draws ``sampling.samples`` samples per tile with the configured sampler, all tiles of a batch sharing every
denoising step; :mod:`medsr_dist.infer.diffusion_backend` is the engine Backend around it (std map, ONNX U-Net),
registered as this family's Backend, and :mod:`medsr_dist.infer.diffusion_export` its ONNX export.

Export ``medsr-ldm``: a torch file ``{"params": {"unet.*", "vae.*"}, "params_ema": {"unet.*" (EMA), "vae.*"}}``
with meta.json recording the U-Net, the VAE's diffusers config, the noise schedule and the sampling settings.
"""
from __future__ import annotations

import io
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

import medsr_dist.compat  # noqa: F401  (before basicsr)
from medsr_dist.config import (
    LDMModelConfig, MedsrConfig, NoiseScheduleConfig, SamplingConfig, UNetArchConfig, VAEArchConfig,
)
from medsr_dist.models import samplers
from medsr_dist.models.base import ModelFamily, NetworkRole, StepContext
from medsr_dist.models.registry import register_family
from medsr_dist.models.weights_error import WeightsError
from medsr_dist.storage import Storage

SCALE = 4


# ----------------------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------------------
def vae_config(arch: VAEArchConfig | dict) -> dict:
    """The diffusers ``AutoencoderKL`` kwargs of ``model.vae_arch``."""
    a = arch if isinstance(arch, VAEArchConfig) else VAEArchConfig.model_validate(arch)
    n = len(a.block_out_channels)
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": list(a.block_out_channels),
            "layers_per_block": a.layers_per_block, "latent_channels": a.latent_channels,
            "norm_num_groups": a.norm_num_groups, "sample_size": 256}


class LatentVAE(nn.Module):
    """A diffusers ``AutoencoderKL`` with the latent scale factor and its statistics as buffers.

    Images cross this module in [0, 1] RGB (B, 3, H, W); the autoencoder itself sees [-1, 1]. Latents leave it
    *scaled* (multiplied by ``scale_factor``), (B, latent_channels, H/f, W/f).
    """

    def __init__(self, config: dict, autoencoder: nn.Module | None = None, scale_factor: float = 1.0):
        super().__init__()
        from diffusers import AutoencoderKL

        self.config = dict(config)
        self.vae = autoencoder if autoencoder is not None else AutoencoderKL(**self.config)
        self.downsampling = 2 ** (len(self.config["block_out_channels"]) - 1)
        self.latent_channels = int(self.config["latent_channels"])
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor), dtype=torch.float32))
        # sum, sum of squares, count of posterior-sample values (float64: millions of values)
        self.register_buffer("latent_stats", torch.zeros(3, dtype=torch.float64))

    @classmethod
    def from_pretrained(cls, path: str) -> "LatentVAE":
        """A local diffusers folder (``config.json`` + weights); scale factor: its config's ``scaling_factor``."""
        from diffusers import AutoencoderKL

        ae = AutoencoderKL.from_pretrained(path)
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in ae.config.items() if not k.startswith("_")}
        return cls(cfg, autoencoder=ae, scale_factor=float(ae.config.scaling_factor))

    def posterior(self, x01: torch.Tensor):
        return self.vae.encode(x01 * 2 - 1).latent_dist

    def encode(self, x01: torch.Tensor, *, sample: bool = False, generator=None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> scaled latents: a posterior sample (training targets) or its mean."""
        post = self.posterior(x01)
        z = post.sample(generator=generator) if sample else post.mode()
        return z * self.scale_factor

    def decode(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B, 3, H, W) images in ~[0, 1] (not clamped)."""
        return (self.vae.decode(z_scaled / self.scale_factor).sample + 1) / 2

    def forward(self, x01: torch.Tensor):
        """Training forward (the ``vae`` stage): returns (reconstruction in [0, 1] unclamped, posterior mean,
        posterior log-variance, the unscaled posterior sample that was decoded)."""
        post = self.posterior(x01)
        z = post.sample()
        return (self.vae.decode(z).sample + 1) / 2, post.mean, post.logvar, z

    @torch.no_grad()
    def accumulate_stats(self, z: torch.Tensor) -> None:
        z = z.detach().double()
        self.latent_stats += torch.stack([z.sum(), (z * z).sum(), torch.tensor(float(z.numel()), dtype=torch.float64,
                                                                               device=z.device)])
        s, ss, n = self.latent_stats.tolist()
        var = max(ss / n - (s / n) ** 2, 1e-12)
        self.scale_factor.fill_(1.0 / math.sqrt(var))

    @property
    def stats_count(self) -> int:
        return int(self.latent_stats[2].item())


class VAEReconstruction(nn.Module):
    """The ``vae`` family's inference module: (B, 3, H, W) in [0, 1] -> its reconstruction (posterior mean)."""

    size_multiple: int

    def __init__(self, vae: LatentVAE):
        super().__init__()
        self.vae = vae
        self.size_multiple = vae.downsampling

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.vae.encode(x01))


class LatentUNet(nn.Module):
    """diffusers ``UNet2DModel(in_channels=2C, out_channels=C)``; ``forward(x, t)`` returns the prediction tensor
    (B, C, h, w) (a plain tensor: what DDP and the ONNX exporter want). Holds the schedule/sampling settings
    it was trained with (plain attributes, copied with the EMA copy)."""

    def __init__(self, arch: UNetArchConfig | dict, latent_channels: int, schedule: dict, sampling: dict):
        super().__init__()
        from diffusers import UNet2DModel

        a = arch if isinstance(arch, UNetArchConfig) else UNetArchConfig.model_validate(arch)
        up = [t.replace("Down", "Up") for t in reversed(a.down_block_types)]
        self.unet = UNet2DModel(
            sample_size=32, in_channels=2 * latent_channels, out_channels=latent_channels,
            block_out_channels=tuple(a.block_out_channels), layers_per_block=a.layers_per_block,
            down_block_types=tuple(a.down_block_types), up_block_types=tuple(up),
            attention_head_dim=a.attention_head_dim, norm_num_groups=a.norm_num_groups,
        )
        self.downsampling = a.downsampling
        self.latent_channels = latent_channels
        self.schedule = NoiseScheduleConfig.model_validate(schedule)
        self.sampling = SamplingConfig.model_validate(sampling)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, return_dict=False)[0]


def upsample_lr(lq: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    """The LR condition on the HR grid: bicubic x``scale`` (align_corners False), clamped to [0, 1]."""
    return F.interpolate(lq, scale_factor=scale, mode="bicubic", align_corners=False).clamp_(0, 1)


class LatentDiffusionSR(nn.Module):
    """The ``ldm`` inference module: (B, 3, h, w) LR in [0, 1] -> (B, 3, 4h, 4w) SR (unclamped), h and w multiples
    of :attr:`size_multiple`. ``forward`` = the mean of ``sampling.samples`` samples (or the first)."""

    def __init__(self, unet: LatentUNet, vae: LatentVAE):
        super().__init__()
        self.unet, self.vae = unet, vae
        self.scale = SCALE
        self.size_multiple = vae.downsampling * unet.downsampling // SCALE

    def condition(self, lq01: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(upsample_lr(lq01))

    @torch.no_grad()
    def sample_images(self, lq01: torch.Tensor, *, samples: int | None = None, sampler: str | None = None,
                      steps: int | None = None, seed: int | None = None, denoise=None, encode=None, decode=None,
                      contents: list[bytes] | None = None) -> torch.Tensor:
        """(B, K, 3, 4h, 4w) samples (unclamped). Sample k of image i is seeded from (content hash of lq01[i], k,
        seed), and all B*K samples share each denoising step. ``denoise``/``encode``/``decode`` replace the torch
        networks (the ONNX Runtime backend); ``contents`` are precomputed content hashes."""
        s = self.unet.sampling
        k = samples or s.samples
        sampler, steps = sampler or s.sampler, steps or s.steps
        seed = s.seed if seed is None else seed
        lq01 = lq01.float().contiguous()
        contents = contents or [samplers.content_hash(x) for x in lq01]
        cond = (encode or self.condition)(lq01)
        b = cond.shape[0]
        cond_k = cond.repeat_interleave(k, dim=0)
        gens = [g for c in contents for j in range(k) for g in samplers.generators([c], j, seed, cond.device)]
        z = samplers.sample(denoise or self.unet, cond_k, self.unet.schedule, sampler, steps, gens)
        img = (decode or self.vae.decode)(z)
        return img.reshape(b, k, *img.shape[1:])

    def forward(self, lq01: torch.Tensor) -> torch.Tensor:
        imgs = self.sample_images(lq01)
        return imgs.mean(dim=1) if self.unet.sampling.output == "mean" else imgs[:, 0]


# ----------------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------------
class KLLoss(nn.Module):
    """KL(q(z|x) || N(0, I)) summed over latent elements, averaged over the batch, times ``weight``."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def forward(self, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
        return self.weight * kl.mean()


class LatentStatsWindow(nn.Module):
    """Not a loss: the iteration after which the ``vae`` step accumulates latent statistics (the last N)."""

    def __init__(self, after_iteration: int):
        super().__init__()
        self.after_iteration = after_iteration


class DiffusionLoss(nn.Module):
    """MSE between the U-Net's prediction and its target (epsilon or v) at uniformly drawn timesteps, from the ONE
    ``DDPMScheduler`` (:func:`medsr_dist.models.samplers.noise_scheduler`)."""

    def __init__(self, schedule: NoiseScheduleConfig):
        super().__init__()
        self.scheduler = samplers.noise_scheduler(schedule)
        self.num_timesteps = schedule.num_train_timesteps

    def forward(self, unet, z0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.num_timesteps, (z0.shape[0],), device=z0.device)
        x_t = self.scheduler.add_noise(z0, noise, t)
        pred = unet(torch.cat([x_t, cond], dim=1), t)
        return F.mse_loss(pred.float(), samplers.training_target(self.scheduler, z0, noise, t).float())


# ----------------------------------------------------------------------------------------------------------
# shared family pieces
# ----------------------------------------------------------------------------------------------------------
def _adam_multistep(cfg: MedsrConfig, nets: dict[str, nn.Module], roles: dict[str, NetworkRole]):
    t = cfg.train
    return {k: torch.optim.Adam(nets[k].parameters(), lr=t.lr_g, betas=t.betas) for k, r in roles.items() if r.trained}


def _multistep(cfg: MedsrConfig, optimizers: dict) -> dict:
    t = cfg.train
    return {k: torch.optim.lr_scheduler.MultiStepLR(o, milestones=t.milestones, gamma=t.lr_gamma)
            for k, o in optimizers.items()}


def _fp32(state: dict, prefix: str = "") -> dict:
    return {prefix + k: v.detach().float().cpu() if v.is_floating_point() and v.dtype != torch.float64 else v.detach().cpu()
            for k, v in state.items()}


def _load_torch(data: bytes, source: str) -> dict:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise WeightsError(f"{source}: not a readable torch file ({type(exc).__name__}: {exc})") from None


def _strict(net: nn.Module, state: dict, source: str) -> None:
    want, got = set(net.state_dict()), set(state)
    missing, unexpected = sorted(want - got), sorted(got - want)
    if missing or unexpected:
        raise WeightsError(f"{source} does not fit {type(net).__name__}: {len(missing)} missing tensors "
                           f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise WeightsError(f"{source} does not fit {type(net).__name__}: {str(exc)[:600]}") from None


def load_vae(source: str, cfg: MedsrConfig | None = None, storage_cfg=None) -> LatentVAE:
    """The frozen VAE of the ``ldm`` stage: a local diffusers folder, or a ``vae`` export (model.pth + meta.json,
    any store).

    Raises:
        ValueError: a ``vae`` export trained for fewer iterations than its scale-factor window (no statistics).
        WeightsError: the file does not fit the architecture its meta.json (or ``model.vae_arch``) names.
    """
    local = source.removeprefix("file://")
    if os.path.isdir(local):
        vae = LatentVAE.from_pretrained(local)
    else:
        storage = Storage(storage_cfg)
        data = storage.read_bytes(source)
        meta_uri = Storage.join(source.rsplit("/", 1)[0], "meta.json") if "/" in source else "meta.json"
        if storage.exists(meta_uri):
            arch = json.loads(storage.read_bytes(meta_uri))["generator"]["vae_arch"]
        elif cfg is not None:
            arch = cfg.model.vae_arch.model_dump(mode="json")
        else:
            raise ValueError(f"model.vae: {source} has no meta.json beside it")
        vae = LatentVAE(vae_config(arch))
        state = _load_torch(data, source)
        _strict(vae, state.get("params", state), source)
        if vae.stats_count == 0 and not (cfg is not None and cfg.model.vae_scale_factor):
            raise ValueError(f"model.vae: {source} has no latent statistics (its training stopped before the last "
                             "model.scale_factor_iterations iterations): export the finished vae stage, or set "
                             "model.vae_scale_factor")
    if cfg is not None and cfg.model.vae_scale_factor:
        vae.scale_factor.fill_(cfg.model.vae_scale_factor)
    return vae


# ----------------------------------------------------------------------------------------------------------
# family: vae
# ----------------------------------------------------------------------------------------------------------
class VAEFamily(ModelFamily):
    name = "vae"
    inference_net = "vae"
    export_format = "medsr-vae"

    def network_roles(self, cfg: MedsrConfig) -> dict[str, NetworkRole]:
        return {"vae": NetworkRole(trained=True, ema=False)}  # the scale factor is measured on the trained weights

    def build_networks(self, cfg: MedsrConfig) -> dict[str, nn.Module]:
        return {"vae": LatentVAE(vae_config(cfg.model.vae_arch))}

    def build_losses(self, cfg: MedsrConfig, device: torch.device) -> dict[str, nn.Module]:
        from basicsr.losses.basic_loss import L1Loss

        w = cfg.model.losses
        losses: dict[str, nn.Module] = {"kl": KLLoss(w.kl_weight)}
        if w.l1_weight > 0:
            losses["pix"] = L1Loss(loss_weight=w.l1_weight, reduction="mean")
        if w.perceptual_weight > 0:
            # lazy: perceptual.py wraps basicsr's PerceptualLoss + torchvision VGG (~3 s), imported only when used
            from medsr_dist.models.perceptual import build_perceptual_loss

            losses["percep"] = build_perceptual_loss(cfg)
        losses["latent_stats"] = LatentStatsWindow(cfg.train.iterations - cfg.model.scale_factor_iterations)
        return {k: v.to(device) for k, v in losses.items()}

    def build_optimizers(self, cfg, nets):
        return _adam_multistep(cfg, nets, self.network_roles(cfg))

    def build_schedulers(self, cfg, optimizers):
        return _multistep(cfg, optimizers)

    def train_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        s, losses = ctx.strategy, ctx.losses
        gt = batch["gt"]
        s.zero_grad("vae")
        with s.autocast():
            recon, mean, logvar, z = s.module("vae")(gt)
            total = losses["kl"](mean.float(), logvar.float())
            logs = {"l_kl": total.item()}
            if "pix" in losses:
                l_pix = losses["pix"](recon, gt)
                total = total + l_pix
                logs["l_pix"] = l_pix.item()
            if "percep" in losses:
                l_percep, _ = losses["percep"](recon, gt)
                total = total + l_percep
                logs["l_percep"] = l_percep.item()
        s.backward("vae", total)
        s.step("vae")
        if ctx.iteration > losses["latent_stats"].after_iteration:
            s.raw("vae").accumulate_stats(z)
        mse = F.mse_loss(recon.detach().float().clamp(0, 1), gt.float()).item()
        logs.update(l_total=total.item(), recon_psnr_train=10 * math.log10(1 / max(mse, 1e-12)),
                    latent_scale_factor=float(s.raw("vae").scale_factor))
        return logs

    def export_meta(self, cfg: MedsrConfig) -> dict:
        a = cfg.model.vae_arch
        return {"family": self.name, "export_format": self.export_format, "scale": 1,
                "generator": {"type": "AutoencoderKL", "vae_arch": a.model_dump(mode="json"), "size_multiple": a.downsampling},
                "latent_scale_factor": "in the weights: buffer 'scale_factor' (1/std of the last "
                                       f"{cfg.model.scale_factor_iterations} iterations' posterior samples); "
                                       "the final export's meta.json records the value"}

    def meta_from_weights(self, data: bytes) -> dict:
        """The final export's meta.json entries read from its weights: the latent scale factor and its statistics."""
        state = _load_torch(data, "vae export").get("params", {})
        s, ss, n = state["latent_stats"].tolist()
        return {"latent_scale_factor": float(state["scale_factor"]), "latent_stats": {
            "values": int(n), "mean": s / n if n else None, "std": (max(ss / n - (s / n) ** 2, 0.0)) ** 0.5 if n else None}}

    def inference_networks(self, scale: int, architecture: dict) -> dict[str, nn.Module]:
        return {"vae": LatentVAE(vae_config(architecture["vae_arch"]))}

    def export_payload(self, nets, ema) -> dict:
        return {"params": _fp32(nets["vae"].state_dict())}

    def load_export(self, nets, data: bytes, source: str) -> None:
        state = _load_torch(data, source)
        _strict(nets["vae"], state.get("params", state), source)

    def inference_module(self, nets) -> nn.Module:
        return VAEReconstruction(nets["vae"])


# ----------------------------------------------------------------------------------------------------------
# family: ldm
# ----------------------------------------------------------------------------------------------------------
class LDMFamily(ModelFamily):
    name = "ldm"
    inference_net = "unet"
    export_format = "medsr-ldm"

    def network_roles(self, cfg: MedsrConfig) -> dict[str, NetworkRole]:
        return {"unet": NetworkRole(trained=True, ema=True), "vae": NetworkRole(trained=False, ema=False)}

    def build_networks(self, cfg: MedsrConfig) -> dict[str, nn.Module]:
        m: LDMModelConfig = cfg.model
        vae = load_vae(m.vae, cfg, cfg.storage)
        unet = LatentUNet(m.unet, vae.latent_channels, m.schedule.model_dump(mode="json"),
                          m.sampling.model_dump(mode="json"))
        return {"unet": unet, "vae": vae.requires_grad_(False).eval()}

    def build_losses(self, cfg: MedsrConfig, device: torch.device) -> dict[str, nn.Module]:
        return {"diffusion": DiffusionLoss(cfg.model.schedule).to(device)}

    def build_optimizers(self, cfg, nets):
        return _adam_multistep(cfg, nets, self.network_roles(cfg))

    def build_schedulers(self, cfg, optimizers):
        return _multistep(cfg, optimizers)

    def train_step(self, ctx: StepContext, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        s = ctx.strategy
        vae = s.module("vae")  # frozen: the raw net, never wrapped
        with torch.no_grad():
            z0 = vae.encode(batch["gt"], sample=True)
            cond = vae.encode(upsample_lr(batch["lq"]))
        s.zero_grad("unet")
        with s.autocast():
            loss = ctx.losses["diffusion"](s.module("unet"), z0, cond)
        s.backward("unet", loss)
        s.step("unet")
        return {"l_diffusion": loss.item(), "l_total": loss.item()}

    def export_meta(self, cfg: MedsrConfig) -> dict:
        m: LDMModelConfig = cfg.model
        local = m.vae.removeprefix("file://")
        if os.path.isdir(local):
            from diffusers import AutoencoderKL

            vcfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in AutoencoderKL.load_config(local).items()
                    if not k.startswith("_")}
        else:
            vcfg = vae_config(m.vae_arch)
        return {"family": self.name, "export_format": self.export_format, "scale": SCALE,
                "generator": {"type": "ldm", "vae_config": vcfg, "unet": m.unet.model_dump(mode="json"),
                              "schedule": m.schedule.model_dump(mode="json"),
                              "sampling": m.sampling.model_dump(mode="json"),
                              "size_multiple": m.vae_arch.downsampling * m.unet.downsampling // SCALE},
                "vae_source": m.vae}

    def inference_networks(self, scale: int, architecture: dict) -> dict[str, nn.Module]:
        vae = LatentVAE(architecture["vae_config"])
        unet = LatentUNet(architecture["unet"], vae.latent_channels, architecture["schedule"], architecture["sampling"])
        return {"unet": unet, "vae": vae}

    def export_payload(self, nets, ema) -> dict:
        vae = _fp32(nets["vae"].state_dict(), "vae.")
        payload = {"params": {**_fp32(nets["unet"].state_dict(), "unet."), **vae}}
        if "unet" in ema:
            payload["params_ema"] = {**_fp32(ema["unet"].state_dict(), "unet."), **vae}
        return payload

    def load_export(self, nets, data: bytes, source: str) -> None:
        state = _load_torch(data, source)
        state = state.get("params_ema", state.get("params", state))
        for name in ("unet", "vae"):
            _strict(nets[name], {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}, source)

    def inference_module(self, nets) -> nn.Module:
        return LatentDiffusionSR(nets["unet"], nets["vae"])


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


VAE_FAMILY = register_family("vae")(VAEFamily())
LDM_FAMILY = register_family("ldm")(LDMFamily())
