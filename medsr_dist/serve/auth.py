"""Who may call the endpoint (``serve.auth``) and how often (``serve.rate_limit``); no Ray, no FastAPI here.

* ``tokens``: static API tokens. The secret file (``serve.auth.tokens_file``, YAML) lists
  ``{subject, sha256, models}``: the sha256 of each token (hex), never the token, so the file alone lets nobody call.
  A presented token is hashed and held against every entry with :func:`hmac.compare_digest` (constant time, no early
  exit); several entries may share a subject, which is how a token is rotated (add the new one, move the clients,
  delete the old one). The file is read again when its modification time changes.
* ``oidc``: a bearer JWT of an OpenID Connect issuer, verified with joserfc: the header's ``alg`` must be in
  ``serve.auth.algorithms`` (asymmetric only), the signature must verify against the issuer's JWKS (fetched from
  ``jwks_url``, cached ``jwks_cache_s``, fetched again on an unknown ``kid`` at most every ``jwks_min_refresh_s``),
  and ``iss``, ``aud`` and ``exp`` must hold (``leeway_s`` of clock skew). The grants of ``models_claim`` name the
  models: ``<grant_prefix><model>`` or ``<grant_prefix>*``.
* ``none``: every caller is ``anonymous`` (accepted only on a loopback bind; see ``ServeConfig``).

Every failure is an :class:`AuthError` whose public text is generic (``authentication required`` /
``not allowed`` / ``rate limited``); the precise reason (expired, bad signature, unknown kid, ...) is for the log
only and never holds the token.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import os
import threading
import time
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from medsr_dist.config.serve import ServeAuthConfig, ServeRateLimitConfig

log = logging.getLogger(__name__)

#: The most bytes read of a JWKS answer, and of a presented credential.
MAX_JWKS_BYTES = 1 << 20
MAX_CREDENTIAL_CHARS = 16_384
ALL_MODELS = "*"


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: ``subject`` (for the audit log and the rate limit; never a token) and the models
    it may use (``*``: all)."""

    subject: str
    models: frozenset[str] = field(default_factory=lambda: frozenset({ALL_MODELS}))

    def may_use(self, model: str) -> bool:
        return ALL_MODELS in self.models or model in self.models


class AuthError(Exception):
    """A refused request: ``status`` 401 (no or bad credential), 403 (not allowed this model) or 429 (rate limited,
    with ``retry_after_s``). ``public`` is all the caller is told; ``detail`` is for the log."""

    PUBLIC = {401: "authentication required", 403: "not allowed", 429: "rate limited; retry later"}

    def __init__(self, status: int, detail: str, retry_after_s: float | None = None):
        super().__init__(detail)
        self.status, self.detail, self.retry_after_s = status, detail, retry_after_s
        self.public = self.PUBLIC[status]

    def headers(self) -> dict[str, str]:
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        if self.status == 429:
            return {"Retry-After": str(max(1, math.ceil(self.retry_after_s or 1)))}
        return {}


def bearer_token(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or len(value) > MAX_CREDENTIAL_CHARS:
        return None
    return value


class NoAuth:
    """``serve.auth.mode: none``: every caller is ``anonymous`` (loopback binds only)."""

    mode = "none"

    def authenticate(self, token: str | None) -> Caller:
        return Caller("anonymous")


class TokenAuth:
    """``serve.auth.mode: tokens``: static tokens, stored as sha256 hashes, compared in constant time."""

    mode = "tokens"

    def __init__(self, tokens_file: str, *, reload_every_s: float = 1.0):
        self.path = Path(tokens_file)
        self._entries: list[tuple[bytes, Caller]] = []
        self._mtime: float | None = None
        self._checked = 0.0
        self._reload_every_s = reload_every_s
        self._lock = threading.Lock()
        self._load()  # a missing or malformed file fails the start, with the key named

    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
            raw = yaml.safe_load(self.path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"serve.auth.tokens_file {str(self.path)!r}: cannot be read ({type(exc).__name__})") from None
        entries = raw.get("tokens") if isinstance(raw, dict) else raw
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"serve.auth.tokens_file {str(self.path)!r}: expected a non-empty list of "
                             f"{{subject, sha256, models}}")
        parsed = []
        for i, entry in enumerate(entries):
            where = f"serve.auth.tokens_file {str(self.path)!r} entry {i}"
            if not isinstance(entry, dict) or set(entry) - {"subject", "sha256", "models"}:
                raise ValueError(f"{where}: expected keys subject, sha256, models")
            subject, digest, models = entry.get("subject"), str(entry.get("sha256", "")).lower(), entry.get("models")
            if not isinstance(subject, str) or not subject.strip():
                raise ValueError(f"{where}: subject must be a non-empty name")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"{where} ({subject}): sha256 must be the 64 hex digits of the token's sha256 "
                                 f"(e.g. printf %s \"$TOKEN\" | sha256sum), never the token")
            if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
                raise ValueError(f"{where} ({subject}): models must be a non-empty list of model names or ['*']")
            parsed.append((bytes.fromhex(digest), Caller(subject.strip(), frozenset(models))))
        self._entries, self._mtime = parsed, mtime

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self._reload_every_s:
            return
        with self._lock:
            self._checked = now
            try:
                changed = self.path.stat().st_mtime != self._mtime
            except OSError:
                changed = False  # keep the tokens we have while the secret is being replaced
            if changed:
                try:
                    self._load()
                    log.info("serve.auth.tokens_file re-read: %d tokens", len(self._entries))
                except ValueError as exc:
                    log.error("%s; keeping the previous tokens", exc)

    def authenticate(self, token: str | None) -> Caller:
        if token is None:
            raise AuthError(401, "no bearer token")
        self._maybe_reload()
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        for stored, caller in self._entries:  # every entry, no early exit
            if hmac.compare_digest(digest, stored) and found is None:
                found = caller
        if found is None:
            raise AuthError(401, "unknown token")
        return found


class JwksCache:
    """The issuer's signing keys: fetched from ``url``, kept ``max_age_s``, fetched again on an unknown ``kid`` no
    more often than every ``min_refresh_s``."""

    def __init__(self, url: str, *, max_age_s: float, min_refresh_s: float, timeout_s: float = 5.0):
        self.url, self.max_age_s, self.min_refresh_s, self.timeout_s = url, max_age_s, min_refresh_s, timeout_s
        self._keys: KeySet | None = None
        self._kids: set[str] = set()
        self._fetched = -math.inf
        self._lock = threading.Lock()
        self.fetches = 0

    def _fetch(self) -> None:
        with urllib.request.urlopen(self.url, timeout=self.timeout_s) as answer:  # noqa: S310 - configured https URL
            body = answer.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError("JWKS larger than 1 MiB")
        data = json.loads(body)
        keys = [k for k in data.get("keys", []) if isinstance(k, dict) and k.get("kty") in ("RSA", "EC", "OKP")
                and k.get("use", "sig") == "sig"]  # symmetric keys are never accepted from a JWKS
        self._keys = KeySet.import_key_set({"keys": keys})
        self._kids = {str(k.get("kid")) for k in keys if k.get("kid") is not None}
        self._fetched = time.monotonic()
        self.fetches += 1

    def keys_for(self, kid: str | None) -> KeySet:
        """The key set, fetched first when stale or when ``kid`` is unknown (and the last fetch is old enough).

        Raises:
            AuthError: 401 when no keys can be had or ``kid`` is still unknown.
        """
        now = time.monotonic()
        with self._lock:
            stale = now - self._fetched > self.max_age_s
            unknown = kid is not None and kid not in self._kids
            if self._keys is None or stale or (unknown and now - self._fetched >= self.min_refresh_s):
                try:
                    self._fetch()
                except Exception as exc:  # noqa: BLE001 - network, JSON, key import
                    log.warning("serve.auth.jwks_url: keys not fetched (%s)", type(exc).__name__)
                    self._fetched = now if self._keys is not None else self._fetched  # keep old keys; do not hammer
            if self._keys is None:
                raise AuthError(401, "issuer keys unavailable")
            if kid is not None and kid not in self._kids:
                raise AuthError(401, "unknown kid")
            return self._keys


def _jwt_header(token: str) -> dict:
    try:
        head = token.split(".", 1)[0]
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except Exception:  # noqa: BLE001 - any malformed token
        raise AuthError(401, "malformed token") from None
    if not isinstance(header, dict):
        raise AuthError(401, "malformed token")
    return header


class OidcAuth:
    """``serve.auth.mode: oidc``: bearer JWTs verified against the issuer's JWKS (see the module docstring)."""

    mode = "oidc"

    def __init__(self, cfg: ServeAuthConfig, *, now=None):
        self.cfg = cfg
        self.algorithms = list(cfg.algorithms)
        self.jwks = JwksCache(cfg.jwks_url, max_age_s=cfg.jwks_cache_s, min_refresh_s=cfg.jwks_min_refresh_s)
        self._now = now or (lambda: int(time.time()))

    def authenticate(self, token: str | None) -> Caller:
        if token is None:
            raise AuthError(401, "no bearer token")
        header = _jwt_header(token)
        alg = header.get("alg")
        if alg not in self.algorithms:  # before any key is looked at: never `none`, never HS*
            raise AuthError(401, "algorithm not allowed")
        kid = header.get("kid")
        keys = self.jwks.keys_for(str(kid) if kid is not None else None)
        try:
            decoded = jwt.decode(token, keys, algorithms=self.algorithms)
        except (JoseError, ValueError) as exc:
            raise AuthError(401, f"signature not verified ({type(exc).__name__})") from None
        claims = decoded.claims
        registry = jwt.JWTClaimsRegistry(
            now=self._now, leeway=self.cfg.leeway_s,
            iss={"essential": True, "value": self.cfg.issuer}, aud={"essential": True, "value": self.cfg.audience},
            exp={"essential": True})
        try:
            registry.validate(claims)
        except (JoseError, ValueError) as exc:
            raise AuthError(401, f"claims not valid ({type(exc).__name__})") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthError(401, "token without a subject")
        return Caller(f"oidc:{subject[:128]}", self._models(claims.get(self.cfg.models_claim)))

    def _models(self, grants) -> frozenset[str]:
        if isinstance(grants, str):
            grants = grants.split()
        if not isinstance(grants, list):
            return frozenset()
        prefix = self.cfg.grant_prefix
        return frozenset(g[len(prefix):] for g in grants if isinstance(g, str) and g.startswith(prefix)
                         and len(g) > len(prefix))


def build_authenticator(cfg: ServeAuthConfig | dict):
    """The authenticator for ``serve.auth`` (a :class:`NoAuth`, :class:`TokenAuth` or :class:`OidcAuth`).

    Raises:
        ValueError: the tokens file cannot be read or holds a malformed entry (named by key and index).
    """
    if isinstance(cfg, dict):
        cfg = ServeAuthConfig(**cfg)
    if cfg.mode == "tokens":
        return TokenAuth(os.path.expanduser(cfg.tokens_file))
    if cfg.mode == "oidc":
        return OidcAuth(cfg)
    return NoAuth()


class RateLimiter:
    """A token bucket per caller subject: ``per_second`` sustained, ``burst`` at once; the ``max_callers`` most
    recently seen subjects are kept (an old bucket forgotten is full again, which only ever favours a caller)."""

    def __init__(self, cfg: ServeRateLimitConfig | dict, *, clock=time.monotonic):
        if isinstance(cfg, dict):
            cfg = ServeRateLimitConfig(**cfg)
        self.rate, self.burst, self.max_callers = float(cfg.per_second), float(cfg.burst), int(cfg.max_callers)
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, subject: str) -> None:
        """Spend one request of ``subject``'s bucket.

        Raises:
            AuthError: 429 with ``retry_after_s`` (when one request will be allowed again) when the bucket is empty.
        """
        if self.rate <= 0:
            return
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(subject, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[subject] = (tokens, now)
                raise AuthError(429, f"rate limit of {subject}", retry_after_s=(1.0 - tokens) / self.rate)
            self._buckets[subject] = (tokens - 1.0, now)
            while len(self._buckets) > self.max_callers:
                self._buckets.popitem(last=False)
