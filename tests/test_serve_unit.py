"""Parts of the Serve endpoint that need no Ray: request classification, the tile hand-over, unhealthy replicas."""
from __future__ import annotations

import asyncio
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
    e = load_config(None, ["enhance.replicas=serve:medsr", "enhance.tile=16"]).enhance
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
