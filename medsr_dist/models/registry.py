"""Model families known to medsr-dist, described without importing torch.

A family is one module implementing :class:`medsr_dist.models.base.ModelFamily` plus one config section
(``medsr_dist.config.FAMILY_SECTIONS``, the discriminated union keyed by ``model.family``, which also checks the
scales each architecture can do before any Ray or torch work). The training loop and the inference side import
the module itself through :func:`load_family`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyInfo:
    name: str
    module: str
    description: str


FAMILIES: dict[str, FamilyInfo] = {
    "realesrgan": FamilyInfo(
        "realesrgan", "medsr_dist.models.realesrgan",
        "Real-ESRGAN: RRDBNet + UNetDiscriminatorSN, L1 + perceptual + GAN on second-order degraded pairs",
    ),
    "esrgan": FamilyInfo(
        "esrgan", "medsr_dist.models.esrgan",
        "ESRGAN: RRDBNet (MSRResNet for x3) + VGGStyleDiscriminator, relativistic average GAN, bicubic pairs",
    ),
    "srgan": FamilyInfo(
        "srgan", "medsr_dist.models.srgan",
        "SRGAN: MSRResNet + VGGStyleDiscriminator, standard GAN + VGG19 conv5_4 perceptual loss, bicubic pairs",
    ),
    "psnr": FamilyInfo(
        "psnr", "medsr_dist.models.psnr",
        "PSNR-oriented L1 training of an RRDBNet or MSRResNet (first stage of a GAN family via model.pretrained_g)",
    ),
    "vae": FamilyInfo(
        "vae", "medsr_dist.models.ldm",
        "Latent diffusion stage 1: diffusers AutoencoderKL, L1 + perceptual + KL; exports the latent scale factor",
    ),
    "ldm": FamilyInfo(
        "ldm", "medsr_dist.models.ldm",
        "Latent diffusion SR: frozen VAE + diffusers UNet2DModel on [noisy HR latent, LR latent], DDPM/DDIM/DPM-Solver++",
    ),
}


def family_info(name: str) -> FamilyInfo:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(sorted(FAMILIES))})") from None


def load_family(name: str):
    """Import and return the family object (a :class:`ModelFamily`) registered under ``name``."""
    module = importlib.import_module(family_info(name).module)
    families = getattr(module, "FAMILIES", None)  # a module holding several families (ldm.py: vae + ldm)
    return families[name] if families is not None else module.FAMILY
