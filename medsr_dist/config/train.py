"""Training sections: the loop's settings, the VGG weights of the perceptual loss and the DeepSpeed strategy."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from medsr_dist.config.base import Section


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


class GuardConfig(Section):
    """Collapse detection at every validation (rank 0, on the val split's fixed pairs): a run whose outputs collapse
    (uniform grey or black images, NaNs, an input they no longer agree with) stops with a message naming what
    collapsed, and nothing is exported. Checks: output variance against the ground truth's, the consistency score
    (output downsampled back vs the input), validation PSNR against bicubic's."""

    enabled: bool | None = Field(
        None, description="null: on when the generator starts from weights (model.pretrained_g: a fine-tune); a run "
        "from scratch starts with near-constant outputs, so it is off there unless set to true")
    min_output_std_ratio: float = Field(
        0.2, ge=0, description="Collapsed when the outputs' mean standard deviation falls below this fraction of the "
        "ground truth's")
    min_consistency_db: float = Field(
        20.0, description="Collapsed when the mean consistency score (dB) of the outputs falls below this")
    max_psnr_below_bicubic_db: float = Field(
        10.0, ge=0, description="Collapsed when validation PSNR is more than this many dB below bicubic's")
    patience: int = Field(2, ge=1, description="Consecutive collapsed validations that stop the run")


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
    guard: GuardConfig = Field(default_factory=GuardConfig)
    export_best: bool = Field(
        True, description="Also export the EMA generator of the best validation PSNR so far to "
        "<train.output>/export/best/ (beside the last, <train.output>/export/); needs a val split")

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
