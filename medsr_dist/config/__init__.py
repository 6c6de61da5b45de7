"""One pydantic schema tree for every stage and model family.

A run is described by one YAML file (``configs/*.yaml``) plus ``key=value`` overrides. Every
section forbids unknown keys; values are type-checked; cross-field rules (a scale the chosen
architecture cannot do, split fractions that do not sum to one) are checked here, so a bad config
fails before any Ray work starts with a message naming the file and the key.

Paths are store URIs (local path, ``file://`` or ``s3://bucket/prefix``). Stage inputs and outputs
left empty default to folders under ``run.root``: that is the only place defaults are derived.

The sections are declarative and live one module per concern (``base``, ``run``, ``data``, ``models``, ``train``,
``enhance``, ``pacs``, ``eval``, ``serve``, ``mri``; ``root``: the tree, loading, overrides and error messages); this
package imports nothing of medsr_dist above it. Checks that need files or models (a local input exists, a VAE
export fits ``model.vae_arch``, sampling fits the checkpoint, a backend is registered) are
:mod:`medsr_dist.preflight`, run by every command before Ray starts.
"""
from __future__ import annotations

from medsr_dist.config.base import ConfigError, Range, Section
from medsr_dist.config.data import (
    KERNEL_PROBS, KERNEL_TYPES, AugmentConfig, BicubicConfig, DegradationConfig, MultiscaleConfig, PrepareConfig,
    SampleConfig, SplitConfig, SubimageConfig,
)
from medsr_dist.config.enhance import EnhanceConfig, EnhanceVolumesConfig
from medsr_dist.config.eval import EvalConfig
from medsr_dist.config.models import (
    FAMILY_SECTIONS, GENERATOR_SCALES, SAMPLERS, DiscriminatorConfig, ESRGANLossConfig, ESRGANModelConfig,
    GeneratorConfig, LDMModelConfig, LossConfig, ModelConfig, MSRResNetConfig, NoiseScheduleConfig, PixelLossConfig,
    PSNRModelConfig, RealESRGANModelConfig, RRDBNetConfig, SamplingConfig, SamplingOverride, SRGANModelConfig,
    UNetArchConfig, UNetDiscriminatorConfig, VAEArchConfig, VAELossConfig, VAEModelConfig, VGGDiscriminatorConfig,
    check_through_plane_model, through_plane_refiner_problem,
)
from medsr_dist.config.mri import MriConfig
from medsr_dist.config.pacs import PacsConfig
from medsr_dist.config.root import MedsrConfig, dump_config, load_config, parse_overrides
from medsr_dist.config.run import RayConfig, RunConfig, StorageConfig
from medsr_dist.config.serve import ServeConfig
from medsr_dist.config.train import DeepSpeedConfig, DeepSpeedEngineConfig, TrainConfig, VGGConfig

__all__ = [
    "AugmentConfig", "BicubicConfig", "ConfigError", "DeepSpeedConfig", "DeepSpeedEngineConfig", "DegradationConfig",
    "DiscriminatorConfig", "ESRGANLossConfig", "ESRGANModelConfig", "EnhanceConfig", "EnhanceVolumesConfig",
    "EvalConfig", "FAMILY_SECTIONS", "GENERATOR_SCALES", "GeneratorConfig", "KERNEL_PROBS", "KERNEL_TYPES",
    "LDMModelConfig", "LossConfig", "MSRResNetConfig", "MedsrConfig", "ModelConfig", "MriConfig", "MultiscaleConfig",
    "NoiseScheduleConfig", "PSNRModelConfig", "PacsConfig", "PixelLossConfig", "PrepareConfig", "RRDBNetConfig",
    "Range", "RayConfig", "RealESRGANModelConfig", "RunConfig", "SAMPLERS", "SRGANModelConfig", "SampleConfig",
    "SamplingConfig", "SamplingOverride", "Section", "ServeConfig", "SplitConfig", "StorageConfig", "SubimageConfig",
    "TrainConfig", "UNetArchConfig", "UNetDiscriminatorConfig", "VAEArchConfig", "VAELossConfig", "VAEModelConfig",
    "VGGConfig", "VGGDiscriminatorConfig", "check_through_plane_model", "dump_config", "load_config",
    "parse_overrides", "through_plane_refiner_problem",
]
