"""Network architectures of the families, built from their config sections (basicsr archs as they are).

Generators map (B, 3, h, w) float RGB in [0, 1] to (B, 3, h*scale, w*scale), unclamped.
"""
from __future__ import annotations

from typing import Any

from torch import nn

import medsr_dist.compat  # noqa: F401  (makes basicsr importable)
from basicsr.archs.discriminator_arch import UNetDiscriminatorSN, VGGStyleDiscriminator
from basicsr.archs.rrdbnet_arch import RRDBNet
from basicsr.archs.srresnet_arch import MSRResNet

from medsr_dist.config import GENERATOR_SCALES

#: input height and width must be multiples of this (RRDBNet pixel-unshuffles by 2 at x2 and by 4 at x1)
RRDBNET_SIZE_MULTIPLE = {1: 4, 2: 2, 4: 1}


def _fields(section: Any) -> dict:
    return dict(section) if isinstance(section, dict) else section.model_dump()


def generator_from(architecture: Any, scale: int) -> nn.Module:
    """A generator from a ``model.generator`` section (or its dict, as in meta.json) and the scale.

    Raises:
        ValueError: an unknown generator type, or a scale the architecture cannot do.
    """
    g = _fields(architecture)
    kind = g.get("type", "RRDBNet")
    if kind not in GENERATOR_SCALES:
        raise ValueError(f"unknown generator type {kind!r} (known: {', '.join(GENERATOR_SCALES)})")
    if scale not in GENERATOR_SCALES[kind]:
        raise ValueError(f"{kind} cannot upscale x{scale} (supported: {GENERATOR_SCALES[kind]})")
    if kind == "RRDBNet":
        return RRDBNet(num_in_ch=g["num_in_ch"], num_out_ch=g["num_out_ch"], scale=scale, num_feat=g["num_feat"],
                       num_block=g["num_block"], num_grow_ch=g["num_grow_ch"])
    if scale == 1:
        return msrresnet_x1(num_in_ch=g["num_in_ch"], num_out_ch=g["num_out_ch"], num_feat=g["num_feat"],
                            num_block=g["num_block"])
    return MSRResNet(num_in_ch=g["num_in_ch"], num_out_ch=g["num_out_ch"], num_feat=g["num_feat"],
                     num_block=g["num_block"], upscale=scale)


class _MSRResNetX1(MSRResNet):
    """basicsr's MSRResNet at ``upscale=1`` (its forward already handles it: no upsampling layers, and
    ``out += interpolate(x, scale_factor=1)`` is ``x`` exactly). Compat: basicsr 1.4.2's ``__init__`` initialises
    ``self.upconv1``, which only x2-x4 create; this class attribute (an empty, unregistered module: no weights, no
    state-dict key) lets it. State dict = basicsr's layers: conv_first, body.*, conv_hr, conv_last."""

    upconv1 = nn.Identity()


def msrresnet_x1(num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_block: int = 16) -> nn.Module:
    """A scale-1 residual refiner: (B, C, h, w) -> (B, C, h, w), ``out = x + f(x)`` with ``f`` basicsr's
    EDSR-like body at full resolution (any h, w). ``conv_last`` starts at zero, so the untrained network is the
    identity exactly: refinement starts from its input (for MRI, the B-spline-interpolated slice)."""
    net = _MSRResNetX1(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat, num_block=num_block, upscale=1)
    nn.init.zeros_(net.conv_last.weight)
    nn.init.zeros_(net.conv_last.bias)
    return net


def generator_size_multiple(architecture: Any, scale: int) -> int:
    """Input sides of this generator must be multiples of the returned number."""
    g = _fields(architecture)
    return RRDBNET_SIZE_MULTIPLE.get(scale, 1) if g.get("type", "RRDBNet") == "RRDBNet" else 1


def build_generator(cfg) -> nn.Module:
    return generator_from(cfg.model.generator, cfg.model.scale)


def build_discriminator(cfg) -> nn.Module:
    d = cfg.model.discriminator
    if d.type == "UNetDiscriminatorSN":
        return UNetDiscriminatorSN(num_in_ch=d.num_in_ch, num_feat=d.num_feat, skip_connection=d.skip_connection)
    if d.type == "VGGStyleDiscriminator":
        return VGGStyleDiscriminator(num_in_ch=d.num_in_ch, num_feat=d.num_feat, input_size=d.input_size)
    raise ValueError(f"model.discriminator.type: unknown discriminator {d.type!r}")
