"""Parts of the Serve endpoint that need no Ray: request classification, the tile hand-over, unhealthy replicas."""
from __future__ import annotations

import asyncio
import os
import struct
import threading
import zlib

import cv2
import numpy as np
import pytest

from medsr_dist.infer.model_file import read_model_file
from medsr_dist.serve.model import RequestError, SharedTileQueue, SRModel, check_limits

LIMITS = {"max_input_pixels": 10_000, "max_output_pixels": 100_000}


def png(h: int, w: int) -> bytes:
    return cv2.imencode(".png", np.zeros((h, w), np.uint8))[1].tobytes()


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))


@pytest.mark.parametrize("data,scale,status,reason", [
    (b"GIF89a....", 4.0, 415, "not a supported image file"),
    (png_header_only(20000, 20000), 4.0, 413, "400,000,000 pixels exceeds serve.max_input_pixels 10,000"),
    (png(50, 50), 8.0, 413, "output at x8 would be 400 x 400 = 160,000 pixels"),
    (b"\x89PNG\r\n\x1a\n\0\0", 4.0, 400, ""),
])
def test_requests_are_classified_from_the_header_before_decoding(data, scale, status, reason):
    with pytest.raises(RequestError) as info:
        check_limits(data, scale, LIMITS)
    assert info.value.status == status and reason in info.value.reason


def test_an_image_within_the_limits_passes():
    probe = check_limits(png(50, 50), 4.0, LIMITS)
    assert (probe.height, probe.width) == (50, 50)


def test_engine_threads_get_their_tiles_back_in_order_from_the_event_loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    seen = []

    async def submit(tile):  # stands in for the replica's @serve.batch method
        seen.append(tile.shape)
        await asyncio.sleep(0.001 * (3 - tile[0, 0, 0]))  # finish out of order
        return np.repeat(np.repeat(tile, 2, axis=1), 2, axis=2)

    class Inner:
        scale, size_multiple, precision = 2, 1, "fp32"

    try:
        queue = SharedTileQueue(Inner(), submit, loop)
        batch = np.stack([np.full((3, 4, 5), i, np.float32) for i in range(3)])
        out = queue(batch)
        assert out.shape == (3, 3, 8, 10) and [float(out[i, 0, 0, 0]) for i in range(3)] == [0.0, 1.0, 2.0]
        assert seen == [(3, 4, 5)] * 3 and (queue.scale, queue.precision) == (2, "fp32")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_a_replica_whose_backend_does_not_start_is_unhealthy_with_the_reason(tiny_model_dir):
    model = read_model_file(f"{tiny_model_dir}/model.pth", onnx_uri=f"{tiny_model_dir}/missing.onnx")
    settings = {"backend": "onnxruntime", "precision": "fp32", "tile": 0, "tile_overlap": 0, "tile_blend": 0,
                "batch_size": None, "outscale": None}
    replica = SRModel(model, {}, settings, LIMITS, 4, 0.01)
    with pytest.raises(RuntimeError, match="backend did not start: FileNotFoundError.*missing.onnx"):
        replica.check_health()
    answer = asyncio.run(replica.enhance(png(8, 8)))
    assert answer["status"] == 503 and "unavailable" in answer["reason"]
    assert replica.info()["healthy"] is False


class FakeHandle:
    """Stands for a DeploymentHandle to SRModel: ``enhance_item.remote`` answers from a script of results."""

    def __init__(self, script):
        self.script, self.calls = list(script), 0
        self.enhance_item = self

    def remote(self, pixels, meta_json, item_id, outscale):
        self.calls += 1
        outcome = self.script.pop(0)
        return type("Response", (), {"result": lambda _self: _raise_or_return(outcome, pixels)})()


def _raise_or_return(outcome, pixels):
    if isinstance(outcome, BaseException):
        raise outcome
    if outcome == "ok":
        return {"status": "todo", "output": np.full((1, 8, 8, 1), 7, np.uint16), "error": "", "seconds": 0.5}
    return outcome


@pytest.mark.parametrize("script,expect,calls", [
    (["ok"], "done", 1),
    ([("backpressure",), "ok"], "done", 2),  # a full queue is waited out, then the item is sent again
    ([{"status": "unavailable", "error": "replica unhealthy: x"}, "ok"], "done", 2),
    ([("died",)], "lost", 1),  # lost with its replica: not yielded, the job retries it alone
    ([{"status": "lost", "error": "fatal device error: AcceleratorError"}], "lost", 1),
    ([{"status": "error", "error": "inference failed on /a/secret-key.png", "seconds": 0.1}], "error", 1),
    ([ValueError("bug in /a/secret-key.png")], "error", 1),
])
def test_the_jobs_serve_stage_waits_out_capacity_and_leaves_lost_items_to_the_retry_pass(script, expect, calls,
                                                                                         monkeypatch):
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from medsr_dist.enhance import serve_client
    from medsr_dist.enhance.serve_client import ServeReplica
    from medsr_dist.infer.rows import columns as _columns, batch_rows as _rows

    monkeypatch.setattr(serve_client.time, "sleep", lambda s: None)
    script = [BackPressureError(3, 2, retry_after_s=1) if s == ("backpressure",) else
              ActorDiedError() if s == ("died",) else s for s in script]
    stage = ServeReplica.__new__(ServeReplica)
    stage.app, stage.deployment, stage.outscale, stage.log_keys = "medsr", "model-tiny", None, False
    stage.handle = FakeHandle(script)
    todo = {"key": "/a/secret-key.png", "item_id": "i1", "status": "todo", "error": "", "seconds": 0.0,
            "meta": "{}", "pixels": np.zeros((1, 2, 2, 1), np.float32), "header": b"h"}
    skipped = {**todo, "key": "/a/other.png", "item_id": "i2", "status": "skipped"}
    rows = [r for b in stage(_columns([todo, skipped])) for r in _rows(b)]
    assert stage.handle.calls == calls
    assert [r["status"] for r in rows if r["item_id"] == "i2"] == ["skipped"]  # passes through, not sent
    mine = [r for r in rows if r["item_id"] == "i1"]
    if expect == "lost":
        assert mine == []
    elif expect == "done":
        assert mine[0]["status"] == "todo" and mine[0]["output"].shape == (1, 8, 8, 1) and mine[0]["seconds"] == 0.5
        assert mine[0]["pixels"].shape == (1, 2, 2, 1)  # EncodeCommit scores the output against them
    else:
        assert mine[0]["status"] == "error" and mine[0]["output"].size == 0 and mine[0]["pixels"].size == 0
        assert "secret-key" not in mine[0]["error"] and "<input>" in mine[0]["error"]


def test_the_jobs_serve_stage_gives_up_on_an_app_that_stays_at_capacity(monkeypatch):
    from ray.serve.exceptions import BackPressureError

    from medsr_dist.enhance import serve_client
    from medsr_dist.enhance.serve_client import ServeReplica
    from medsr_dist.infer.rows import columns as _columns, batch_rows as _rows

    clock = {"t": 0.0}
    monkeypatch.setattr(serve_client.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(serve_client.time, "sleep", lambda s: clock.__setitem__("t", clock["t"] + s))
    stage = ServeReplica.__new__(ServeReplica)
    stage.app, stage.deployment, stage.outscale, stage.log_keys = "medsr", "model-tiny", None, False
    stage.handle = FakeHandle([BackPressureError(3, 2, retry_after_s=60)] * 20)
    todo = {"key": "k", "item_id": "i1", "status": "todo", "error": "", "seconds": 0.0, "meta": "{}",
            "pixels": np.zeros((1, 2, 2, 1), np.float32), "header": b""}
    (row,) = [r for b in stage(_columns([todo])) for r in _rows(b)]
    assert row["status"] == "error" and "at capacity or unavailable for 600 s" in row["error"]
    assert stage.handle.calls == 11  # the first send and one after each 60 s wait within 600 s


def test_the_jobs_serve_stage_sends_no_volume_and_says_where_volumes_run():
    from medsr_dist.enhance.serve_client import ServeReplica
    from medsr_dist.infer.rows import columns as _columns, batch_rows as _rows

    stage = ServeReplica.__new__(ServeReplica)
    stage.app, stage.deployment, stage.outscale, stage.log_keys = "medsr", "model-tiny", None, False
    stage.handle = FakeHandle([])
    volume = {"key": "k.nii.gz", "item_id": "v1", "status": "todo", "error": "", "seconds": 0.0, "meta": "{}",
              "pixels": np.zeros((2, 2, 2, 1), np.float32), "header": b"", "kind": "volume"}
    (row,) = [r for b in stage(_columns([volume])) for r in _rows(b)]
    assert stage.handle.calls == 0 and row["status"] == "error" and row["pixels"].size == 0
    assert "only by the job's own replicas (enhance.replicas: local)" in row["error"]


def test_the_job_refuses_an_app_that_would_compute_other_outputs_than_its_keys_say(monkeypatch):
    from dataclasses import replace
    from types import SimpleNamespace

    import ray
    from ray import serve

    from medsr_dist.config import load_config
    from medsr_dist.enhance.serve_client import serve_deployment
    from medsr_dist.infer.provenance import enhance_params
    from medsr_dist.infer.engine import ENGINE_REVISION
    from medsr_dist.infer.model_file import ModelFile

    model = ModelFile(uri="m.pth", name="chest@9", sha256="a" * 64, family="realesrgan", scale=4,
                      generator={"type": "RRDBNet"})
    # the job chooses enhance.backend (auto) before it looks for the app: a chosen name, as here
    e = load_config(None, ["enhance.replicas=serve:medsr", "enhance.tile=16", "enhance.backend=torch"]).enhance
    params = enhance_params(e, model)
    info = {"model": "chest@9", "model_sha256": "a" * 64, "tile": 16, "tile_overlap": 64, "tile_blend": 4,
            "backend": "torch", "precision": "fp32", "engine": ENGINE_REVISION, "sampling": None, "healthy": True}
    state = SimpleNamespace(status="RUNNING", message="", deployments={"ingress": None, "model-chest": None})
    apps = {"medsr": state}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications=apps))
    answer = SimpleNamespace(result=lambda timeout_s=None: info)
    monkeypatch.setattr(serve, "get_deployment_handle", lambda name, app_name: SimpleNamespace(
        info=SimpleNamespace(remote=lambda: answer)))
    assert serve_deployment(e, model, params) == ("medsr", "model-chest")
    with pytest.raises(ValueError, match=r"engine revision \(medsr-dist version\): the job \d+, the app 0"):
        info["engine"] = 0
        serve_deployment(e, model, params)
    info["engine"] = ENGINE_REVISION
    with pytest.raises(ValueError, match=r"the application serves chest@9 \(sha256 aaaaaaaaaaaa\), not "
                                         r"enhance.checkpoint chest@9 \(sha256 bbbbbbbbbbbb\)"):
        serve_deployment(e, replace(model, sha256="b" * 64), params)
    sampled = replace(model, generator={"type": "RRDBNet", "sampling": {"samples": 4}})
    with pytest.raises(ValueError, match=r"samples > 1 asks for an uncertainty map .*\(enhance.replicas: local\)"):
        serve_deployment(e, sampled, params)
    info["healthy"], info["unhealthy_reason"] = False, "backend self-check failed: MemoryError"
    with pytest.raises(ValueError, match="model-chest is unhealthy: backend self-check failed"):
        serve_deployment(e, model, params)
    state.status, state.message = "DEPLOYING", "2 replicas starting"
    with pytest.raises(ValueError, match=r"serve:medsr: the application is DEPLOYING, not RUNNING"):
        serve_deployment(e, model, params)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match=r"needs the Ray cluster the application runs on \(ray.address\)"):
        serve_deployment(e, model, params)


# --- serve.auth / serve.rate_limit (issue #25): no Ray; the HTTP wiring is in test_serve.py ---------------------------

import base64  # noqa: E402
import hashlib  # noqa: E402
import hmac  # noqa: E402
import http.server  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from joserfc import jwt as jose_jwt  # noqa: E402
from joserfc.jwk import ECKey, RSAKey  # noqa: E402

from medsr_dist.config import load_config  # noqa: E402
from medsr_dist.config.serve import ServeAuthConfig  # noqa: E402
from medsr_dist.serve.auth import AuthError, RateLimiter, TokenAuth, bearer_token, build_authenticator  # noqa: E402

ISSUER, AUDIENCE = "https://idp.example.test/realms/hospital", "medsr-endpoint"


class JwksServer:
    """A local issuer's JWKS endpoint (http.server in a thread): ``keys`` are served as they are when asked;
    ``fetches`` counts the requests."""

    def __init__(self, keys):
        self.keys, self.fetches = list(keys), 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                owner.fetches += 1
                body = json.dumps({"keys": [k.as_dict(private=False) for k in owner.keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/certs"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def signing_key(kid: str, kind: str = "RSA"):
    if kind == "EC":
        return ECKey.generate_key("P-256", parameters={"kid": kid})
    return RSAKey.generate_key(2048, parameters={"kid": kid})


def make_jwt(key, *, alg: str = "RS256", kid: str | None = None, exp_in: float = 300, **claims) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now, "exp": now + int(exp_in),
            "scope": "openid medsr:tiny", **claims}
    header = {"alg": alg, "kid": kid if kid is not None else key.kid}
    return jose_jwt.encode(header, {k: v for k, v in body.items() if v is not None}, key, algorithms=[alg])


@pytest.fixture(scope="module")
def issuer_keys():
    return {"a": signing_key("a"), "b": signing_key("b"), "ec": signing_key("ec", "EC"), "other": signing_key("a")}


@pytest.fixture()
def jwks(issuer_keys):
    server = JwksServer([issuer_keys["a"], issuer_keys["ec"]])
    yield server
    server.close()


def oidc(jwks_url: str, **kw):
    return build_authenticator(ServeAuthConfig(mode="oidc", issuer=ISSUER, audience=AUDIENCE, jwks_url=jwks_url,
                                               algorithms=["RS256", "ES256"], **kw))


def test_a_valid_jwt_names_its_subject_and_the_models_its_scopes_grant(jwks, issuer_keys):
    auth = oidc(jwks.url)
    caller = auth.authenticate(make_jwt(issuer_keys["a"]))
    assert caller.subject == "oidc:user-1" and caller.may_use("tiny") and not caller.may_use("ldm")
    ec = auth.authenticate(make_jwt(issuer_keys["ec"], alg="ES256", scope=None, roles=["medsr:*"]))
    assert not ec.may_use("tiny")  # `roles` is not the configured claim
    roles = oidc(jwks.url, models_claim="roles").authenticate(make_jwt(issuer_keys["ec"], alg="ES256", roles=["medsr:*"]))
    assert roles.may_use("tiny") and roles.may_use("ldm")
    assert auth.jwks.fetches == 1  # keys cached: two tokens, one fetch


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_with(secret: bytes) -> str:
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60, "scope": "medsr:*"}
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'kid': 'a'}).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def forge_unsigned(key, alg: str) -> str:
    good = make_jwt(key)
    head = base64.urlsafe_b64encode(json.dumps({"alg": alg, "kid": key.kid}).encode()).rstrip(b"=").decode()
    return f"{head}.{good.split('.')[1]}."


@pytest.mark.parametrize("case", ["none", "expired", "wrong_issuer", "wrong_audience", "bad_signature",
                                  "hs256_with_public_key", "no_subject", "garbage", "unknown_kid", "tampered"])
def test_a_bad_jwt_is_a_generic_401(jwks, issuer_keys, case):
    a = issuer_keys["a"]
    token = {
        "none": lambda: forge_unsigned(a, "none"),
        "expired": lambda: make_jwt(a, exp_in=-120),  # past the 30 s leeway
        "wrong_issuer": lambda: make_jwt(a, iss="https://evil.example.test"),
        "wrong_audience": lambda: make_jwt(a, aud="another-app"),
        "bad_signature": lambda: make_jwt(issuer_keys["other"]),  # same kid "a", another key
        "hs256_with_public_key": lambda: hs256_with(a.as_pem(private=False)),  # the classic key-confusion forgery
        "no_subject": lambda: make_jwt(a, sub=None),
        "garbage": lambda: "not.a.jwt",
        "unknown_kid": lambda: make_jwt(issuer_keys["b"]),
        "tampered": lambda: (lambda t: t.split(".")[0] + "." + base64.urlsafe_b64encode(json.dumps(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "admin", "exp": int(time.time()) + 60, "scope": "medsr:*"}
        ).encode()).rstrip(b"=").decode() + "." + t.split(".")[2])(make_jwt(a)),
    }[case]()
    with pytest.raises(AuthError) as info:
        oidc(jwks.url).authenticate(token)
    assert info.value.status == 401 and info.value.public == "authentication required"
    assert info.value.headers() == {"WWW-Authenticate": "Bearer"}
    assert token not in info.value.detail


def test_expiry_has_a_small_leeway(jwks, issuer_keys):
    assert oidc(jwks.url).authenticate(make_jwt(issuer_keys["a"], exp_in=-10)).subject == "oidc:user-1"
    with pytest.raises(AuthError):
        oidc(jwks.url, leeway_s=0).authenticate(make_jwt(issuer_keys["a"], exp_in=-10))


def test_unknown_kids_refetch_the_keys_at_most_once_per_interval_and_a_rotated_key_is_picked_up(jwks, issuer_keys):
    auth = oidc(jwks.url, jwks_min_refresh_s=0.5)
    auth.authenticate(make_jwt(issuer_keys["a"]))
    for _ in range(20):  # a flood of made-up kids
        with pytest.raises(AuthError):
            auth.authenticate(make_jwt(issuer_keys["b"], kid="made-up"))
    assert jwks.fetches <= 2
    jwks.keys.append(issuer_keys["b"])  # the issuer rotates in key "b"
    time.sleep(0.6)
    assert auth.authenticate(make_jwt(issuer_keys["b"])).subject == "oidc:user-1"


def test_algorithms_are_asymmetric_only():
    for bad in (["none"], ["HS256"], ["RS256", "HS512"]):
        with pytest.raises(ValueError, match="serve.auth.algorithms"):
            ServeAuthConfig(mode="oidc", issuer=ISSUER, audience=AUDIENCE, jwks_url="https://x", algorithms=bad)
    with pytest.raises(ValueError, match="serve.auth.jwks_url must be an https:// URL"):
        ServeAuthConfig(mode="oidc", issuer=ISSUER, audience=AUDIENCE, jwks_url="http://idp.example.test/certs")
    with pytest.raises(ValueError, match="serve.auth.mode oidc needs serve.auth.audience"):
        ServeAuthConfig(mode="oidc", issuer=ISSUER, jwks_url="https://idp.example.test/certs")


def write_tokens(path, entries) -> str:
    path.write_text(json.dumps(entries))  # YAML is a superset of JSON
    return str(path)


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def test_static_tokens_are_stored_hashed_two_at_once_for_rotation_and_scoped_to_models(tmp_path):
    path = write_tokens(tmp_path / "tokens.yaml", [
        {"subject": "pacs-bridge", "sha256": sha("old-secret-0123456789"), "models": ["tiny"]},
        {"subject": "pacs-bridge", "sha256": sha("new-secret-9876543210"), "models": ["tiny"]},
        {"subject": "research", "sha256": sha("research-secret-abcdef"), "models": ["*"]},
    ])
    auth = build_authenticator({"mode": "tokens", "tokens_file": path})
    assert auth.authenticate("old-secret-0123456789").subject == "pacs-bridge"
    assert auth.authenticate("new-secret-9876543210").subject == "pacs-bridge"
    assert not auth.authenticate("new-secret-9876543210").may_use("ldm")
    assert auth.authenticate("research-secret-abcdef").may_use("ldm")
    for bad in (None, "", "old-secret-012345678", sha("old-secret-0123456789")):  # the stored hash is no token
        with pytest.raises(AuthError) as info:
            auth.authenticate(bad or None)
        assert info.value.status == 401


def test_the_tokens_file_is_read_again_when_it_changes_and_a_retired_token_stops_working(tmp_path):
    path = write_tokens(tmp_path / "tokens.yaml", [{"subject": "a", "sha256": sha("first-token-xxxxxxxx"), "models": ["*"]}])
    auth = TokenAuth(path, reload_every_s=0)
    assert auth.authenticate("first-token-xxxxxxxx").subject == "a"
    time.sleep(0.01)
    write_tokens(tmp_path / "tokens.yaml", [{"subject": "a", "sha256": sha("second-token-yyyyyyy"), "models": ["*"]}])
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert auth.authenticate("second-token-yyyyyyy").subject == "a"
    with pytest.raises(AuthError):
        auth.authenticate("first-token-xxxxxxxx")


@pytest.mark.parametrize("entries,message", [
    ([{"subject": "a", "sha256": "plain-token-instead-of-a-hash", "models": ["*"]}], "entry 0 (a): sha256 must be"),
    ([{"subject": "a", "sha256": "0" * 64}], "models must be"),
    ([], "non-empty list"),
])
def test_a_malformed_tokens_file_fails_the_start_naming_the_key(tmp_path, entries, message):
    with pytest.raises(ValueError, match="serve.auth.tokens_file") as info:
        build_authenticator({"mode": "tokens", "tokens_file": write_tokens(tmp_path / "t.yaml", entries)})
    assert message in str(info.value)


def test_bearer_header_parsing():
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token(None) is None and bearer_token("Bearer ") is None


def test_the_rate_limit_is_a_token_bucket_per_caller_with_retry_after():
    now = [0.0]
    limiter = RateLimiter({"per_second": 2, "burst": 3}, clock=lambda: now[0])
    for _ in range(3):
        limiter.take("a")
    with pytest.raises(AuthError) as info:
        limiter.take("a")
    assert info.value.status == 429 and info.value.headers() == {"Retry-After": "1"}
    assert 0 < info.value.retry_after_s <= 0.5
    limiter.take("b")  # another caller has its own bucket
    now[0] = 0.5
    limiter.take("a")  # one more after 0.5 s at 2/s
    with pytest.raises(AuthError):
        limiter.take("a")
    RateLimiter({"per_second": 0}).take("a")  # 0: no limit


def test_binding_beyond_loopback_without_auth_is_refused_naming_the_key():
    from medsr_dist.config import ConfigError
    from medsr_dist.serve.app import check_bind

    with pytest.raises(ConfigError, match="serve.auth.mode is none but serve.host '0.0.0.0'"):
        load_config(None, ["serve.host=0.0.0.0"])
    for host in ("127.0.0.1", "::1", "localhost"):
        load_config(None, [f"serve.host={host}"])
    cfg = load_config(None, ["serve.host=0.0.0.0", "serve.auth.mode=tokens", "serve.auth.tokens_file=/run/t.yaml"])
    check_bind(cfg.serve, "0.0.0.0")  # auth on: any bind
    none = load_config(None, [])
    check_bind(none.serve, "127.0.0.1")
    for host in ("0.0.0.0", None):  # a Serve config file's http_options bind it elsewhere, or unknown
        with pytest.raises(ValueError, match="serve.auth.mode is none"):
            check_bind(none.serve, host)


def test_a_header_the_probe_cannot_parse_is_a_400_not_a_503_and_quotes_nothing(monkeypatch):
    import medsr_dist.serve.admission as model

    def probe(data, name):  # what a parser raising on a malformed value did: a ValueError quoting it
        raise ValueError("could not convert string to float: '0,143'")

    monkeypatch.setattr(model, "probe_image", probe)
    with pytest.raises(RequestError) as info:
        check_limits(png(8, 8), 2.0, LIMITS)
    assert info.value.status == 400 and "0,143" not in info.value.reason


def test_admission_counts_bytes_as_well_as_pixels():
    limits = {**LIMITS, "max_input_bytes": 50 * 50 * 4 - 1}  # one float32 channel of 50 x 50, less one byte
    with pytest.raises(RequestError, match="serve.max_input_bytes") as info:
        check_limits(png(50, 50), 1.0, limits)
    assert info.value.status == 413
    check_limits(png(50, 50), 1.0, {**limits, "max_input_bytes": 50 * 50 * 4})


def test_a_probe_past_its_timeout_is_stopped_and_one_past_its_memory_is_refused_and_the_pool_serves_on():
    """The ingress's probe processes: a slow probe (a legal Deflate DICOM the probe inflates: 162 MB) is answered
    422 and its worker replaced; with less address space than it needs, 413; honest headers pass after both."""
    from test_serve import deflated_dicom

    from medsr_dist.serve.admission import ProbePool

    # 162 MB inflated from 3.5 MB (46:1, within io.dicom's 200:1 bound): what an unknown parser's appetite looks like
    bomb, limits = deflated_dicom(9000, sparse_noise=True), {**LIMITS, "max_input_pixels": 10**9,
                                                              "max_output_pixels": 10**10}

    async def run(pool, data, timeout):
        try:
            await pool.check(data, 1.0, limits, timeout)
            return 200, ""
        except RequestError as exc:
            return exc.status, exc.reason

    pool = ProbePool(1, 2048 << 20)
    try:
        assert asyncio.run(run(pool, bomb, 0.05))[0] == 422
        assert asyncio.run(run(pool, png(50, 50), 60)) == (200, "")
    finally:
        pool.close()
    small = ProbePool(1, 600 << 20)  # the worker's imports take ~500 MB of address space; 162 MB more do not fit
    try:
        status, reason = asyncio.run(run(small, bomb, 60))
        assert status == 413 and "serve.probe_memory_mb" in reason
        assert asyncio.run(run(small, png(50, 50), 60)) == (200, "")
    finally:
        small.close()


def test_the_replicas_decode_runs_under_serve_decode_caps_a_stopped_one_is_413_or_422_never_503(tiny_model_dir):
    """enhance_file (the replica's request function, no Ray): an honest 1024 x 1024 16-bit PNG under a 4 MiB
    decode cap is stopped in its child and answered 413, past a decode time cap 422 — generic reasons naming the
    config key, never 503/500; under sufficient caps the answer is the in-process one, byte for byte."""
    from medsr_dist.infer.model_file import read_model_file
    from medsr_dist.infer.replica import EngineSettings, ModelReplica
    from medsr_dist.io.bounded import DecodeKilled
    from medsr_dist.serve.model import decode_killed_error, enhance_file
    from medsr_dist.storage import Storage

    big = (np.arange(1024 * 1024, dtype=np.uint32).reshape(1024, 1024) * 2654435761 % 65536).astype(np.uint16)
    data = cv2.imencode(".png", big)[1].tobytes()
    replica = ModelReplica.load(read_model_file(f"{tiny_model_dir}/model.pth"), Storage(),
                                EngineSettings(backend="torch", precision="fp32", tile=32, tile_overlap=4,
                                               tile_blend=0, batch_size=4, outscale=1.0))
    limits = {"max_input_pixels": 1 << 21, "max_output_pixels": 1 << 24}

    def status(caps: dict, image: bytes = data) -> tuple[int, str]:
        try:
            return 200, enhance_file(replica, image, 1.0, limits={**limits, **caps})["body"]
        except RequestError as exc:
            return exc.status, exc.reason

    code, reason = status({"decode_memory_bytes": 4 << 20, "decode_timeout_s": 60.0})
    assert (code, reason) == (413, "decoding the image needed more memory than serve.decode_memory_bytes; stopped")
    code, reason = status({"decode_memory_bytes": 2 << 30, "decode_timeout_s": 1e-4})  # less than a process start
    assert (code, reason) == (422, "decoding the image took longer than serve.decode_timeout_s; stopped")
    assert decode_killed_error(DecodeKilled("request", "died", "crash")).status == 422
    small = cv2.imencode(".png", big[:24, :24])[1].tobytes()
    assert status({"decode_memory_bytes": 2 << 30, "decode_timeout_s": 60.0}, small) == status({}, small)
    assert status({}, small)[0] == 200
