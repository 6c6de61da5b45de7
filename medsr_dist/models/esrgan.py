"""ESRGAN family (Wang et al. 2018; basicsr ``ESRGANModel``): RRDBNet (MSRResNet for x3) + VGGStyleDiscriminator.

G loss = L_percep (VGG19 ``conv5_4`` before activation, weight 1.0) + 5e-3 L_G^Ra + 1e-2 L1, against the plain
ground truth of classic bicubic pairs; D loss = relativistic average GAN (``model.losses`` defaults and
``configs/esrgan_x4.yaml`` carry basicsr's ``train_ESRGAN_x4.yml`` values). Start it from a ``psnr`` export
(``model.pretrained_g``), as ESRGAN starts from its PSNR-oriented RRDBNet.
"""
from __future__ import annotations

from medsr_dist.models.gan import GANFamily
from medsr_dist.models.registry import register_family


class ESRGANFamily(GANFamily):
    name = "esrgan"
    relativistic = True
    pixel_target = "gt"


FAMILY = register_family("esrgan")(ESRGANFamily())
