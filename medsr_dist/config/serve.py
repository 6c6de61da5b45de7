"""``serve``: the on-demand Ray Serve endpoint."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medsr_dist.config.base import Section
from medsr_dist.config.models import SamplingOverride


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
    backend: str = Field("torch", description="Inference backend: a name registered with medsr_dist.infer.backends "
                         "(torch, onnxruntime, ...), checked by medsr_dist.preflight before Ray starts")
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
    cpus_per_replica: float | Literal["auto"] = Field(
        "auto", description="CPUs of a model replica without a GPU (its intra-op threads: ceil of this); auto: the "
        "cluster's CPUs less 0.5 per node (ingress, HTTP proxy) shared by every model's max_replicas replicas")
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
