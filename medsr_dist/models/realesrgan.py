"""Real-ESRGAN family: basicsr RRDBNet generator + UNetDiscriminatorSN, L1 + perceptual + GAN losses.

The optimisation step is Real-ESRGAN's ``RealESRGANModel.optimize_parameters`` without the data
synthesis (that lives in the Ray Data degradation stage, ``model.degradation: second_order``): L1 and
perceptual losses against the USM-sharpened ground truth, the standard GAN losses against the plain ground
truth, one D step per G step (:func:`medsr_dist.models.gan.gan_train_step`).
"""
from __future__ import annotations

from medsr_dist.models.archs import build_discriminator, build_generator  # noqa: F401  (public names)
from medsr_dist.models.gan import GANFamily
from medsr_dist.models.registry import register_family
from medsr_dist.models.perceptual import (  # noqa: F401  (public names)
    RANDOM_VGG,
    VGG19_FILE,
    VGG19_URL,
    VGGWeightsMissing,
    build_perceptual_loss,
    resolve_vgg19_weights,
)


class RealESRGANFamily(GANFamily):
    name = "realesrgan"
    relativistic = False
    pixel_target = "gt_usm"


FAMILY = register_family("realesrgan")(RealESRGANFamily())
