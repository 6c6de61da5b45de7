"""One pydantic schema tree for every stage and model family.

A run is described by one YAML file (``configs/*.yaml``) plus ``key=value`` overrides. Every
section forbids unknown keys; values are type-checked; cross-field rules (a scale the chosen
architecture cannot do, split fractions that do not sum to one) are checked here, so a bad config
fails before any Ray work starts with a message naming the file and the key.

Paths are store URIs (local path, ``file://`` or ``s3://bucket/prefix``). Stage inputs and outputs
left empty default to folders under ``run.root``: that is the only place defaults are derived.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, model_serializer, field_validator, model_validator

from medsr_dist.models.registry import FAMILIES


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the source and the key."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Range = tuple[float, float]


def _check_range(value: Range) -> Range:
    if value[0] > value[1]:
        raise ValueError(f"range lower bound {value[0]} exceeds upper bound {value[1]}")
    return value


def _check_probs(value: list[float]) -> list[float]:
    if any(p < 0 for p in value) or abs(sum(value) - 1.0) > 1e-6:
        raise ValueError(f"probabilities must be non-negative and sum to 1, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# Infrastructure
# --------------------------------------------------------------------------------------------
class RunConfig(Section):
    name: str = Field("medsr", description="Run name; used for the Ray Train run and output folders")
    root: str = Field("./demo-run", description="Store prefix under which stage outputs default")
    seed: int = Field(0, description="Seed for sampling, degradation and initialisation")


class StorageConfig(Section):
    """How to reach object storage. Credentials come from the standard AWS environment/config files."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://minio:9000")
    region: str | None = Field(None, description="AWS region name")
    anon: bool = Field(False, description="Anonymous access (public buckets)")
    profile: str | None = Field(None, description="AWS profile from ~/.aws/config")


class RayConfig(Section):
    address: str | None = Field(
        None,
        description="Cluster to join ('auto' inside `ray job submit`); empty: RAY_ADDRESS, else a local instance",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local instance (default: all)")
    progress: bool = Field(True, description="Show Ray Data progress bars")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
class SampleConfig(Section):
    """Procedural sample archive (radiograph-like images in every supported file form)."""

    n_images: int = Field(12, ge=1)
    n_holdout: int = Field(2, ge=0, description="Extra images written to the hold-out folder for `enhance`")
    size: int = Field(512, ge=64)
    archive: str | None = Field(None, description="Default: <run.root>/archive")
    holdout: str | None = Field(None, description="Default: <run.root>/holdout")


class SplitConfig(Section):
    train: float = Field(0.7, ge=0, le=1)
    val: float = Field(0.2, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)
    group_by: Literal["patient_id", "filename"] = Field(
        "patient_id", description="Group images of one patient: DICOM PatientID (filename pattern as fallback) or filename only"
    )
    filename_pattern: str = Field(
        r"^(?P<patient>[^_/]+)_", description="Regex with a 'patient' group, applied to the file name (NIH: <patient>_<followup>.png)"
    )

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class MultiscaleConfig(Section):
    """Real-ESRGAN's generate_multiscale_DF2K: Lanczos copies at ``scales`` plus a shortest-edge copy (train split)."""

    enabled: bool = False
    scales: list[float] = Field(default_factory=lambda: [0.75, 0.5, 1 / 3])
    shortest_edge: int | None = Field(400, ge=16, description="Also a copy whose shorter side is this; empty: none")

    @field_validator("scales")
    @classmethod
    def _scales_in_range(cls, v: list[float]) -> list[float]:
        if any(not 0 < s < 1 for s in v):
            raise ValueError(f"scales must lie in (0, 1), got {v}")
        return v


class SubimageConfig(Section):
    """Real-ESRGAN's extract_subimages: overlapping crops of the (multi-scale) train images."""

    enabled: bool = False
    crop_size: int = Field(400, ge=16)
    step: int = Field(200, ge=1)
    thresh_size: int = Field(0, ge=0, description="Keep a last crop flush with the edge when more than this remains")


class PrepareConfig(Section):
    input: str | None = Field(None, description="Archive prefix to read (default: sample.archive)")
    output: str | None = Field(None, description="Dataset prefix to write (default: <run.root>/dataset)")
    include: list[str] = Field(default_factory=lambda: ["*"], description="Glob patterns relative to input")
    exclude: list[str] = Field(default_factory=list)
    split: SplitConfig = Field(default_factory=SplitConfig)
    rows_per_shard: int = Field(64, ge=1, description="Images per Parquet shard")
    fail_on_error: bool = Field(False, description="Exit non-zero when any file could not be read")
    multiscale: MultiscaleConfig = Field(default_factory=MultiscaleConfig)
    subimages: SubimageConfig = Field(default_factory=SubimageConfig)
    paired_lq: str | None = Field(
        None, description="Paired-data mode: prefix of low-resolution images matching `input` (ground truth) by "
        "relative path and file stem; training then crops these pairs instead of degrading",
    )
    group_secret_file: str | None = Field(
        None, description="File (path or URI) holding the site secret (>= 16 bytes) that pseudonymises DICOM "
        "PatientIDs (HMAC-SHA256) for the patient-level split; default: the MEDSR_GROUP_SECRET environment variable. "
        "Required when files carry a PatientID and split.group_by is patient_id; the same secret keeps the same split",
    )


KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
KERNEL_PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)


class DegradationConfig(Section):
    """Real-ESRGAN second-order degradation; defaults are `finetune_realesrgan_x4plus.yml`."""

    gt_size: int = Field(256, ge=16, description="Ground-truth crop size (pixels)")
    use_hflip: bool = True
    usm_sharpen_gt: bool = Field(True, description="Sharpen GT with USM for the L1/perceptual losses")
    # first degradation
    blur_kernel_size: int = 21
    kernel_list: list[str] = Field(default_factory=lambda: list(KERNEL_TYPES))
    kernel_prob: list[float] = Field(default_factory=lambda: list(KERNEL_PROBS))
    sinc_prob: float = Field(0.1, ge=0, le=1)
    blur_sigma: Range = (0.2, 3.0)
    betag_range: Range = (0.5, 4.0)
    betap_range: Range = (1.0, 2.0)
    resize_prob: list[float] = Field(default_factory=lambda: [0.2, 0.7, 0.1], description="up, down, keep")
    resize_range: Range = (0.15, 1.5)
    gaussian_noise_prob: float = Field(0.5, ge=0, le=1)
    noise_range: Range = (1.0, 30.0)
    poisson_scale_range: Range = (0.05, 3.0)
    gray_noise_prob: float | None = Field(
        None, ge=0, le=1, description="Probability that the noise is gray (equal on every channel); null: 1.0 for gray "
        "sources (a radiograph never has chroma noise), 0.4 (Real-ESRGAN) for colour ones")
    jpeg_range: Range = (30.0, 95.0)
    # second degradation
    second_blur_prob: float = Field(0.8, ge=0, le=1)
    blur_kernel_size2: int = 21
    kernel_list2: list[str] = Field(default_factory=lambda: list(KERNEL_TYPES))
    kernel_prob2: list[float] = Field(default_factory=lambda: list(KERNEL_PROBS))
    sinc_prob2: float = Field(0.1, ge=0, le=1)
    blur_sigma2: Range = (0.2, 1.5)
    betag_range2: Range = (0.5, 4.0)
    betap_range2: Range = (1.0, 2.0)
    resize_prob2: list[float] = Field(default_factory=lambda: [0.3, 0.4, 0.3])
    resize_range2: Range = (0.3, 1.2)
    gaussian_noise_prob2: float = Field(0.5, ge=0, le=1)
    noise_range2: Range = (1.0, 25.0)
    poisson_scale_range2: Range = (0.05, 2.5)
    gray_noise_prob2: float | None = Field(None, ge=0, le=1, description="As gray_noise_prob, second degradation")
    jpeg_range2: Range = (30.0, 95.0)
    final_sinc_prob: float = Field(0.8, ge=0, le=1)
    # placement: CPU actors sized separately from the trainers
    num_actors: int = Field(1, ge=1, description="Degradation actors (Ray Data actor pool size)")
    cpus_per_actor: float = Field(1.0, gt=0)
    shuffle_buffer: int = Field(180, ge=0, description="Training-pair pool: local shuffle buffer in samples")
    lq_quantization: Literal["source", "8bit"] = Field(
        "source", description="Grid of the LQ values: 'source' = the source's significant bits (a 12-bit CT trains on "
        "12-bit inputs, as inference feeds it; its JPEG steps add libjpeg's error without 8-bit rounding), '8bit' = "
        "Real-ESRGAN's round(x*255)/255 for every source. 8-bit sources degrade the same either way")
    bicubic: "BicubicConfig" = Field(default_factory=lambda: BicubicConfig(), description="Classic BI pairs (families with model.degradation: bicubic)")
    augment: "AugmentConfig" = Field(default_factory=lambda: AugmentConfig(), description="Augmentation of the HR crops (families with model.degradation: bicubic_augmented)")

    _ranges = field_validator(
        "blur_sigma", "betag_range", "betap_range", "resize_range", "noise_range", "poisson_scale_range",
        "jpeg_range", "blur_sigma2", "betag_range2", "betap_range2", "resize_range2", "noise_range2",
        "poisson_scale_range2", "jpeg_range2",
    )(_check_range)
    _probs = field_validator("kernel_prob", "kernel_prob2", "resize_prob", "resize_prob2")(_check_probs)

    @field_validator("kernel_list", "kernel_list2")
    @classmethod
    def _known_kernels(cls, v: list[str]) -> list[str]:
        unknown = [k for k in v if k not in KERNEL_TYPES]
        if unknown:
            raise ValueError(f"unknown kernel types {unknown} (known: {', '.join(KERNEL_TYPES)})")
        return v

    @field_validator("blur_kernel_size", "blur_kernel_size2")
    @classmethod
    def _odd_kernel(cls, v: int) -> int:
        if v < 3 or v % 2 == 0:
            raise ValueError(f"kernel size must be odd and >= 3, got {v}")
        return v

    @model_validator(mode="after")
    def _lists_match(self) -> "DegradationConfig":
        for names, probs in (("kernel_list", "kernel_prob"), ("kernel_list2", "kernel_prob2")):
            if len(getattr(self, names)) != len(getattr(self, probs)):
                raise ValueError(f"{names} and {probs} must have the same length")
        return self


# --------------------------------------------------------------------------------------------
# Models: one section per family (a discriminated union keyed by model.family)
# --------------------------------------------------------------------------------------------
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


class BicubicConfig(Section):
    """Classic "BI" pairs: optional Gaussian blur, bicubic downsampling, optional Gaussian noise (per sample)."""

    kernel: Literal["matlab", "opencv"] = Field(
        "matlab", description="matlab: MATLAB imresize bicubic (antialiased, the SR benchmarks' BI); opencv: cv2 INTER_CUBIC"
    )
    blur_sigma: Range = Field((0.0, 0.0), description="Gaussian blur sigma range (GT pixels) before downsampling; 0: none")
    noise_sigma: Range = Field((0.0, 0.0), description="Gaussian noise std range on the LQ, in 8-bit grey levels; 0: none")

    @field_validator("blur_sigma", "noise_sigma")
    @classmethod
    def _non_negative_range(cls, v: Range) -> Range:
        _check_range(v)
        if v[0] < 0:
            raise ValueError(f"must be non-negative, got {v}")
        return v


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


class AugmentConfig(Section):
    """The LDM reference's augmentation of HR crops (the LR is made from the augmented HR, so both stay aligned)."""

    prob: float = Field(0.7, ge=0, le=1, description="Share of samples augmented at all")
    hflip: float = Field(0.5, ge=0, le=1)
    rotate: float = Field(0.5, ge=0, le=1, description="Probability of a rotation by 90, 180 or 270 degrees")
    resized_crop: float = Field(0.5, ge=0, le=1, description="Probability of a random resized crop")
    resized_crop_scale: float = Field(0.8, gt=0, le=1, description="Side of that crop relative to the image (the reference's 80 %)")
    cutout: float = Field(0.3, ge=0, le=1, description="Probability of a cutout (the reference's 30 %)")
    cutout_size: float = Field(0.2, gt=0, lt=1, description="Side of the zeroed square relative to the image (20 %)")


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


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
class VGGConfig(Section):
    weights: str = Field(
        "torchvision",
        description="'torchvision' (TORCH_HOME cache), a path/URI to vgg19 ImageNet weights, or "
        "'random-init-for-testing' (explicit, meaningless features: tests and demos only)",
    )


def _check_zero_stage(stage: int | None) -> int | None:
    if stage is not None and stage not in (0, 1, 2):
        raise ValueError(
            f"ZeRO stage {stage} is not supported (0: data parallel, 1: optimiser states partitioned, 2: optimiser "
            "states and gradients partitioned); stage 3 partitions the parameters themselves, which the loop's "
            "EMA and export read whole"
        )
    return stage


class DeepSpeedEngineConfig(Section):
    """Per-engine overrides of ``train.deepspeed`` (keyed by network name, e.g. ``net_d``); empty: inherited."""

    zero_stage: int | None = Field(None, description="ZeRO stage 0, 1 or 2 of this engine")
    reduce_bucket_size: int | None = Field(None, ge=1, description="Elements per gradient reduction bucket")

    @field_validator("zero_stage")
    @classmethod
    def _stage(cls, stage: int | None) -> int | None:
        return _check_zero_stage(stage)


class DeepSpeedConfig(Section):
    """``train.strategy: deepspeed``: one DeepSpeed engine per trained network (medsr_dist/train/deepspeed_strategy.py)."""

    zero_stage: int = Field(2, description="ZeRO stage 0 (data parallel), 1 (optimiser states partitioned) or 2 "
                            "(optimiser states + gradients partitioned)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Forward precision (torch autocast; weights, gradients, optimiser states stay fp32); "
        "fp16 needs train.use_gpu=true")
    reduce_bucket_size: int = Field(50_000_000, ge=1, description="Elements per gradient reduction / all-gather bucket")
    engines: dict[str, DeepSpeedEngineConfig] = Field(
        default_factory=dict, description="Per-network overrides, e.g. {net_d: {zero_stage: 0}}")

    @field_validator("zero_stage")
    @classmethod
    def _stage(cls, stage: int) -> int:
        return _check_zero_stage(stage)


class TrainConfig(Section):
    dataset: str | None = Field(None, description="Prepared dataset prefix (default: prepare.output)")
    output: str | None = Field(None, description="Checkpoints and exports (default: <run.root>/train)")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool | None = Field(None, description="Train on GPUs; empty: when the cluster has any")
    cpus_per_worker: float = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1, description="Samples per worker per iteration")
    iterations: int = Field(100, ge=1)
    lr_g: float = Field(1e-4, gt=0)
    lr_d: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    milestones: list[int] = Field(default_factory=lambda: [400000], description="MultiStepLR milestones (iterations)")
    lr_gamma: float = Field(0.5, gt=0)
    lr_schedule: Literal["multistep", "cosine"] = Field(
        "multistep", description="multistep: x lr_gamma at each of milestones; cosine: from the base LR down to "
        "lr_min_ratio x it over train.iterations (cosine annealing, no restarts; milestones ignored)")
    lr_min_ratio: float = Field(0.01, ge=0, le=1, description="cosine schedule: final LR / base LR")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    checkpoint_every: int = Field(50, ge=1)
    val_every: int = Field(50, ge=1)
    log_every: int = Field(
        50, ge=1, description="Report metrics to Ray Train every N iterations (and at checkpoints); Ray Train takes "
        "one report per worker every ~2 s, so reports much more frequent than that stall the loop",
    )
    num_checkpoints_kept: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0, description="Worker-group restarts (Ray Train FailureConfig)")
    reproducible_order: bool = Field(
        True, description="Every worker gets the same samples in the same order on every run with the same run.seed "
        "and data (Ray Data preserve_order: the same weights bit for bit on CPU); false lets a slow degradation block "
        "be overtaken (throughput first, runs differ)")
    mixed_precision: bool = Field(False, description="autocast fp16 on GPU (ignored on CPU)")
    vgg: VGGConfig = Field(default_factory=VGGConfig)
    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description="Distributed strategy: PyTorch DDP or DeepSpeed ZeRO")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)

    @model_validator(mode="after")
    def _deepspeed_precision(self) -> "TrainConfig":
        if self.strategy != "deepspeed":
            return self
        if self.mixed_precision:
            raise ValueError("train.mixed_precision is the ddp strategy's switch; with train.strategy=deepspeed set "
                             "train.deepspeed.precision (fp32, bf16, fp16)")
        if self.deepspeed.precision == "fp16" and self.use_gpu is not True:
            raise ValueError("train.deepspeed.precision: fp16 needs GPUs (DeepSpeed has no fp16 on CPU); set "
                             "train.use_gpu=true on a GPU cluster, or use bf16 or fp32")
        return self


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------
def _is_dicomweb(uri: Any) -> bool:
    """Whether ``uri`` is spelled ``dicomweb+http(s)://`` (medsr_dist.pacs.dicomweb.is_dicomweb without its import)."""
    return isinstance(uri, str) and uri.lower().startswith(("dicomweb+http://", "dicomweb+https://"))


class EnhanceVolumesConfig(Section):
    """Volume items of the nightly job (medsr_dist/mri/nightly.py): NIfTI files and DICOM series folders are
    reconstructed to isotropic by the cross-plane method (``mri.factor``, ``mri.fusion``, ``mri.profile``)."""

    enabled: bool = Field(True, description="Treat .nii/.nii.gz inputs and series folders as volumes (off: they go "
                          "the 2-D way, where NIfTI files are error rows)")
    checkpoint: str | None = Field(None, description="Scale-1 through-plane model (medsr mri prepare + train, or "
                                   "self-sr's export); empty: enhance.checkpoint when that is scale 1, else volume "
                                   "items are error rows saying so")
    series_folders: list[str] = Field(
        default_factory=list, description="Glob patterns (relative to enhance.input, e.g. 'mri/*/*') of folders that "
        "each hold the single-frame slices of ONE DICOM series: every file directly in such a folder is part of that "
        "folder's volume item (decided at listing time, no file read); other DICOM files stay 2-D items")


class EnhanceConfig(Section):
    input: str | None = Field(None, description="Archive prefix to enhance (default: sample.holdout)")
    output: str | None = Field(None, description="Output prefix (default: <run.root>/enhanced)")
    checkpoint: str | None = Field(None, description="Model file (default: <train.output>/export/model.pth)")
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    backend: Literal["torch", "onnxruntime"] = "torch"
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="fp16: GPU only (CPU replicas run fp32), up to 1.24/255 of the range off fp32 (~20 stored "
        "values at 12 bits, ~320 at 16); bf16: GPU or a CPU with bf16 hardware, ~2x there but 8-18/255 off fp32 "
        "(130-290 at 12 bits; docs/PERFORMANCE.md). Applies to every input: keep fp32 for archives above 8 bits. "
        "Outputs record the precision that ran")
    tile: int = Field(0, ge=0, description="Tile size in input pixels; 0: whole image")
    tile_overlap: int = Field(64, ge=0, description="Context pixels beyond each tile; 64 keeps RealESRGAN_x4plus "
                              "within 2/255 of its untiled output, 16 leaves seams of ~25/255 (docs/PERFORMANCE.md)")
    batch_size: int | None = Field(
        None, ge=1, description="Tiles per model call; empty: 1 on CPU (fastest there), 8 on a GPU"
    )
    tile_blend: int = Field(4, ge=0, description="Half-width of the cross-fade between neighbouring tiles (0: hard crop)")
    images_per_batch: int = Field(
        4, ge=1, description="Images handed to a model replica at once; tiles of same-sized images share model calls"
    )
    outscale: float | None = Field(None, gt=0, description="Final scale (Lanczos after the model); empty: model scale")
    onnx_model: str | None = Field(None, description="ONNX export for backend onnxruntime (default: model.onnx beside checkpoint)")
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs of a model replica (its torch/ORT threads) when it has no GPU")
    replica_start_timeout_s: int = Field(
        600, ge=0, description="Seconds a pass waits for its min_replicas model replicas to start before it reads any "
        "item (Ray Data's wait_for_min_actors_s; on CPU-only nodes the decode/encode tasks would otherwise take the "
        "CPUs a pending replica needs and the pass would run on fewer); the run fails naming enhance.min_replicas "
        "if they do not start in time; 0: do not wait")
    replicas: str = Field(
        "local", pattern=r"^(local|serve:.+)$", description="Where the model runs: 'local' (the job's own actor pool "
        "of min_replicas..max_replicas) or 'serve:<app>' (the model deployment of a running Serve application "
        "serving the same model file, by sha256, through a DeploymentHandle: one GPU pool for on-demand and batch "
        "work; tile, backend and precision must equal the app's; min/max_replicas then count the job's client "
        "actors, each keeping images_per_batch images in flight)")
    fail_on_error: bool = False
    consistency_threshold_db: float = Field(
        30.0, description="Rows whose consistency PSNR (output degraded back vs input) is below this are flagged for review"
    )
    report_images: int = Field(2, ge=0, description="Side-by-side figures in the report (hold-out ground truth needed)")
    max_input_pixels: int = Field(
        100_000_000, ge=1, description="Largest input (height x width x frames) read from its header before decoding; "
        "larger ones are refused unread (error row). The default fits a 4k x 5k mammogram with room to spare")
    max_output_pixels: int = Field(
        400_000_000, ge=1, description="Largest output (height x width x frames after outscale); 4k x 5k at x4 is "
        "320 M. The replica's float32 RGB canvas is 12 bytes per output pixel")
    max_attempts: int = Field(
        3, ge=1, description="Runs in which an input may kill its model replica (crash, out of memory) before it is "
        "'quarantined' and no longer tried (until its content changes)")
    lease_ttl_s: float = Field(
        600.0, gt=0, description="One run per output prefix: a run's lease (_manifest/lease.json), refreshed every "
        "third of this, may be taken over by another run once it is this old")
    sampling: SamplingOverride = Field(
        default_factory=SamplingOverride, description="ldm models: sampler, steps, samples K, output (mean | first), "
        "seed instead of the export's model.sampling; part of every output's key and provenance")
    uncertainty_threshold: float | None = Field(
        0.05, ge=0, description="ldm with K > 1 samples: rows whose uncertainty_p99 (99th percentile of the per-pixel "
        "std map, in units of the intensity range) exceeds this are flagged for review; empty: never flagged for it")
    log_keys: bool = Field(False, description="Name input keys in job logs (keys often embed accession numbers); "
                           "off: logs name items by item id. Manifests always keep keys")
    dicom_compression: Literal["none", "rle", "jpeg2000-lossless"] = Field(
        "none", description="Transfer syntax of derived DICOM objects: none (Explicit VR Little Endian), rle (RLE "
        "Lossless) or jpeg2000-lossless (JPEG 2000 Lossless Only); every stored value is kept, never lossy")
    volumes: EnhanceVolumesConfig = Field(default_factory=EnhanceVolumesConfig,
                                          description="NIfTI volumes and DICOM series as items (3-D MRI)")
    manifest: str | None = Field(
        None, description="Where manifests, item records, the run lease and the PACS watermark live (a local path or "
        "object-store prefix; default: enhance.output). Required when enhance.output is a DICOMweb endpoint "
        "(dicomweb+http(s)://host:port/<root>; pacs section), since a PACS holds DICOM objects only",
        validate_default=True)

    @model_validator(mode="after")
    def _replicas(self) -> "EnhanceConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self

    @field_validator("input", "output")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        """A DICOMweb endpoint is well formed: no credentials or query in it, its root rather than one instance."""
        if _is_dicomweb(v):
            from medsr_dist.pacs.dicomweb import Endpoint

            _, ref = Endpoint.parse(v)
            if ref is not None:
                raise ValueError("name the DICOMweb endpoint (its root), not one instance")
        return v

    @field_validator("manifest")
    @classmethod
    def _manifest(cls, v: str | None, info: ValidationInfo) -> str | None:
        if _is_dicomweb(v):
            raise ValueError("must be a local path or an object-store prefix, not a DICOMweb endpoint")
        if _is_dicomweb(info.data.get("output")) and not v:
            raise ValueError("required when enhance.output is a DICOMweb endpoint (the manifest, item records and the "
                             "run's lease cannot live in a PACS): give a local path or s3:// prefix")
        return v


class PacsConfig(Section):
    """DICOMweb endpoints: ``enhance.input`` / ``enhance.output`` spelled ``dicomweb+http(s)://host:port/<root>``
    (``medsr_dist/pacs``). Credentials are never part of a config: HTTP basic (user and password) or a bearer token
    are read from the environment variables named here, or from secret files (mode 0600 advised)."""

    class Query(Section):
        """QIDO-RS filters selecting the instances to enhance (all given filters must match)."""

        modality: list[str] = Field(default_factory=list, description="Series Modality codes (CT, MR, CR, DX...); empty: any")
        study_date_from: str | None = Field(None, description="First StudyDate, YYYYMMDD (inclusive)")
        study_date_to: str | None = Field(None, description="Last StudyDate, YYYYMMDD (inclusive)")
        since_watermark: bool = Field(False, description="Only studies whose StudyDate is on or after the latest "
                                      "StudyDate the previous run saw (inclusive; late arrivals with older dates "
                                      "need a run without it)")
        study_uids: list[str] = Field(default_factory=list, description="Only these StudyInstanceUIDs")
        series_uids: list[str] = Field(default_factory=list, description="Only these SeriesInstanceUIDs")
        limit: int | None = Field(None, ge=1, description="At most this many instances per run (oldest StudyDate first)")

        @field_validator("study_date_from", "study_date_to", mode="before")
        @classmethod
        def _date(cls, v: Any) -> str | None:
            import datetime

            if v is None:
                return v
            v = str(v)
            try:
                datetime.datetime.strptime(v, "%Y%m%d")
            except ValueError:
                raise ValueError(f"a DICOM date YYYYMMDD, got {v!r}") from None
            return v

        @field_validator("modality")
        @classmethod
        def _modality(cls, v: list[str]) -> list[str]:
            bad = [m for m in v if not (1 <= len(m) <= 16 and m.replace("_", "").isalnum() and m.isupper())]
            if bad:
                raise ValueError(f"Modality codes are upper-case DICOM CS values (CT, MR, DX...), got {bad}")
            return v

        @field_validator("study_uids", "series_uids")
        @classmethod
        def _uids(cls, v: list[str]) -> list[str]:
            bad = [u for u in v if not (0 < len(u) <= 64 and all(c.isdigit() or c == "." for c in u))]
            if bad:
                raise ValueError(f"UIDs are digits and dots, at most 64 characters; got {len(bad)} that are not")
            return v

    query: Query = Field(default_factory=Query)
    username_env: str = Field("MEDSR_PACS_USERNAME", description="Environment variable holding the HTTP basic user")
    password_env: str = Field("MEDSR_PACS_PASSWORD", description="Environment variable holding the HTTP basic password")
    password_file: str | None = Field(None, description="File holding the password (instead of password_env)")
    token_env: str = Field("MEDSR_PACS_TOKEN", description="Environment variable holding a bearer token")
    token_file: str | None = Field(None, description="File holding a bearer token (instead of token_env)")
    ca_bundle: str | None = Field(None, description="PEM CA bundle for https endpoints (default: the system's); "
                                  "TLS certificates are always verified")
    timeout_s: float = Field(60.0, gt=0, description="Read timeout of one request (connect: at most 10 s)")
    retries: int = Field(4, ge=0, description="Retries of a request on connection errors, timeouts and HTTP 429/5xx")
    backoff_s: float = Field(0.5, ge=0, description="Exponential backoff base between retries (0.5, 1, 2, ... s)")
    concurrency: int = Field(2, ge=1, le=64, description="Concurrent WADO-RS / STOW-RS requests per process; "
                             "the nightly job runs at most this many read tasks and this many write tasks, so the "
                             "PACS sees at most this many retrieves and this many stores at once, however large "
                             "the cluster (a nightly run must never flood a clinical system)")


class EvalConfig(Section):
    """`medsr eval`: score models under a paper's evaluation protocol (see ``medsr_dist.eval.protocols``).

    Nested sections are defined inside this class so the evaluation adds one section to the tree.
    """

    class Model(Section):
        name: str = Field(..., min_length=1, description="Label of the model in tables and figures")
        source: str = Field(
            ..., min_length=1,
            description="'bicubic'; a model file (model.pth with meta.json beside it, or a plain BasicSR RRDBNet "
            "checkpoint such as RealESRGAN_x4plus.pth); or a zoo name (e.g. RealESRGAN_x4plus) found under eval.weights_dir "
            "or in the model zoo's cache (nothing is downloaded)",
        )
        baseline: bool = Field(False, description="Compare every model with the first baseline (default: the first model)")
        sampling: SamplingOverride | None = Field(
            None, description="ldm models: sampler/steps/samples/seed instead of the export's (list one model per "
            "sampler to compare them)")

    class Params(Section):
        """Overrides of the preset's parameters; a key left out keeps the preset's value (null is a value)."""

        scale: int | None = Field(None, ge=1, description="Super-resolution factor")
        source_size: int | None = Field(None, ge=1, description="Required side of the source images (null: any)")
        hr_size: int | None = Field(None, ge=1, description="Side of the ground truth (null: the source, modcropped)")
        hr_resize: Literal["none", "lanczos", "cubic", "area"] | None = Field(None, description="How the source becomes hr_size")
        lr_from: Literal["hr", "source"] | None = Field(None, description="Downsample the ground truth or the source")
        downsample: Literal["matlab", "opencv"] | None = Field(None, description="Bicubic kernel: MATLAB imresize (antialiased) or cv2 INTER_CUBIC")
        blur_sigma: float | None = Field(None, ge=0, description="Gaussian blur after downsampling (0: none)")
        test_y_channel: bool | None = Field(None, description="Metrics on the Y channel of RGB images")
        crop_border: int | None = Field(None, ge=0, description="Pixels ignored at each edge by the metrics")
        lr_quantization: Literal["source", "8bit", "none"] | None = Field(
            None, description="Round the model input like a real low-resolution file: 'source' (every preset) to the "
            "source's levels (255 / 4095 for 12-bit DICOM / 65535), '8bit' to 255 levels, 'none' keeps float")
        axis: Literal["axial", "coronal", "sagittal"] | None = Field(
            None, description="Volume protocols (mri-aniso-x*): the plane whose normal gets the thick slices")
        profile: Literal["gaussian", "box"] | None = Field(
            None, description="Volume protocols: slice profile of the simulated thick slices")
        fusion: Literal["mean", "fourier"] | None = Field(
            None, description="Volume protocols: fusion of the two refined orientations of the models")

        @model_serializer(mode="wrap")
        def _only_set(self, handler):
            # Only the keys given are overrides (null included): dump just those, so a dumped config
            # (shipped to Ray workers, or printed by `medsr config`) loads back to the same protocol.
            return {k: v for k, v in handler(self).items() if k in self.model_fields_set}

    class Lpips(Section):
        enabled: bool = True
        net: Literal["alex", "vgg", "squeeze"] = "alex"
        backbone: str = Field(
            "torchvision",
            description="ImageNet weights of the LPIPS backbone: 'torchvision' (the TORCH_HOME hub cache) or a "
            "path/URI of that file; when absent the LPIPS column says 'unavailable' and the report says why",
        )

    class Bootstrap(Section):
        samples: int = Field(10000, ge=100, description="Bootstrap resamples of the paired differences")
        confidence: float = Field(0.95, gt=0, lt=1)
        seed: int = 0

    protocol: str = Field("nih-x4", description="Preset: drive-x2, nih-x4, cxr14-ldm, bicubic-x2, bicubic-x3, bicubic-x4; "
                          "volumes (NIfTI): mri-aniso-x2, mri-aniso-x3, mri-aniso-x4")
    params: Params = Field(default_factory=Params)
    dataset: str | None = Field(None, description="Images prefix, or a prepared dataset when split is set (default: prepare.output)")
    split: str | None = Field("test", description="Split of a prepared dataset; null: dataset is a prefix of image files")
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N images (sorted by key)")
    output: str | None = Field(None, description="Report prefix (default: <run.root>/eval/<protocol>)")
    models: list[Model] = Field(default_factory=lambda: [EvalConfig.Model(name="bicubic", source="bicubic")])
    weights_dir: str | None = Field(None, description="Where zoo names are looked up as <name>/model.pth or <name>.pth (default: <run.root>/weights, then the torch hub cache); then the model zoo's cache")
    figures: int = Field(4, ge=0, description="Images shown as LR | bicubic | models | ground truth figures")
    figure_images: list[str] = Field(default_factory=list, description="Names of the figure images (default: the first ones)")
    crop_box: tuple[int, int, int, int] | None = Field(None, description="Magnified region [y, x, height, width] in ground-truth pixels; null: where models disagree most")
    zoom: int = Field(4, ge=1, description="Magnification of the region row")
    figure_panel: int = Field(512, ge=16, description="Largest side of a figure panel; larger images are drawn downscaled (the magnified row keeps full resolution)")
    lpips: Lpips = Field(default_factory=Lpips)
    bootstrap: Bootstrap = Field(default_factory=Bootstrap)
    backend: Literal["torch", "onnxruntime"] = "torch"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    tile: int = Field(0, ge=0, description="Tile size in input pixels; 0: whole image")
    tile_overlap: int = Field(64, ge=0, description="Context pixels beyond each tile; 64 keeps RealESRGAN_x4plus "
                              "within 2/255 of its untiled output, 16 leaves seams of ~25/255 (docs/PERFORMANCE.md)")
    batch_size: int = Field(4, ge=1, description="Images per Ray Data batch and tiles per model call")
    replicas: int = Field(1, ge=1, description="Model replicas (actors holding every model; one GPU each when present)")
    cpus_per_replica: float = Field(1.0, gt=0)
    score_workers: int = Field(1, ge=1, description="CPU actors computing metrics and figures")

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        from medsr_dist.eval.protocols import resolve_protocol  # raises ValueError naming the bad parameter

        protocol = resolve_protocol(self.protocol, {k: getattr(self.params, k) for k in self.params.model_fields_set})
        names = [m.name for m in self.models]
        if not names and not hasattr(protocol, "fusion"):  # volume protocols always score their interpolations
            raise ValueError("eval.models is empty: list at least one model (e.g. {name: bicubic, source: bicubic})")
        if len(set(names)) != len(names):
            raise ValueError(f"eval.models: model names must be unique, got {names}")
        return self


class ServeConfig(Section):
    """`medsr serve`: the on-demand endpoint (medsr_dist/serve/). One Serve deployment per model (own replicas,
    autoscaling and GPU each), behind one FastAPI ingress; tiles of concurrent requests share model calls."""

    class Model(Section):
        name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Name in requests (?model=)")
        checkpoint: str = Field(..., min_length=1, description="Model file (export, BasicSR checkpoint or zoo name)")
        onnx_model: str | None = Field(None, description="ONNX export for backend onnxruntime (default: beside checkpoint)")
        sampling: SamplingOverride | None = Field(
            None, description="ldm models: sampler/steps/seed instead of the export's (e.g. dpmsolver++ with 20 steps "
            "on demand); samples must be 1 (an answer is one file: no uncertainty map); recorded in every answer")

    app_name: str = Field("medsr", min_length=1, description="Serve application name")
    route_prefix: str = Field("/", description="HTTP route prefix of the application")
    host: str = Field("127.0.0.1", description="HTTP proxy host (0.0.0.0 to listen on every interface)")
    port: int = Field(8000, ge=1, le=65535)
    models: list[Model] = Field(default_factory=list, description="Models served by name; empty: enhance.checkpoint as 'default'")
    backend: Literal["torch", "onnxruntime"] = "torch"
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="As enhance.precision; responses record what ran")
    tile: int = Field(128, ge=0, description="Tile size in input pixels (0: whole image); tiles are what requests share")
    tile_overlap: int = Field(64, ge=0)
    tile_blend: int = Field(4, ge=0)
    max_batch_size: int = Field(4, ge=1, description="Most tiles per model call, gathered across concurrent requests")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a partial tile batch waits for more tiles")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Requests a model replica works on at once; empty: max_batch_size (never less: "
        "batches would never fill)")
    max_queued_requests: int = Field(16, ge=1, description="Requests waiting per caller beyond that; more get 503 + Retry-After")
    retry_after_s: int = Field(2, ge=1, description="Retry-After of a 503 for a full queue")
    request_timeout_s: float | None = Field(60.0, gt=0, description="End to end; a slower request gets 408")
    min_replicas: int = Field(1, ge=0, description="Model replicas per model when idle")
    max_replicas: int = Field(2, ge=1, description="Model replicas per model at most (one GPU each when GPUs exist)")
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0, description="Autoscaling target per replica")
    upscale_delay_s: float = Field(3.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    ingress_replicas: int = Field(1, ge=1, description="FastAPI ingress replicas (parse, probe, route; no model)")
    cpus_per_replica: float = Field(1.0, ge=0, description="CPUs of a model replica without a GPU")
    gpus_per_replica: float | None = Field(None, ge=0, description="Empty: 1 when the cluster has GPUs, else 0")
    max_body_bytes: int = Field(256 << 20, ge=1, description="Largest request body; larger ones get 413 unread")
    max_input_pixels: int = Field(50_000_000, ge=1, description="Header limit (height x width x frames), else 413 undecoded")
    max_output_pixels: int = Field(200_000_000, ge=1, description="Output limit at the request's outscale, else 413")
    dicom_compression: Literal["none", "rle", "jpeg2000-lossless"] = "none"

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) is below max_batch_size "
                             f"({self.max_batch_size}): tile batches could never fill")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be unique, got {names}")
        return self


class MriConfig(Section):
    """3-D MRI (``medsr mri``, medsr_dist/mri): slice-pair simulation (``prepare``) and volume reconstruction."""

    mode: Literal["supervised", "self"] = Field(
        "supervised", description="supervised: isotropic volumes -> the six pairings; self: each anisotropic "
        "volume's own in-plane slices degraded to its through-plane resolution (SMORE)")
    factor: int = Field(4, ge=2, le=8, description="Slice-thickness factor k (output spacing = input spacing / k)")
    profile: Literal["box", "gaussian"] = Field(
        "gaussian", description="Slice profile of the simulated thick slices: box (mean of k) or Gaussian (FWHM k)")
    skip_empty: float = Field(0.02, ge=0, lt=1, description="Drop pairs whose ground truth has at most this "
                              "fraction of foreground voxels (5 % of the volume's range above its minimum)")
    include: list[str] = Field(default_factory=lambda: ["**/*.nii", "**/*.nii.gz", "*.nii", "*.nii.gz"],
                               description="Volume files under prepare.input")
    val_every: int = Field(10, ge=2, description="self mode: every n-th slice pair goes to val (one volume has "
                           "no patient split; val only monitors training)")
    fusion: Literal["mean", "fourier"] = Field("mean", description="How the two refined orientations are fused")
    subimage: int = Field(0, ge=0, description="prepare: cut each slice pair into overlapping sub-images of this "
                          "size (step half of it, the last one flush with the border; 0: whole slices). A single "
                          "volume has few slices: sub-images give the training stream enough rows for long runs, "
                          "and decoding one costs a fraction of a whole slice")


class MedsrConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    degradation: DegradationConfig = Field(default_factory=DegradationConfig)
    model: ModelConfig = Field(default_factory=RealESRGANModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    enhance: EnhanceConfig = Field(default_factory=EnhanceConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    pacs: PacsConfig = Field(default_factory=PacsConfig)
    mri: MriConfig = Field(default_factory=MriConfig)
    _source: str = PrivateAttr("<defaults>")

    @property
    def source(self) -> str:
        """Where this config came from (file and overrides), for error messages."""
        return self._source

    @field_validator("model", mode="before")
    @classmethod
    def _default_family(cls, v: Any) -> Any:
        if isinstance(v, dict) and "family" not in v:  # configs written before families had sections
            return {"family": "realesrgan", **v}
        return v

    @model_validator(mode="after")
    def _crop_fits_discriminator(self) -> "MedsrConfig":
        d = getattr(self.model, "discriminator", None)
        if isinstance(d, VGGDiscriminatorConfig):
            scale = self.model.scale
            need = -(-d.input_size // scale) * scale  # x3: 129 / 258, the discriminator sees the first 128 / 256 px
            if self.degradation.gt_size != need:
                raise ValueError(
                    f"degradation.gt_size: {self.degradation.gt_size} does not match model.discriminator.input_size "
                    f"{d.input_size} at x{scale}: set degradation.gt_size={need} (basicsr's VGGStyleDiscriminator "
                    f"takes exactly 128 or 256 px; at x3 the crop is the next multiple of 3 and D sees its first "
                    f"{d.input_size} px)"
                )
        return self

    @model_validator(mode="after")
    def _schedule_supported(self) -> "MedsrConfig":
        if self.train.lr_schedule != "multistep" and self.model.family in ("vae", "ldm"):
            raise ValueError(f"train.lr_schedule: {self.train.lr_schedule!r} is implemented for the generator "
                             f"families; the {self.model.family} family steps its LR by train.milestones (multistep)")
        return self

    @model_validator(mode="after")
    def _crop_fits_latents(self) -> "MedsrConfig":
        m = self.model
        if m.family not in ("vae", "ldm"):
            return self
        need = m.vae_arch.downsampling * (m.unet.downsampling if m.family == "ldm" else 1)
        gt = self.degradation.gt_size
        if gt % need or (m.family == "ldm" and gt % 4):
            what = f"the VAE's downsampling {m.vae_arch.downsampling}" + (
                f" x the U-Net's {m.unet.downsampling}" if m.family == "ldm" else "")
            raise ValueError(f"degradation.gt_size: {gt} px gives no whole latent grid: it must be a multiple of {need} "
                             f"({what}) and of the x4 scale (the ldm stage's LR side is gt_size/4)")
        return self

    @model_validator(mode="after")
    def _derive_paths(self) -> "MedsrConfig":
        """Fill empty stage paths from run.root: the one place stage defaults are derived."""
        root = self.run.root.rstrip("/")
        defaults = [
            (self.sample, "archive", f"{root}/archive"),
            (self.sample, "holdout", f"{root}/holdout"),
            (self.prepare, "input", None),
            (self.prepare, "output", f"{root}/dataset"),
            (self.train, "dataset", None),
            (self.train, "output", f"{root}/train"),
            (self.enhance, "input", None),
            (self.enhance, "output", f"{root}/enhanced"),
            (self.enhance, "checkpoint", None),
        ]
        for section, key, value in defaults:
            if getattr(section, key) is None and value is not None:
                object.__setattr__(section, key, value)
        if self.prepare.input is None:
            object.__setattr__(self.prepare, "input", self.sample.archive)
        if self.train.dataset is None:
            object.__setattr__(self.train, "dataset", self.prepare.output)
        if self.enhance.input is None:
            object.__setattr__(self.enhance, "input", self.sample.holdout)
        if self.enhance.checkpoint is None:
            object.__setattr__(self.enhance, "checkpoint", f"{self.train.output.rstrip('/')}/export/model.pth")
        return self


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{'.'.join(parts[: i + 1])}' is not a section, cannot set '{dotted}'")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.iterations=10", "model.scale=2"]`` -> ``[("train.iterations", 10), ...]`` (values parsed as YAML)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.iterations=10)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
        parsed.append((key, value))
    return parsed


_UNION_TAGS = set(FAMILIES) | set(GENERATOR_SCALES) | {"UNetDiscriminatorSN", "VGGStyleDiscriminator"}


def _format_error(exc: ValidationError, source: str, tree: dict) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        # discriminated unions put the tag (family / generator type) into the location: drop it
        # (only in a tag's position: `vae` is both a family and the ldm section's model.vae key)
        loc = ".".join(str(p) for i, p in enumerate(err["loc"])
                       if not (p in _UNION_TAGS and i and err["loc"][i - 1] in ("model", "generator", "discriminator"))
                       ) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "union_tag_invalid" and err.get("ctx", {}).get("discriminator") == "'family'":
            loc, msg = f"{loc}.family", f"unknown model family {err['ctx']['tag']!r} (known: {', '.join(sorted(FAMILIES))})"
            lines.append(f"  {loc}: {msg}")
            continue
        if loc == "<root>" and msg.split(":", 1)[0].count(".") == 1:  # a cross-section rule that names its key
            lines.append(f"  {msg}")
            continue
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            if loc == "train.losses":
                msg = "unknown key (loss weights are per family now: model.losses)"
        # (a URI with user:password@ is not echoed: credentials stay off the console and out of logs)
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict) and not (
                isinstance(err["input"], str) and "@" in err["input"].partition("://")[2].partition("/")[0]):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> MedsrConfig:
    """Read a YAML config (or the built-in defaults when ``path`` is None) and apply overrides.

    Raises :class:`ConfigError` naming the file (and the override, if one caused it) and the key.
    """
    source = "<defaults>"
    tree: dict = {}
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {source} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {source} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {source}: top level must be a mapping of sections")
        tree = loaded
    parsed = parse_overrides(list(overrides or []))
    for key, value in parsed:
        _set_dotted(tree, key, value, f"{source} (override {key})")
    if parsed:
        source = f"{source} with overrides {', '.join(k for k, _ in parsed)}"
    try:
        cfg = MedsrConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source, tree)) from None
    cfg._source = source
    return cfg


def check_local_inputs(cfg: MedsrConfig, stage: str) -> None:
    """Fail early when a stage's input is a local path that does not exist (remote inputs are checked by the stage)."""
    inputs = {
        "prepare": [("prepare.input", cfg.prepare.input)],
        "train": [("train.dataset", cfg.train.dataset)]
        + ([("model.pretrained_g", cfg.model.pretrained_g)] if getattr(cfg.model, "pretrained_g", None) else [])
        + ([("model.vae", cfg.model.vae)] if getattr(cfg.model, "vae", None) else []),
        "enhance": [("enhance.input", cfg.enhance.input), ("enhance.checkpoint", cfg.enhance.checkpoint)],
    }[stage]
    for key, uri in inputs:
        if uri is None or "://" in uri and not uri.startswith("file://"):
            continue
        local = uri[len("file://"):] if uri.startswith("file://") else uri
        if key in ("model.pretrained_g", "model.pretrained_d", "enhance.checkpoint") and not (
            "/" in local or local.endswith((".pth", ".pt", ".safetensors"))
        ):
            continue  # a model-zoo name, resolved by the zoo
        if not os.path.exists(local):
            raise ConfigError(f"invalid config {cfg.source}:\n  {key}: path {uri} does not exist")
        if key == "model.vae":
            _check_vae_export(cfg, local)
        if key == "enhance.checkpoint" and cfg.enhance.sampling.overrides():
            _check_sampling(cfg, uri)


def _check_sampling(cfg: MedsrConfig, checkpoint: str) -> None:
    """``enhance.sampling`` must fit the model it overrides (an ldm export; steps within its schedule)."""
    from medsr_dist.infer.model_file import read_model_file

    try:
        read_model_file(checkpoint, cfg.storage).with_sampling(cfg.enhance.sampling.overrides(), "enhance.sampling")
    except ValueError as exc:
        raise ConfigError(f"invalid config {cfg.source}:\n  {exc}") from None


def _check_vae_export(cfg: MedsrConfig, local: str) -> None:
    """A `vae` export named by ``model.vae`` must have the architecture of ``model.vae_arch`` (read from its meta.json)."""
    import json

    meta_path = os.path.join(os.path.dirname(local), "meta.json") if os.path.isfile(local) else None
    if meta_path is None or not os.path.isfile(meta_path):
        return  # a diffusers folder: its config.json is checked when it is loaded
    meta = json.loads(Path(meta_path).read_text())
    if meta.get("family") != "vae":
        raise ConfigError(f"invalid config {cfg.source}:\n  model.vae: {local} is a {meta.get('family')!r} export, "
                          "not a `vae` stage's")
    arch = meta.get("generator", {}).get("vae_arch")
    want = cfg.model.vae_arch.model_dump(mode="json")
    if arch != want:
        raise ConfigError(f"invalid config {cfg.source}:\n  model.vae_arch: {want} does not match the VAE export "
                          f"{local} ({arch}); latents would not have the shape the U-Net expects")


def dump_config(cfg: MedsrConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
