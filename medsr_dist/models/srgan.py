"""SRGAN family (Ledig et al. 2017; basicsr ``SRGANModel``): MSRResNet + VGGStyleDiscriminator, standard GAN.

The same perceptual loss as ESRGAN (VGG19 ``conv5_4`` before activation) and the same weights (basicsr's
``train_SRGAN_x4.yml``: L1 1e-2, perceptual 1.0, GAN 5e-3); the GAN is the standard, non-relativistic one.
"""
from __future__ import annotations

from medsr_dist.models.gan import GANFamily
from medsr_dist.models.registry import register_family


class SRGANFamily(GANFamily):
    name = "srgan"
    relativistic = False
    pixel_target = "gt"


FAMILY = register_family("srgan")(SRGANFamily())
