"""``serve``: the on-demand Ray Serve endpoint."""
from __future__ import annotations

import ipaddress
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from medsr_dist.config.base import Section
from medsr_dist.config.models import SamplingOverride


# --- serve.auth / serve.rate_limit (issue #25): who may call the endpoint, and how often -----------------------------

#: JWT signature algorithms an OIDC issuer may use: asymmetric only (never ``none``, never HS* whose "secret" would be
#: the issuer's public key).
ASYMMETRIC_JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


def is_loopback(host: str) -> bool:
    """True when ``host`` (an HTTP bind address) is reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


class ServeAuthConfig(Section):
    """``serve.auth``: authentication of every route but ``/healthz`` (medsr_dist/serve/auth.py). ``none`` is
    accepted only while ``serve.host`` is a loopback address."""

    mode: Literal["none", "tokens", "oidc"] = Field(
        "none", description="none (loopback only), tokens (static API tokens from tokens_file) or oidc (bearer JWTs "
        "of an OpenID Connect issuer)")
    tokens_file: str | None = Field(
        None, description="tokens: YAML list of {subject, sha256, models} (sha256 of each token, never the token; "
        "several entries with one subject rotate it); re-read when it changes")
    issuer: str | None = Field(None, description="oidc: the tokens' required `iss`")
    audience: str | None = Field(None, description="oidc: the required `aud` (this endpoint's client id)")
    jwks_url: str | None = Field(None, description="oidc: the issuer's jwks_uri (its /.well-known/openid-configuration)")
    algorithms: list[str] = Field(["RS256", "ES256"], min_length=1, description="oidc: signature algorithms "
                                  "accepted (asymmetric only)")
    leeway_s: int = Field(30, ge=0, le=300, description="oidc: clock skew allowed on exp/nbf/iat")
    models_claim: str = Field("scope", min_length=1, description="oidc: claim granting models (a space-separated "
                              "string such as `scope`, or a list such as `roles`)")
    grant_prefix: str = Field("medsr:", description="oidc: a grant `<prefix><model>` allows that model, "
                              "`<prefix>*` every model; other grants are ignored")
    jwks_cache_s: float = Field(3600.0, gt=0, description="oidc: keys are fetched again after this long")
    jwks_min_refresh_s: float = Field(30.0, ge=0, description="oidc: a token with an unknown `kid` refetches the "
                                      "keys at most this often (a flood of made-up kids cannot flood the issuer)")

    @field_validator("algorithms")
    @classmethod
    def _asymmetric(cls, value: list[str]) -> list[str]:
        bad = [a for a in value if a not in ASYMMETRIC_JWT_ALGORITHMS]
        if bad:
            raise ValueError(f"serve.auth.algorithms: {bad} not accepted; use asymmetric ones only: "
                             f"{list(ASYMMETRIC_JWT_ALGORITHMS)}")
        return value

    @model_validator(mode="after")
    def _complete(self) -> "ServeAuthConfig":
        if self.mode == "tokens" and not self.tokens_file:
            raise ValueError("serve.auth.tokens_file is required with serve.auth.mode tokens")
        if self.mode == "oidc":
            missing = [k for k in ("issuer", "audience", "jwks_url") if not getattr(self, k)]
            if missing:
                raise ValueError(f"serve.auth.mode oidc needs serve.auth.{', serve.auth.'.join(missing)}")
            url = urlsplit(self.jwks_url)
            if url.scheme != "https" and not (url.scheme == "http" and is_loopback(url.hostname or "")):
                raise ValueError("serve.auth.jwks_url must be an https:// URL (plain http only to a loopback host): "
                                 "the keys it serves decide who may call")
        return self


class ServeRateLimitConfig(Section):
    """``serve.rate_limit``: a token bucket per caller (authenticated subject; the client address under auth none)
    in each ingress replica; past it 429 with Retry-After."""

    per_second: float = Field(0.0, ge=0, description="Sustained requests per second per caller; 0: no limit")
    burst: int = Field(20, ge=1, description="Requests a caller may send at once after being idle")
    max_callers: int = Field(10_000, ge=1, description="Buckets kept per ingress replica (least recently used go)")


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
    backend: str = Field("auto", description="Inference backend: auto (chosen per model and hardware before outputs "
                         "are keyed: GPU replicas torch; CPU replicas onnxruntime when the model's ONNX export exists, "
                         "else torch; the choice and its reason are logged and in GET /v1/models) or a name "
                         "registered with medsr_dist.infer.backends (torch, onnxruntime, compiled), checked by "
                         "medsr_dist.preflight before Ray starts")
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
    # serve.auth / serve.rate_limit / hostile-input bounds (issues #24, #25)
    auth: ServeAuthConfig = Field(default_factory=ServeAuthConfig, description="Authentication (serve/auth.py)")
    rate_limit: ServeRateLimitConfig = Field(default_factory=ServeRateLimitConfig)
    max_outscale: float = Field(8.0, gt=0, le=64, description="Largest outscale a request may ask for, else 400")
    max_input_bytes: int = Field(1 << 30, ge=1, description="Decoded size limit (pixels x channels x bytes per "
                                 "sample, from the header), else 413 undecoded")
    probe_timeout_s: float = Field(10.0, gt=0, description="Header probe at the ingress (in its probe processes); "
                                   "past it 422 and the probe is stopped")
    probe_workers: int = Field(2, ge=1, description="Probe processes per ingress replica (spawned at its start)")
    probe_memory_mb: int = Field(2048, ge=256, description="Address space of a probe process; a probe needing "
                                 "more is answered 413")
    decode_timeout_s: float = Field(
        30.0, ge=0, description="Wall-time cap of a request's decode in the model replica, which runs in a child "
        "process (the last line of defence for codec faults no header check can foresee): past it the child is "
        "killed and the request answered 422; keep it below request_timeout_s (else 408 comes first). 0 (or "
        "decode_memory_bytes 0): decode in the replica itself, uncapped. Costs a process start and one copy of "
        "the pixels per request (docs/RELIABILITY.md)")
    decode_memory_bytes: int = Field(
        8 << 30, ge=0, description="Memory cap (address space the decode may add) of that child process; a decode "
        "that needs more is stopped and answered 413. 8 GiB holds a max_input_pixels RGB decode with room")

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) is below max_batch_size "
                             f"({self.max_batch_size}): tile batches could never fill")
        if self.auth.mode == "none" and not is_loopback(self.host):
            raise ValueError(f"serve.auth.mode is none but serve.host {self.host!r} is not a loopback address: "
                             f"anyone who reaches it could call the endpoint; set serve.auth.mode (tokens or oidc) "
                             f"or bind 127.0.0.1")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be unique, got {names}")
        return self
