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

    from medsr_dist.infer import enhance_job
    from medsr_dist.infer.enhance_job import ServeReplica, _columns, _rows

    monkeypatch.setattr(enhance_job.time, "sleep", lambda s: None)
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

    from medsr_dist.infer import enhance_job
    from medsr_dist.infer.enhance_job import ServeReplica, _columns, _rows

    clock = {"t": 0.0}
    monkeypatch.setattr(enhance_job.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(enhance_job.time, "sleep", lambda s: clock.__setitem__("t", clock["t"] + s))
    stage = ServeReplica.__new__(ServeReplica)
    stage.app, stage.deployment, stage.outscale, stage.log_keys = "medsr", "model-tiny", None, False
    stage.handle = FakeHandle([BackPressureError(3, 2, retry_after_s=60)] * 20)
    todo = {"key": "k", "item_id": "i1", "status": "todo", "error": "", "seconds": 0.0, "meta": "{}",
            "pixels": np.zeros((1, 2, 2, 1), np.float32), "header": b""}
    (row,) = [r for b in stage(_columns([todo])) for r in _rows(b)]
    assert row["status"] == "error" and "at capacity or unavailable for 600 s" in row["error"]
    assert stage.handle.calls == 11  # the first send and one after each 60 s wait within 600 s
