"""Cost of each hostile file class (issue #24) to probe + decode, before and after the bounded decode path.

    python jobs/bench_hostile.py [--before 91a6a3d] [--timeout 20] [--memory-gib 8] [--only CLASS ...]
    python jobs/bench_hostile.py --bounded-cost [--repeat 5] [--sizes 256 1024 2048 4096]

Builds every crafted file of :data:`medsr_dist.data.hostile.HOSTILE_CLASSES` at the issue's size (a 30000 x 30000
lie, a 256 KiB deflate body, 262k sequence items, a 16 MiB zTXt), then for each side — this tree ("after") and
``--before`` (a commit, exported with ``git archive`` to a temporary folder imported instead of this tree) — runs
``probe_image`` then ``decode_image`` on it in a fresh subprocess under an address-space limit (``--memory-gib``,
RLIMIT_AS) and a wall-time limit (``--timeout``), and prints seconds, the peak RSS growth over the imports (MiB)
and the outcome (the exception class and the first words of its reason, or ``ok``), side by side. A case that
hits a limit is reported as such: the limit is the cost's lower bound. Results go in docs/RELIABILITY.md.

``--bounded-cost``: what the last line of defence costs — ``decode_image`` in-process against
``decode_image_bounded`` (a forkserver child under caps, pixels back through a pipe) on 16-bit grey PNGs and an
uncompressed DICOM of growing size, side by side in one run (the forkserver started before timing); at 256² also an
8-bit RGB PNG, a typical Serve request (Serve's replica, ``prepare`` and ``eval`` decode through the same call).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
# the tree to measure first, and the editable install's finder (which would map medsr_dist to this checkout) out
sys.path.insert(0, sys.argv[2])
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()]
import medsr_dist.io.image as image
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rss0_kib": rss0}), flush=True)
data = open(sys.argv[1], "rb").read()
t0 = time.perf_counter()
outcome = "ok"
try:
    image.probe_image(data, "hostile")
    image.decode_image(data, "hostile")
except Exception as exc:
    outcome = f"{type(exc).__name__}: {str(exc).partition(': ')[2][:70]}"
seconds = time.perf_counter() - t0
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
print(json.dumps({"seconds": seconds, "rss_mib": growth, "outcome": outcome, "module": image.__file__}))
"""


def _peak_kib(pid: int) -> int | None:
    """VmHWM (peak resident set) of a running process, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_case(path: Path, tree: str, timeout: float, memory_bytes: int) -> dict:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), tree], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        peak = _peak_kib(child.pid)
        child.kill()
        out, _ = child.communicate()
        rss0 = next((json.loads(x)["rss0_kib"] for x in out.splitlines() if x.startswith('{"rss0')), None)
        growth = None if peak is None or rss0 is None else (peak - rss0) / 1024
        return {"seconds": timeout, "rss_mib": growth, "outcome": f"still running after {timeout:g} s (killed)"}
    lines = [line for line in out.splitlines() if line.startswith('{"seconds')]
    if not lines:
        tail = (err.strip().splitlines() or ["?"])[-1][:70]
        return {"seconds": None, "rss_mib": None, "outcome": f"died (rc {child.returncode}): {tail}"}
    return json.loads(lines[-1])


def bounded_cost(repeat: int, sizes: list[int]) -> None:
    import time

    import cv2
    import numpy as np

    sys.path.insert(0, str(REPO))
    from medsr_dist.io.bounded import decode_image_bounded
    from medsr_dist.io.dicom import build_radiograph_dataset, dataset_to_bytes
    from medsr_dist.io.image import decode_image

    def timed(function, data) -> float:
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            function(data)
            best = min(best, time.perf_counter() - t0)
        return best

    bounded = lambda data: decode_image_bounded(data, "bench", memory_bytes=8 << 30, seconds=300)  # noqa: E731
    inproc = lambda data: decode_image(data, "bench")  # noqa: E731
    rng = np.random.default_rng(0)
    print(f"{'input':24} {'in-process ms':>14} {'bounded ms':>11} {'added ms':>9} {'ratio':>6}")
    bounded(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes())  # start the forkserver
    for size in sizes:
        image = rng.integers(0, 4096, (size, size), dtype=np.uint16)
        cases = {f"png16 {size}x{size}": cv2.imencode(".png", image)[1].tobytes(),
                 f"dicom12 {size}x{size}": dataset_to_bytes(build_radiograph_dataset(image / 4095.0, bits_stored=12))}
        if size == 256:
            rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            cases[f"png8 rgb {size}x{size}"] = cv2.imencode(".png", rgb)[1].tobytes()
        for label, data in cases.items():
            a, b = timed(inproc, data), timed(bounded, data)
            print(f"{label:24} {a * 1000:14.1f} {b * 1000:11.1f} {(b - a) * 1000:9.1f} {b / a:6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="91a6a3d", help="commit to compare with (main before issue #24's fixes)")
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--memory-gib", type=float, default=8.0)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--bounded-cost", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 1024, 2048, 4096], help="--bounded-cost sides")
    args = parser.parse_args()
    if args.bounded_cost:
        bounded_cost(args.repeat, args.sizes)
        return
    sys.path.insert(0, str(REPO))
    from medsr_dist.data.hostile import HOSTILE_CLASSES

    with tempfile.TemporaryDirectory(prefix="bench_hostile_") as tmp:
        tmp_path = Path(tmp)
        before = tmp_path / "before"
        before.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before, "medsr_dist"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        sides = {"before": str(before), "after": str(REPO)}
        print(f"{'class':26} {'bytes':>9}  {'side':6} {'seconds':>8} {'peak MiB':>9}  outcome")
        for name, build in HOSTILE_CLASSES.items():
            if args.only and name not in args.only:
                continue
            data = build()
            path = tmp_path / name
            path.write_bytes(data)
            del data
            for side, tree in sides.items():
                result = run_case(path, tree, args.timeout, int(args.memory_gib * (1 << 30)))
                if "module" in result and not result["module"].startswith(tree):
                    raise SystemExit(f"{side} imported {result['module']}, not the tree under {tree}")
                seconds = "-" if result["seconds"] is None else f"{result['seconds']:.2f}"
                rss = "-" if result["rss_mib"] is None else f"{result['rss_mib']:.0f}"
                print(f"{name:26} {path.stat().st_size:>9,}  {side:6} {seconds:>8} {rss:>9}  {result['outcome']}",
                      flush=True)


if __name__ == "__main__":
    main()
