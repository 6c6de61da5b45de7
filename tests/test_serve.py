"""The Serve endpoint (medsr_dist/serve/) on a local Ray, over real HTTP (httpx): one app shared by the module,
serving two models by name (a tiny RRDBNet x4, the default, and a trained tiny latent-diffusion x4) behind
serve.auth tokens; a second app ("secure") serves the tiny model behind serve.auth oidc with a rate limit.

What a client relies on: the answer is the engine's own output in the input's form, concurrent clients all get
their own image back, overload is answered with 503 + Retry-After and passes, every kind of bad input gets its
4xx with a reason (never a 500, never a patient identifier), and a killed replica does not take the app down.
"""
from __future__ import annotations

import concurrent.futures
import io
import os
import socket
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pydicom.data
import pytest

httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray")

from medsr_dist.config import load_config  # noqa: E402
from medsr_dist.infer.model_file import read_model_file  # noqa: E402
from medsr_dist.infer.replica import EngineSettings, ModelReplica  # noqa: E402
from medsr_dist.io.image import decode_image, encode_image  # noqa: E402
from medsr_dist.storage import Storage  # noqa: E402
from test_ldm import ldm_export, vae_export  # noqa: E402,F401  (module fixtures: a trained tiny LDM x4)

pytestmark = pytest.mark.timeout(600)

TILE = {"tile": 16, "tile_overlap": 4, "tile_blend": 4}
#: The app's static API tokens (serve.auth tokens): two of one client, as while a token is rotated.
OLD_TOKEN, NEW_TOKEN = "clinic-token-2026-11-aaaaaaaaaaaa", "clinic-token-2026-12-bbbbbbbbbbbb"
AUTH = {"Authorization": f"Bearer {NEW_TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tiny_model_dir, ldm_export, tmp_path_factory):
    """The app: models 'tiny' (RRDBNet x4, 2 replicas, the default) and 'ldm' (latent diffusion x4, DDIM 2 steps,
    1 sample) behind the ingress, serve.auth tokens (OLD_TOKEN and NEW_TOKEN of one client); yields (url, cfg)."""
    import hashlib
    import json

    from ray import serve

    from medsr_dist.serve.app import start

    tokens = tmp_path_factory.mktemp("serve-auth") / "tokens.yaml"
    tokens.write_text(json.dumps([{"subject": "clinic", "sha256": hashlib.sha256(t.encode()).hexdigest(),
                                   "models": ["*"]} for t in (OLD_TOKEN, NEW_TOKEN)]))
    port = free_port()
    cfg = load_config(None, ["serve.auth.mode=tokens", f"serve.auth.tokens_file={tokens}",
        f"serve.models=[{{name: tiny, checkpoint: {tiny_model_dir}/model.pth}}, {{name: ldm, checkpoint: {ldm_export}, "
        f"sampling: {{samples: 1, steps: 2}}}}]", f"serve.port={port}",
        *(f"serve.{k}={v}" for k, v in TILE.items()), "serve.max_batch_size=4", "serve.batch_wait_timeout_s=0.02",
        "serve.max_ongoing_requests=4", "serve.max_queued_requests=2", "serve.min_replicas=2", "serve.max_replicas=2",
        "serve.cpus_per_replica=0.5", "serve.max_body_bytes=3000000", "serve.max_input_pixels=1000000",
        "serve.max_output_pixels=20000000", "serve.request_timeout_s=8", "serve.retry_after_s=1",
        "serve.max_outscale=16",
    ])
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        url = start(cfg)
        yield url, cfg
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


@pytest.fixture(scope="module")
def direct(tiny_model_dir):
    """The engine called directly with the app's settings: what every answer must equal."""
    replica = ModelReplica.load(read_model_file(f"{tiny_model_dir}/model.pth"), Storage(),
                                EngineSettings(**TILE, batch_size=4))

    def expected(data: bytes, outscale: float | None = None) -> np.ndarray:
        image = decode_image(data, "x")
        frames = image.pixels if image.pixels.ndim == 4 else image.pixels[None]
        out = np.stack([o if o.ndim == 3 else o[:, :, None]
                        for o in replica.enhance_many(list(frames), outscale=outscale)])
        encoded = encode_image(out if image.meta.frames > 1 else out[0], image.meta, image.header,
                               scale=out.shape[1] / frames.shape[1])
        return decode_image(encoded, "x").pixels

    return expected


def post(url: str, data: bytes, timeout: float = 60, **params) -> httpx.Response:
    return httpx.post(f"{url}/v1/enhance", content=data, params=params or None, timeout=timeout, headers=AUTH)


def post_retrying(url: str, data: bytes, timeout: float = 60, tries: int = 60, **params) -> httpx.Response:
    """A well-behaved client: a 503 is retried after its Retry-After. Needed wherever requests arrive together:
    Ray Serve may refuse a burst of simultaneous requests before the queue is really full (its router counts
    requests not yet assigned to a replica as queued; see ray/serve/_private/router.py wrap_request_assignment)."""
    for _ in range(tries):
        r = post(url, data, timeout=timeout, **params)
        if r.status_code != 503:
            return r
        assert "retry-after" in r.headers, r.text
        time.sleep(float(r.headers["retry-after"]))
    return r


def rgb_png(seed: int = 0, h: int = 30, w: int = 22) -> bytes:
    img = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def gray16_png() -> bytes:
    img = (np.random.default_rng(1).random((26, 20)) * 65535).astype(np.uint16)
    return cv2.imencode(".png", img)[1].tobytes()


def tiff16() -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, (np.random.default_rng(2).random((24, 18)) * 65535).astype(np.uint16))
    return buf.getvalue()


def jpeg() -> bytes:
    img = (np.random.default_rng(3).random((20, 28, 3)) * 255).astype(np.uint8)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def ct_dicom() -> bytes:
    """pydicom's CT_small.dcm (128 x 128 signed 16-bit), cropped to 40 x 36 to keep the test fast."""
    path = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "CT_small.dcm")
    ds = pydicom.dcmread(path)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:40, :36]).tobytes()
    ds.Rows, ds.Columns = 40, 36
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` with almost no data (a pixel bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def non_image_dicom(patient_name: str, patient_id: str) -> bytes:
    """A Basic Text SR object (no pixel data) naming a patient."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.PatientName, ds.PatientID = "SR", patient_name, patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ValueType, ds.ContentSequence = "CONTAINER", pydicom.Sequence()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


FORMATS = {"png-rgb8": (rgb_png, "image/png"), "png-gray16": (gray16_png, "image/png"),
           "tiff-gray16": (tiff16, "image/tiff"), "jpeg": (jpeg, "image/jpeg"), "dicom-ct": (ct_dicom, "application/dicom")}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_the_answer_is_the_engines_output_in_the_inputs_form(app, direct, fmt):
    url, _ = app
    make, media = FORMATS[fmt]
    data = make()
    r = post(url, data)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == media
    got, source = decode_image(r.content, "answer"), decode_image(data, "input")
    assert got.meta.format == source.meta.format and got.meta.dtype == source.meta.dtype  # 16-bit stays 16-bit
    assert got.meta.channels == source.meta.channels
    np.testing.assert_array_equal(got.pixels, direct(data))
    model = read_model_file(app[1].serve.models[0].checkpoint)
    assert r.headers["x-medsr-model"] == model.name and r.headers["x-medsr-model-sha256"] == model.sha256
    assert r.headers["x-medsr-scale"] == "4" and r.headers["x-medsr-engine-revision"].isdigit()
    assert float(r.headers["x-medsr-consistency-psnr-db"]) > 0
    if fmt == "dicom-ct":
        ds = pydicom.dcmread(io.BytesIO(r.content))
        assert "DERIVED" in ds.ImageType and ds.Rows == 160 and ds.PixelRepresentation == 1


def test_multipart_upload_with_outscale(app, direct):
    url, _ = app
    data = rgb_png(5)
    r = httpx.post(f"{url}/v1/enhance", files={"file": ("scan.png", data, "image/png")}, data={"outscale": "2"},
                   headers=AUTH,
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-medsr-scale"] == "2"
    np.testing.assert_array_equal(decode_image(r.content, "a").pixels, direct(data, outscale=2.0))


def test_sixteen_concurrent_clients_each_get_their_own_image(app, direct):
    url, _ = app
    inputs = [rgb_png(100 + i, h=20 + (i % 2), w=18) for i in range(16)]  # two shapes; one tile each (< 32 px)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda data: post_retrying(url, data), inputs))
    assert [r.status_code for r in answers] == [200] * 16, [r.text for r in answers if r.status_code != 200]
    for data, r in zip(inputs, answers):
        np.testing.assert_array_equal(decode_image(r.content, "a").pixels, direct(data))
    # each of these images is one tile: a model call with several tiles carried several requests
    seen = max(httpx.get(f"{url}/v1/models", timeout=30, headers=AUTH).json()["models"][0]["replica_stats"]["max_tiles_per_call"]
               for _ in range(6))
    assert seen > 1


def test_models_health_and_docs(app):
    url, _ = app
    models = httpx.get(f"{url}/v1/models", timeout=30, headers=AUTH).json()["models"]
    assert [m["name"] for m in models] == ["tiny", "ldm"] and models[0]["scale"] == 4 and models[0]["healthy"]
    assert models[0]["default"] and models[1]["family"] == "ldm" and models[1]["sampling"]["steps"] == 2
    assert models[0]["model_sha256"] and models[0]["max_batch_size"] == 4 and models[0]["precision"] == "fp32"
    # serve.backend auto (the default), chosen per model: neither has an ONNX export, so torch, saying so
    assert [m["backend"] for m in models] == ["torch", "torch"]
    assert all("no ONNX export at" in m["backend_reason"] for m in models)
    assert httpx.get(f"{url}/healthz", timeout=30).text == "ok"
    assert "/v1/enhance" in httpx.get(f"{url}/openapi.json", timeout=30, headers=AUTH).json()["paths"]
    assert httpx.get(f"{url}/docs", timeout=30, headers=AUTH).status_code == 200


def test_every_kind_of_bad_input_gets_its_4xx_with_a_reason(app):
    url, _ = app
    cases = {
        "empty": (b"", {}, 400, "empty body"),
        "not an image": (b"%PDF-1.7 hello", {}, 415, "not a supported image file"),
        "truncated png": (rgb_png()[:60], {}, 400, ""),
        "pixel bomb": (png_header_only(20000, 20000), {}, 413, "exceeds serve.max_input_pixels"),
        "output too large": (png_header_only(600, 600), {"outscale": 16}, 413, "serve.max_output_pixels"),
        "body too large": (b"\x89PNG\r\n\x1a\n" + b"\0" * 3_100_000, {}, 413, "serve.max_body_bytes"),
        "no image in the dicom": (non_image_dicom("DOE^JANE", "PID-4711"), {}, 415, "Basic Text SR"),
        "unknown model": (rgb_png(), {"model": "nope"}, 404, "unknown model"),
        "bad outscale": (rgb_png(), {"outscale": -2}, 400, "outscale"),
        "outscale past serve.max_outscale": (rgb_png(), {"outscale": 40}, 400, "serve.max_outscale"),
        "outscale not a number": (rgb_png(), {"outscale": "big"}, 400, "outscale"),
    }
    for label, (data, params, status, reason) in cases.items():
        r = post(url, data, **params)
        assert r.status_code == status, (label, r.status_code, r.text)
        detail = r.json()["detail"]
        assert reason in str(detail), (label, detail)
        assert "DOE" not in r.text and "PID-4711" not in r.text, label


def test_a_corrupt_dicom_is_a_400_that_names_no_patient(app):
    url, _ = app
    data = bytearray(ct_dicom())
    ds = pydicom.dcmread(io.BytesIO(bytes(data)))
    ds.PatientName, ds.PatientID = "ROE^RICHARD", "MRN-99887"
    ds.PixelData = ds.PixelData[:100]  # too short for 40 x 36 x 16 bit
    buf = io.BytesIO()
    ds.save_as(buf)
    r = post(url, buf.getvalue())
    assert r.status_code == 400, r.text
    assert "ROE" not in r.text and "MRN-99887" not in r.text


def job_items_served(app_name: str) -> int:
    """Job items the app's model replicas have enhanced (``enhance_item`` calls), summed over every replica seen."""
    from ray import serve

    handle, seen = serve.get_deployment_handle("model-tiny", app_name=app_name), {}
    for _ in range(40):  # each call reaches one replica; gather both
        info = handle.info.remote().result(timeout_s=30)
        seen[info["replica"]] = info["replica_stats"].get("job_items", 0)
        if len(seen) == 2:
            break
    return sum(seen.values())


def test_the_nightly_job_on_the_apps_replicas_writes_what_its_own_write_exactly_once(app, tiny_model_dir, tmp_path):
    """enhance.replicas: serve:<app> — the job's Ray Data stage calls the running app's deployment: same outputs,
    same records; a rerun redoes nothing; a missing app, another model or other tiling are refused up front."""
    from conftest import write_tiny_model

    from medsr_dist.enhance.job import run_enhance_job

    _, cfg = app
    archive = tmp_path / "archive"
    archive.mkdir()
    for name, (make, _) in FORMATS.items():
        ext = {"png": ".png", "tiff": ".tif", "jpeg": ".jpg", "dicom": ".dcm"}[name.split("-")[0]]
        (archive / f"{name}{ext}").write_bytes(make())
    (archive / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)

    def job(out: str, *extra: str, checkpoint: str = f"{tiny_model_dir}/model.pth"):
        return run_enhance_job(load_config(None, [
            f"run.root={tmp_path}", f"enhance.input={archive}", f"enhance.output={tmp_path / out}",
            f"enhance.checkpoint={checkpoint}", *(f"enhance.{k}={v}" for k, v in TILE.items()),
            "enhance.batch_size=4", "enhance.cpus_per_replica=0.5", "ray.progress=false", *extra]))

    via_serve = f"enhance.replicas=serve:{cfg.serve.app_name}"
    before = job_items_served(cfg.serve.app_name)
    own = job("own")
    assert job_items_served(cfg.serve.app_name) == before  # the job's own replicas: the app saw nothing
    served = job("served", via_serve)
    assert job_items_served(cfg.serve.app_name) >= before + 5  # the app's replicas computed every image
    assert own.counts == served.counts == {"done": 5, "error": 1}
    for a, b in zip(sorted(own.rows, key=lambda r: r["input_key"]), sorted(served.rows, key=lambda r: r["input_key"])):
        assert (a["status"], a["item_id"], a["params"], a["model_sha256"]) == (
            b["status"], b["item_id"], b["params"], b["model_sha256"])
        if a["status"] == "done":
            mine, theirs = Path(a["output_key"]), Path(b["output_key"])
            assert mine.name == theirs.name and b["consistency_psnr_db"] == a["consistency_psnr_db"]
            np.testing.assert_array_equal(decode_image(mine.read_bytes(), "own").pixels,
                                          decode_image(theirs.read_bytes(), "served").pixels)
            if not mine.name.endswith(".dcm"):  # derived DICOM objects get fresh UIDs; the rest is byte-identical
                assert mine.read_bytes() == theirs.read_bytes()
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "served").rglob("*") if p.is_file()}
    again = job("served", via_serve)  # nothing redone, nothing rewritten but the manifests
    assert again.counts == {"skipped": 5, "error": 1} and again.read_items == 1  # the broken file is read again
    assert all(p.stat().st_mtime_ns == t for p, t in written.items() if "_manifest" not in p.parts)

    with pytest.raises(ValueError, match=r"enhance.replicas serve:nope: no Serve application 'nope' is running "
                                         r"on this Ray cluster \(running: \['medsr'\]\)"):
        job("x", "enhance.replicas=serve:nope")
    other = tmp_path / "other-model"
    other.mkdir()
    write_tiny_model(lambda name, data: (other / name).write_bytes(data), seed=1)
    with pytest.raises(ValueError, match=r"serves medsr \(sha256 \w{12}\), tiny-test@1 \(sha256 \w{12}\), "
                                         r"not enhance.checkpoint tiny-test@1 "
                                         r"\(sha256 \w{12}\); outputs are keyed by the model's sha256"):
        job("x", via_serve, checkpoint=f"{other}/model.pth")
    with pytest.raises(ValueError, match=r"enhance.tile: the job 32, the app 16"):
        job("x", via_serve, "enhance.tile=32")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").rglob("*.png"))


def test_overload_is_answered_503_with_retry_after_then_recovers(app):
    url, _ = app
    data = rgb_png(7, h=64, w=56)  # 16 tiles each; capacity: 2 replicas x (4 ongoing + 2 queued) = 12 requests
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda _: post(url, data, timeout=120), range(64)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 4 and codes.count(200) >= 4, codes
    assert all(r.headers.get("retry-after") == "1" for r in answers if r.status_code == 503)
    time.sleep(1)
    assert post(url, data).status_code == 200  # the queue drained: served again


def test_a_killed_replica_does_not_take_the_app_down(app):
    from ray import serve

    url, cfg = app
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if "model-tiny" in a["name"] and "REPLICA" in a["name"].upper()]
    assert len(names) == 2, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    codes = []
    deadline = time.time() + 60
    ok = 0
    while ok < 6 and time.time() < deadline:
        r = post(url, rgb_png(len(codes)))
        codes.append(r.status_code)
        ok += r.status_code == 200
        if r.status_code == 503:
            time.sleep(0.5)
    assert ok == 6 and set(codes) <= {200, 503}, codes
    # and Serve replaces the replica
    deadline = time.time() + 90
    while time.time() < deadline:
        status = serve.status().applications[cfg.serve.app_name].deployments["model-tiny"]
        if status.status == "HEALTHY" and status.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(1)
    assert status.replica_states.get("RUNNING", 0) == 2, status


def test_past_request_timeout_the_answer_is_408(app):
    url, cfg = app
    # One 1000 x 1000 image at x4 through 16-pixel tiles (~4000 model tiles) takes about request_timeout_s (8 s)
    # on an idle 2-core machine: alone it may just make it. Three at once share the replicas' model calls, so the
    # work behind each answer triples and at least one runs past the timeout however fast the machine is.
    big = [cv2.imencode(".png", (np.random.default_rng(9 + i).random((1000, 1000)) * 255).astype(np.uint8))[1].tobytes()
           for i in range(3)]

    def timed(data: bytes) -> tuple[int, float]:
        t0 = time.perf_counter()
        r = post_retrying(url, data, timeout=120)
        return r.status_code, time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(timed, big))
    assert {code for code, _ in answers} <= {200, 408}, answers  # nothing else: no 500, no dropped connection
    timed_out = [seconds for code, seconds in answers if code == 408]
    assert timed_out, answers
    assert max(timed_out) < cfg.serve.request_timeout_s + 15, answers  # answered at the timeout, not at the end


def test_an_ldm_is_served_by_name_beside_the_gan_with_its_sampling_in_every_answer(app, ldm_export):
    """Several models in one app: ?model=ldm reaches the diffusion model's own deployment (its tiles batched across
    requests like any model's), the answer is what the request function gives on a plain replica, and it carries
    the sampler settings that drew it; the default model is still the GAN."""
    import json

    from medsr_dist.serve.app import served_model_file
    from medsr_dist.serve.model import enhance_file

    url, cfg = app
    model = served_model_file(cfg, 1, cfg.serve.models[1])
    replica = ModelReplica.load(model, Storage(), EngineSettings(**TILE, batch_size=4))
    images = [rgb_png(20 + i, 20, 16) for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda d: post_retrying(url, d, model="ldm"), images))
    for data, r in zip(images, answers):
        assert r.status_code == 200, r.text
        assert r.headers["x-medsr-model-sha256"] == model.sha256
        assert json.loads(r.headers["x-medsr-sampling"]) == model.sampling == {**model.sampling, "samples": 1,
                                                                                "steps": 2}
        want = enhance_file(replica, data, None, limits={"max_input_pixels": 1 << 20, "max_output_pixels": 1 << 24})
        assert np.array_equal(decode_image(r.content, "answer").pixels, decode_image(want["body"], "want").pixels)
    assert post(url, images[0]).headers["x-medsr-model"] != model.name  # no ?model=: the default (tiny)


# --- issue #24: hostile files at the endpoint -------------------------------------------------------------------------

def deflated_dicom(side: int, sparse_noise: bool = False) -> bytes:
    """A legal Deflated Explicit VR Little Endian DICOM of side x side 16-bit zeros: ~1000:1, so a few hundred KiB
    that the header probe would inflate to side^2 x 2 bytes (the parsers refuse past 200:1, io.dicom._inflate).
    ``sparse_noise``: one random byte in 150 (~46:1), a body the ratio bound lets the probe inflate in full."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.Rows = ds.Columns = side
    pixels = np.zeros(side * side * 2, np.uint8)
    if sparse_noise:
        pixels[::150] = np.random.default_rng(0).integers(0, 256, len(pixels[::150]), dtype=np.uint8)
    ds.PixelData = pixels.tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def post_watching_healthz(url: str, data: bytes) -> tuple[httpx.Response, float]:
    """POST ``data`` while polling ``/healthz``; (the answer, the slowest /healthz answer in seconds)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hostile = pool.submit(post, url, data, 60)
        slowest = 0.0
        while not hostile.done():
            t0 = time.perf_counter()
            assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
            slowest = max(slowest, time.perf_counter() - t0)
            time.sleep(0.05)
        return hostile.result(), slowest


def test_a_hostile_file_gets_its_4xx_while_healthz_answers_within_a_second(app):
    url, _ = app
    data = deflated_dicom(11000)  # ~240 MB inflated from ~240 KB; 121 Mpx is over serve.max_input_pixels
    assert len(data) < 3_000_000
    r, slowest = post_watching_healthz(url, data)
    assert r.status_code in (400, 413, 422), r.text
    assert slowest < 1.0, f"/healthz took {slowest:.2f} s while a hostile file was probed"
    assert post(url, rgb_png(3)).status_code == 200  # healthy after


def test_every_hostile_class_over_http_is_answered_in_seconds_while_healthz_answers(app):
    """Issue #24's crafted files (the nightly job's test's small forms) posted to the running app one by one: each
    lying file gets a 4xx within seconds with its reason, /healthz answers within 1 s
    meanwhile. The PNG whose zTXt inflates to 16 MiB and the DICOM with decimal-comma DS / lettered IS hold honest
    pixels: 200, with no text copied into the answer; the app is healthy after."""
    from medsr_dist.data import hostile

    url, _ = app
    lying = {"tiff-ifd-loop": hostile.tiff_ifd_loop(), "dicom-j2k-siz-lie": hostile.dicom_j2k_lie(3000),
             "dicom-jpeg-sof-lie": hostile.dicom_jpeg_lie(3000), "dicom-jpeg-ls-sof55-lie": hostile.dicom_jpeg_ls_lie(3000),
             "dicom-rle-segment-lie": hostile.dicom_rle_lie(), "tiff-jpeg-strip-lie": hostile.tiff_jpeg_strip_lie(3000),
             "dicom-deflate-bomb": hostile.dicom_deflate_bomb(64 * 1024),
             "dicom-sequence-flood": hostile.dicom_sequence_flood(60_000)}
    assert set(lying) | {"png-ztxt-bomb", "dicom-malformed-ds-is"} == set(hostile.HOSTILE_CLASSES)
    for name, data in lying.items():
        t0 = time.perf_counter()
        r, slowest = post_watching_healthz(url, data)
        assert r.status_code in (400, 413, 415, 422), (name, r.status_code, r.text)
        assert time.perf_counter() - t0 < 20 and slowest < 1.0, (name, time.perf_counter() - t0, slowest)
        assert r.json()["detail"], (name, r.text)  # a reason, not an empty refusal
    bomb, slowest = post_watching_healthz(url, hostile.png_text_bomb())
    assert bomb.status_code == 200 and slowest < 1.0, bomb.text
    assert len(bomb.content) < 1 << 20 and b"AAAAAAAA" not in bomb.content  # 16 MiB of text neither read nor copied
    malformed, slowest = post_watching_healthz(url, hostile.dicom_malformed_numbers())
    assert malformed.status_code == 200 and slowest < 1.0, malformed.text
    assert post(url, rgb_png(4)).status_code == 200  # healthy after


def test_a_multipart_body_is_counted_as_it_streams(app):
    url, _ = app

    def chunks():  # no Content-Length: the ingress must count
        head = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
                b"Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n")
        yield head
        for _ in range(40):
            yield b"\0" * 100_000

    r = httpx.post(f"{url}/v1/enhance", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b", **AUTH},
                   timeout=60)
    assert r.status_code == 413 and "serve.max_body_bytes" in r.json()["detail"], r.text


# --- issue #25: authentication, over HTTP ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def secure(app, tiny_model_dir):
    """A second app on the same Serve: model 'tiny' behind serve.auth oidc (keys from a local JWKS server the test
    starts), rate limit 0.2/s with a burst of 3 per caller; yields (url, issuer keys)."""
    from ray import serve

    from medsr_dist.serve.app import build_app
    from test_serve_unit import AUDIENCE, ISSUER, JwksServer, signing_key

    keys = {"a": signing_key("a"), "forged": signing_key("a")}
    jwks = JwksServer([keys["a"]])
    base, _ = app
    cfg = load_config(None, [
        f"serve.models=[{{name: tiny, checkpoint: {tiny_model_dir}/model.pth}}]",
        *(f"serve.{k}={v}" for k, v in TILE.items()), "serve.min_replicas=1", "serve.max_replicas=1",
        "serve.cpus_per_replica=0.5", "serve.auth.mode=oidc", f"serve.auth.issuer={ISSUER}",
        f"serve.auth.audience={AUDIENCE}", f"serve.auth.jwks_url={jwks.url}", "serve.rate_limit.per_second=0.2",
        "serve.rate_limit.burst=3",
    ])
    serve.run(build_app(cfg), name="secure", route_prefix="/secure")
    try:
        yield f"{base}/secure", keys
    finally:
        serve.delete("secure")
        jwks.close()


def test_every_route_but_healthz_needs_a_valid_token_for_its_model(secure):
    from test_serve_unit import make_jwt

    url, keys = secure

    def call(token=None, model="tiny", path="/v1/enhance"):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if path == "/v1/enhance":
            return httpx.post(f"{url}{path}", content=rgb_png(5), params={"model": model}, headers=headers, timeout=60)
        return httpx.get(f"{url}{path}", headers=headers, timeout=30)

    assert httpx.get(f"{url}/healthz", timeout=30).text == "ok"
    for label, token in {"no token": None, "expired": make_jwt(keys["a"], sub="u-exp", exp_in=-600),
                         "badly signed": make_jwt(keys["forged"], sub="u-forged"), "garbage": "abc.def.ghi",
                         "wrong audience": make_jwt(keys["a"], sub="u-aud", aud="other")}.items():
        for path in ("/v1/enhance", "/v1/models", "/docs", "/openapi.json"):
            r = call(token, path=path)
            assert r.status_code == 401, (label, path, r.status_code, r.text)
            assert r.headers["www-authenticate"] == "Bearer" and r.json() == {"detail": "authentication required"}
    other = call(make_jwt(keys["a"], sub="u-other", scope="medsr:ldm"))
    assert other.status_code == 403 and other.json() == {"detail": "not allowed"}
    valid = make_jwt(keys["a"], sub="u-ok")
    r = call(valid)
    assert r.status_code == 200 and r.headers["x-medsr-model"], r.text
    assert [m["name"] for m in call(valid, path="/v1/models").json()["models"]] == ["tiny"]
    assert call(valid, path="/docs").status_code == 200


def test_a_caller_past_its_rate_is_answered_429_with_retry_after(secure):
    from test_serve_unit import make_jwt

    url, keys = secure
    headers = {"Authorization": f"Bearer {make_jwt(keys['a'], sub='u-flood')}"}
    codes = [httpx.get(f"{url}/v1/models", headers=headers, timeout=30) for _ in range(4)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429], [r.text for r in codes]
    assert int(codes[-1].headers["retry-after"]) >= 1 and codes[-1].json() == {"detail": "rate limited; retry later"}
    other = {"Authorization": f"Bearer {make_jwt(keys['a'], sub='u-calm')}"}
    assert httpx.get(f"{url}/v1/models", headers=other, timeout=30).status_code == 200  # a bucket per caller


def test_the_nightly_jobs_serve_path_needs_no_http_credential(secure, tiny_model_dir, tmp_path):
    """enhance.replicas: serve:<app> calls the model deployment through a Ray handle, not the authenticated ingress."""
    from medsr_dist.enhance.job import run_enhance_job

    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "a.png").write_bytes(rgb_png(7))
    result = run_enhance_job(load_config(None, [
        f"run.root={tmp_path}", f"enhance.input={archive}", f"enhance.output={tmp_path / 'out'}",
        f"enhance.checkpoint={tiny_model_dir}/model.pth", *(f"enhance.{k}={v}" for k, v in TILE.items()),
        "enhance.batch_size=4", "ray.progress=false", "enhance.replicas=serve:secure"]))
    assert result.counts == {"done": 1}


def test_two_tokens_of_one_client_both_work_while_it_rotates_and_nothing_else_does(app):
    url, _ = app
    for token in (OLD_TOKEN, NEW_TOKEN):
        r = httpx.post(f"{url}/v1/enhance", content=rgb_png(9), headers={"Authorization": f"Bearer {token}"},
                       timeout=60)
        assert r.status_code == 200, r.text
    for headers in ({}, {"Authorization": "Bearer clinic-token-2026-10-cccccccccccc"}, {"Authorization": NEW_TOKEN}):
        r = httpx.post(f"{url}/v1/enhance", content=rgb_png(9), headers=headers, timeout=60)
        assert r.status_code == 401 and r.json() == {"detail": "authentication required"}, r.text
        assert NEW_TOKEN not in r.text
    assert httpx.get(f"{url}/healthz", timeout=30).text == "ok"  # open: probes need no credential
