"""Model sections: one per family (a discriminated union keyed by ``model.family``), their generator,
discriminator and loss sections, and the latent-diffusion architecture, schedule and sampling sections."""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from medsr_dist.config.base import ConfigError, Section


#: scales each generator architecture really produces. basicsr's RRDBNet has x4 upsampling (pixel-unshuffle by
#: 2 or 4 in front for x2/x1): with scale=3 it silently outputs x4, so x3 is refused. MSRResNet does x2, x3, x4,
#: and x1 (models/archs.py: a full-resolution residual refiner, out = x + f(x), starting at the identity; the
#: MRI through-plane refinement). RRDBNet x1 has no full-resolution path (it works at 1/4 resolution).
GENERATOR_SCALES: dict[str, tuple[int, ...]] = {"RRDBNet": (1, 2, 4), "MSRResNet": (1, 2, 3, 4)}


def through_plane_refiner_problem(generator_type: str, scale: int) -> str | None:
    """Why a generator (``type``, as in ``model.generator`` or a meta.json) at ``scale`` cannot be MRI's
    through-plane refiner, or None. The refiner maps an interpolated slice to a same-size one and must be able to
    keep every voxel; RRDBNet x1 cannot even represent the identity (basicsr pixel-unshuffles by 4, works at a
    quarter resolution and upsamples by nearest). 2-D uses of RRDBNet x1, x2, x4 are not affected."""
    if generator_type == "RRDBNet" and scale == 1:
        return ("RRDBNet x1 cannot be the scale-1 through-plane refiner: it works at a quarter resolution (pixel-"
                "unshuffle by 4, nearest upsampling) and cannot represent the identity; use model.generator.type="
                "MSRResNet at model.scale=1 (a full-resolution residual refiner, configs/mri_psnr_x4.yaml)")
    return None


def check_through_plane_model(cfg: Any) -> None:
    """Raise :class:`ConfigError` naming ``model.generator.type`` when ``cfg.model`` is to be trained as MRI's
    through-plane refiner (``medsr mri prepare`` pairs, ``medsr mri self-sr``) but cannot be one
    (:func:`through_plane_refiner_problem`). Families without a generator section pass."""
    gen = getattr(cfg.model, "generator", None)
    problem = through_plane_refiner_problem(getattr(gen, "type", ""), int(getattr(cfg.model, "scale", 0) or 0))
    if problem:
        raise ConfigError(f"model.generator.type {gen.type} (model.scale {cfg.model.scale}): {problem}")


class RRDBNetConfig(Section):
    """basicsr ``RRDBNet`` (ESRGAN / Real-ESRGAN generator)."""

    type: Literal["RRDBNet"] = "RRDBNet"
    num_in_ch: int = 3
    num_out_ch: int = 3
    num_feat: int = Field(64, ge=1)
    num_block: int = Field(23, ge=1)
    num_grow_ch: int = Field(32, ge=1)


class MSRResNetConfig(Section):
    """basicsr ``MSRResNet`` (SRResNet without BatchNorm; the SRGAN generator): x2, x3, x4; x1 = residual refiner."""

    type: Literal["MSRResNet"] = "MSRResNet"
    num_in_ch: int = 3
    num_out_ch: int = 3
    num_feat: int = Field(64, ge=1)
    num_block: int = Field(16, ge=1)


GeneratorConfig = Annotated[Union[RRDBNetConfig, MSRResNetConfig], Field(discriminator="type")]


class UNetDiscriminatorConfig(Section):
    """basicsr ``UNetDiscriminatorSN`` (Real-ESRGAN): any input size."""

    type: Literal["UNetDiscriminatorSN"] = "UNetDiscriminatorSN"
    num_in_ch: int = 3
    num_feat: int = Field(64, ge=1)
    skip_connection: bool = True


DiscriminatorConfig = UNetDiscriminatorConfig  # the name older code imports


class VGGDiscriminatorConfig(Section):
    """basicsr ``VGGStyleDiscriminator`` (SRGAN / ESRGAN): takes exactly ``input_size`` px crops (degradation.gt_size)."""

    type: Literal["VGGStyleDiscriminator"] = "VGGStyleDiscriminator"
    num_in_ch: int = 3
    num_feat: int = Field(64, ge=1)
    input_size: Literal[128, 256] = 128


class PixelLossConfig(Section):
    """L1 only (PSNR-oriented training)."""

    l1_weight: float = Field(1.0, gt=0)


class LossConfig(Section):
    """Generator losses of a GAN family: L1 + perceptual (VGG19 features) + GAN. Defaults: Real-ESRGAN
    (``finetune_realesrgan_x4plus.yml``)."""

    l1_weight: float = Field(1.0, ge=0)
    perceptual_weight: float = Field(1.0, ge=0)
    perceptual_layers: dict[str, float] = Field(
        default_factory=lambda: {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0}
    )
    gan_weight: float = Field(0.1, ge=0)
    gan_type: Literal["vanilla", "lsgan", "wgan_softplus"] = "vanilla"


class ESRGANLossConfig(LossConfig):
    """basicsr ``options/train/ESRGAN/train_ESRGAN_x4.yml`` (also ``train_SRGAN_x4.yml``): pixel_opt L1 weight
    1e-2, perceptual_opt VGG19 ``conv5_4`` (before activation) weight 1.0, gan_opt vanilla weight 5e-3."""

    l1_weight: float = Field(1e-2, ge=0)
    perceptual_layers: dict[str, float] = Field(default_factory=lambda: {"conv5_4": 1.0})
    gan_weight: float = Field(5e-3, ge=0)

class _FamilySection(Section):
    """Fields every family has. ``generator`` comes before ``scale`` so the scale check can see it."""

    #: generator type used when ``model.generator`` gives no ``type``
    default_generator: ClassVar[str] = "RRDBNet"
    family: str
    generator: Any
    scale: int = Field(4, description="Super-resolution factor of the network")
    pretrained_g: str | None = Field(None, description="Generator weights: zoo name, path or URI (e.g. a psnr export)")
    degradation: Literal["second_order", "bicubic"] = Field(
        "bicubic", description="Training pairs: Real-ESRGAN second-order pipeline, or classic bicubic BI (degradation.bicubic)"
    )

    @field_validator("generator", mode="before")
    @classmethod
    def _default_generator_type(cls, v: Any) -> Any:
        if isinstance(v, dict) and "type" not in v:
            return {"type": cls.default_generator, **v}
        return v

    @field_validator("scale")
    @classmethod
    def _supported_scale(cls, scale: int, info: ValidationInfo) -> int:
        gen = info.data.get("generator")
        if gen is None:  # the generator itself failed validation and is reported
            return scale
        family = cls.model_fields["family"].default
        supported = GENERATOR_SCALES[gen.type]
        if scale not in supported:
            hint = ""
            if gen.type == "RRDBNet" and scale == 3:
                hint = "; basicsr's RRDBNet with scale=3 silently outputs x4"
                if "MSRResNet" in str(cls.model_fields["generator"].annotation):
                    hint += ": use model.generator.type=MSRResNet for x3"
            raise ValueError(
                f"scale {scale} is not supported by the {family} architecture {gen.type} "
                f"(supported: {', '.join(map(str, supported))}{hint})"
            )
        return scale


class RealESRGANModelConfig(_FamilySection):
    """Real-ESRGAN: RRDBNet + UNetDiscriminatorSN, L1 + perceptual + GAN on second-order degraded pairs."""

    family: Literal["realesrgan"] = "realesrgan"
    generator: RRDBNetConfig = Field(default_factory=RRDBNetConfig)
    discriminator: UNetDiscriminatorConfig = Field(default_factory=UNetDiscriminatorConfig)
    pretrained_d: str | None = Field(None, description="Discriminator weights: zoo name, path or URI")
    losses: LossConfig = Field(default_factory=LossConfig)
    degradation: Literal["second_order", "bicubic"] = "second_order"


class ESRGANModelConfig(_FamilySection):
    """ESRGAN (basicsr ``ESRGANModel``): RRDBNet (MSRResNet for x3) + VGGStyleDiscriminator, relativistic average GAN."""

    family: Literal["esrgan"] = "esrgan"
    generator: GeneratorConfig = Field(default_factory=RRDBNetConfig)
    discriminator: VGGDiscriminatorConfig = Field(default_factory=VGGDiscriminatorConfig)
    pretrained_d: str | None = Field(None, description="Discriminator weights: path or URI")
    losses: ESRGANLossConfig = Field(default_factory=ESRGANLossConfig)


class SRGANModelConfig(_FamilySection):
    """SRGAN (basicsr ``SRGANModel``): MSRResNet + VGGStyleDiscriminator, standard GAN, ESRGAN's perceptual loss."""

    default_generator: ClassVar[str] = "MSRResNet"
    family: Literal["srgan"] = "srgan"
    generator: MSRResNetConfig = Field(default_factory=MSRResNetConfig)
    discriminator: VGGDiscriminatorConfig = Field(default_factory=VGGDiscriminatorConfig)
    pretrained_d: str | None = Field(None, description="Discriminator weights: path or URI")
    losses: ESRGANLossConfig = Field(default_factory=ESRGANLossConfig)


class PSNRModelConfig(_FamilySection):
    """PSNR-oriented generator training (L1 only): RRDBNet or MSRResNet; its export is the ``pretrained_g`` of a GAN family."""

    family: Literal["psnr"] = "psnr"
    generator: GeneratorConfig = Field(default_factory=RRDBNetConfig)
    losses: PixelLossConfig = Field(default_factory=PixelLossConfig)


# ---- latent diffusion (models/ldm.py): a `vae` stage, then the `ldm` stage with that VAE frozen ----
class VAEArchConfig(Section):
    """diffusers ``AutoencoderKL``: 3 x H x W in [-1, 1] -> latent_channels x H/f x W/f, f = 2**(levels - 1)."""

    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64, 64], min_length=1,
                                          description="Channels per level; 4 levels = downsampling by 8 (256 -> 32)")
    layers_per_block: int = Field(1, ge=1)
    latent_channels: int = Field(4, ge=1)
    norm_num_groups: int = Field(16, ge=1)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @model_validator(mode="after")
    def _groups(self) -> "VAEArchConfig":
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}")
        return self


class UNetArchConfig(Section):
    """diffusers ``UNet2DModel(in_channels=2*latent, out_channels=latent)``; the defaults have 820,220 parameters
    (the reference's ~813k), with self-attention at the lowest resolution only."""

    block_out_channels: list[int] = Field(default_factory=lambda: [32, 48, 56], min_length=1)
    layers_per_block: int = Field(1, ge=1)
    down_block_types: list[Literal["DownBlock2D", "AttnDownBlock2D"]] = Field(
        default_factory=lambda: ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"])
    attention_head_dim: int = Field(8, ge=1)
    norm_num_groups: int = Field(8, ge=1)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @model_validator(mode="after")
    def _shapes(self) -> "UNetArchConfig":
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError(f"down_block_types has {len(self.down_block_types)} entries, block_out_channels "
                             f"{len(self.block_out_channels)}: one block type per level")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}")
        return self


class NoiseScheduleConfig(Section):
    """The ONE ``DDPMScheduler`` config every sampler is built from (models/samplers.py). Defaults: the reference
    (T = 300, linear betas 1e-4..0.02; alpha_bar_T = 0.048, so pure noise is not what the last training step saw)."""

    num_train_timesteps: int = Field(300, ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "epsilon", description="What the U-Net predicts: the noise (the reference) or v (needed with zero_terminal_snr)")
    zero_terminal_snr: bool = Field(
        False, description="Rescale the betas so alpha_bar_T = 0 (Lin et al. 2024): training's last step is then "
        "pure noise, as sampling starts. Needs prediction_type v_prediction (epsilon is undefined at SNR 0)")
    timestep_spacing: Literal["leading", "trailing", "linspace"] = Field(
        "trailing", description="Which training timesteps a shortened sampler visits; 'trailing' starts at T-1 "
        "(diffusers' 'leading' default never visits it: DDIM-50 of T=300 would start at t=294)")

    @model_validator(mode="after")
    def _check(self) -> "NoiseScheduleConfig":
        if self.beta_start >= self.beta_end:
            raise ValueError(f"beta_start {self.beta_start} must be below beta_end {self.beta_end}")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError("zero_terminal_snr needs prediction_type v_prediction: at alpha_bar_T = 0 an epsilon "
                             "prediction determines nothing about the latent")
        return self


SAMPLERS = ("ddpm", "ddim", "dpmsolver++")


class SamplingConfig(Section):
    """How inference draws samples (recorded in the export; the samplers share :class:`NoiseScheduleConfig`)."""

    sampler: Literal["ddpm", "ddim", "dpmsolver++"] = Field(
        "ddim", description="ddpm (ancestral, every training step), ddim (eta 0) or dpmsolver++ (2nd-order multistep)")
    steps: int = Field(50, ge=1, description="Denoising steps (ddpm: at most num_train_timesteps)")
    samples: int = Field(1, ge=1, le=64, description="K samples per image; output = their mean (or the first), and a "
                         "per-pixel std map (the uncertainty map) when K > 1")
    output: Literal["mean", "first"] = Field("mean", description="What the output image is when samples > 1")
    seed: int = Field(0, description="Run seed of the noise: each tile's noise is seeded from (its content hash, "
                      "sample index, this seed), so outputs are bit-reproducible on the same backend")


class SamplingOverride(Section):
    """Sampling settings replacing an ``ldm`` export's own (its ``model.sampling``, recorded in meta.json) for one
    run; a key left empty keeps the export's. Outputs are keyed by the settings that ran."""

    sampler: Literal["ddpm", "ddim", "dpmsolver++"] | None = None
    steps: int | None = Field(None, ge=1, description="Denoising steps (at most the export's num_train_timesteps)")
    samples: int | None = Field(None, ge=1, le=64, description="K samples per image (K > 1: mean + uncertainty map)")
    output: Literal["mean", "first"] | None = None
    seed: int | None = None

    def overrides(self) -> dict:
        """The keys given (not None)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class VAELossConfig(Section):
    """VAE stage losses (MONAI latent-diffusion tutorials): L1 + perceptual (VGG19 features) + KL."""

    l1_weight: float = Field(1.0, ge=0)
    perceptual_weight: float = Field(1e-3, ge=0)
    perceptual_layers: dict[str, float] = Field(default_factory=lambda: {"conv2_2": 1.0, "conv3_4": 1.0, "conv4_4": 1.0})
    kl_weight: float = Field(1e-6, ge=0)

class _LatentFamilySection(Section):
    family: str
    scale: int = 4
    vae_arch: VAEArchConfig = Field(default_factory=VAEArchConfig)
    degradation: Literal["bicubic_augmented"] = Field(
        "bicubic_augmented", description="Training pairs: bicubic BI pairs of augmented HR crops (data/ldm_pairs.py)")


class VAEModelConfig(_LatentFamilySection):
    """Stage 1 of the latent diffusion family: train the ``AutoencoderKL`` on HR crops (reconstruction: scale 1);
    its export (with the latent scale factor 1/std) is ``model.vae`` of the ``ldm`` stage."""

    family: Literal["vae"] = "vae"
    scale: Literal[1] = Field(1, description="A VAE reconstructs: the training pairs are (crop, crop)")
    losses: VAELossConfig = Field(default_factory=VAELossConfig)
    scale_factor_iterations: int = Field(
        20, ge=1, description="The latent scale factor is 1/std of the posterior samples of the last N iterations")


class LDMModelConfig(_LatentFamilySection):
    """Latent diffusion SR (x4 chest X-ray, 64 -> 256): frozen VAE, U-Net on [noisy HR latent, LR latent]."""

    family: Literal["ldm"] = "ldm"
    scale: Literal[4] = Field(4, description="x4 (64 -> 256): the LR is bicubic-upsampled to the HR grid, then encoded")
    vae: str = Field(..., min_length=1, description="The frozen VAE: a `vae` stage's export (model.pth with meta.json) "
                     "or a local diffusers AutoencoderKL folder (from_pretrained)")
    vae_scale_factor: float | None = Field(
        None, gt=0, description="Latent scale factor; empty: the VAE's own (a vae export's 1/std, a diffusers config's scaling_factor)")
    unet: UNetArchConfig = Field(default_factory=UNetArchConfig)
    schedule: NoiseScheduleConfig = Field(default_factory=NoiseScheduleConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    loss: Literal["mse"] = Field("mse", description="MSE on the U-Net's target (epsilon or v)")

    @model_validator(mode="after")
    def _check(self) -> "LDMModelConfig":
        s = self.sampling
        if s.steps > self.schedule.num_train_timesteps:
            raise ValueError(f"sampling.steps {s.steps} exceeds schedule.num_train_timesteps {self.schedule.num_train_timesteps}")
        return self


FAMILY_SECTIONS: dict[str, type[Section]] = {
    c.model_fields["family"].default: c
    for c in (RealESRGANModelConfig, ESRGANModelConfig, SRGANModelConfig, PSNRModelConfig, VAEModelConfig, LDMModelConfig)
}
#: ``model``: the section of the family ``model.family`` names (default realesrgan)
ModelConfig = Annotated[
    Union[RealESRGANModelConfig, ESRGANModelConfig, SRGANModelConfig, PSNRModelConfig, VAEModelConfig, LDMModelConfig],
    Field(discriminator="family"),
]
