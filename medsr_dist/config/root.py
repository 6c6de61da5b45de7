"""The root of the tree (:class:`MedsrConfig`) and how a config is loaded: YAML file, ``key=value`` overrides,
error messages naming the source and the key, and the dump."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from medsr_dist.config.base import ConfigError, Section
from medsr_dist.config.data import DegradationConfig, PrepareConfig, SampleConfig
from medsr_dist.config.enhance import EnhanceConfig
from medsr_dist.config.eval import EvalConfig
from medsr_dist.config.models import FAMILY_SECTIONS, GENERATOR_SCALES, ModelConfig, RealESRGANModelConfig, VGGDiscriminatorConfig
from medsr_dist.config.mri import MriConfig
from medsr_dist.config.pacs import PacsConfig
from medsr_dist.config.run import RayConfig, RunConfig, StorageConfig
from medsr_dist.config.serve import ServeConfig
from medsr_dist.config.train import TrainConfig


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


_UNION_TAGS = set(FAMILY_SECTIONS) | set(GENERATOR_SCALES) | {"UNetDiscriminatorSN", "VGGStyleDiscriminator"}


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
            loc, msg = f"{loc}.family", f"unknown model family {err['ctx']['tag']!r} (known: {', '.join(sorted(FAMILY_SECTIONS))})"
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


def dump_config(cfg: MedsrConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
