"""Benchmark the nightly job against a PACS: instances/s end to end with a DICOMweb input and output (a local Orthanc
with its DICOMweb plugin, started here as the tests do) against the same DICOM objects as local files [goal >= 0.8].

    python jobs/bench_pacs.py                                    # 48 instances of 128x128, 2 rounds
    python jobs/bench_pacs.py --instances 96 --size 256 --concurrency 4 --rounds 3 --json /tmp/pacs.json

Every run is ``run_enhance_job`` on one local Ray (``--cpus`` logical CPUs, one CPU replica), the same model (a
seeded RRDBNet of ``--feat``/``--blocks``/``--grow``), the same settings and the same objects (12-bit radiographs,
``--per-series`` instances per series):

* files: a local folder in, a local folder out (the reference);
* pacs: QIDO-RS listing, WADO-RS of each instance, STOW-RS of each derived object (with the QIDO-RS checks before and
  after each store), manifest on a local path, at most ``pacs.concurrency`` read and write tasks;
* pacs-in/files-out: WADO-RS in, local files out.

Seconds are the job's own (``EnhanceResult.seconds``: listing, model check, Ray Data, every item, manifests), so the
PACS rows pay the listing and the per-series existence checks too. Before each PACS round the derived series of the
previous round are deleted through Orthanc's REST API (otherwise the job would find them and store nothing), and
each round writes a fresh manifest. One untimed files run first warms Ray's workers up; methods are interleaved
within a round; the best round of each is kept.
Needs the Debian packages ``orthanc`` and ``orthanc-dicomweb``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # medsr_dist/
sys.path.insert(0, str(ROOT / "tests"))  # tests/orthanc.py: the Orthanc harness


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=48)
    p.add_argument("--size", type=int, default=128, help="side of each radiograph (input pixels)")
    p.add_argument("--per-series", type=int, default=8, help="instances per series")
    p.add_argument("--concurrency", type=int, default=2, help="pacs.concurrency (the default)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--feat", type=int, default=16)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--grow", type=int, default=8)
    p.add_argument("--json", type=str, default=None, help="also write the figures here")
    return p.parse_args(argv)


def write_model(directory: Path, feat: int, blocks: int, grow: int) -> str:
    import hashlib

    import torch

    import medsr_dist.compat  # noqa: F401  (must precede basicsr)
    from basicsr.archs.rrdbnet_arch import RRDBNet
    from medsr_dist.models.weights import save_basicsr_checkpoint

    torch.manual_seed(0)
    arch = {"num_feat": feat, "num_block": blocks, "num_grow_ch": grow}
    net = RRDBNet(num_in_ch=3, num_out_ch=3, scale=4, **arch)
    with torch.no_grad():
        net.conv_last.bias.fill_(0.5)
    data = save_basicsr_checkpoint(net, "", ema=net)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.pth").write_bytes(data)
    meta = {"family": "realesrgan", "scale": 4, "generator": {"type": "RRDBNet", "num_in_ch": 3, "num_out_ch": 3, **arch},
            "iteration": 1, "run": "bench-pacs", "name": "bench-pacs@1", "sha256": hashlib.sha256(data).hexdigest()}
    (directory / "meta.json").write_text(json.dumps(meta))
    return str(directory / "model.pth")


def make_objects(n: int, size: int, per_series: int) -> list[bytes]:
    from pydicom.uid import generate_uid

    from medsr_dist.data.synthetic import make_radiograph
    from medsr_dist.io.dicom import build_radiograph_dataset, dataset_to_bytes

    out = []
    for i in range(n):
        series = i // per_series
        ds = build_radiograph_dataset(make_radiograph(1000 + i, size), bits_stored=12, modality="DX",
                                      patient_id=f"BENCH{series:04d}", uid_key=f"bench-pacs/{i}",
                                      study_uid=generate_uid(entropy_srcs=["bench-pacs-study", str(series // 2)]),
                                      series_uid=generate_uid(entropy_srcs=["bench-pacs-series", str(series)]),
                                      instance_number=i % per_series + 1)
        ds.StudyDate = f"2024{1 + series // 2 % 12:02d}01"
        out.append(dataset_to_bytes(ds))
    return out


def delete_derived(server) -> int:
    """Delete every series medsr-dist derived (SeriesDescription ``... [SR x<scale>]``) through Orthanc's REST API."""
    from medsr_dist.pacs.dicomweb import is_derived_series

    r = server.session.get(server.url + "/series", params={"expand": ""}, timeout=60)
    r.raise_for_status()
    gone = 0
    for series in r.json():
        if is_derived_series(series["MainDicomTags"].get("SeriesDescription", "")):
            server.session.delete(f"{server.url}/series/{series['ID']}", timeout=60).raise_for_status()
            gone += 1
    return gone


def main(argv=None) -> dict:
    args = parse_args(argv)
    import ray

    from medsr_dist.config import load_config
    from medsr_dist.enhance.job import run_enhance_job
    from orthanc import local_orthanc

    tmp = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    checkpoint = write_model(tmp / "model", args.feat, args.blocks, args.grow)
    objects = make_objects(args.instances, args.size, args.per_series)
    files = tmp / "files"
    files.mkdir()
    for i, data in enumerate(objects):
        (files / f"series{i // args.per_series:03d}" / f"{i:05d}.dcm").parent.mkdir(exist_ok=True)
        (files / f"series{i // args.per_series:03d}" / f"{i:05d}.dcm").write_bytes(data)
    common = [f"run.root={tmp / 'run'}", f"enhance.checkpoint={checkpoint}", "enhance.tile=0",
              "enhance.images_per_batch=4", f"pacs.concurrency={args.concurrency}", "ray.progress=false"]
    results: dict[str, list[float]] = {"files": [], "pacs": [], "pacs-in/files-out": []}
    with local_orthanc() as server:
        for name, value in server.env.items():
            os.environ[name] = value  # before ray.init: the workers inherit the credentials
        for data in objects:
            server.upload(data)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset progress lines
        try:
            # warm-up (not timed): Ray's worker processes and the replica's imports are paid once, not by round 1
            run_enhance_job(load_config(None, [*common, f"enhance.input={files}", f"enhance.output={tmp / 'warm'}"]))
            for rnd in range(args.rounds):
                for method in results:
                    out = tmp / f"out-{method.replace('/', '-')}-{rnd}"
                    if method == "files":
                        over = [f"enhance.input={files}", f"enhance.output={out}"]
                    elif method == "pacs":
                        delete_derived(server)
                        over = [f"enhance.input={server.uri}", f"enhance.output={server.uri}",
                                f"enhance.manifest={out}"]
                    else:
                        over = [f"enhance.input={server.uri}", f"enhance.output={out}"]
                    result = run_enhance_job(load_config(None, [*common, *over]))
                    done = result.counts.get("done", 0)
                    if done != args.instances:
                        raise SystemExit(f"{method}: {done} of {args.instances} done: {result.counts}")
                    results[method].append(args.instances / result.seconds)
                    print(f"round {rnd + 1} {method:18s} {results[method][-1]:6.2f} instances/s "
                          f"({result.seconds:.1f} s)", flush=True)
        finally:
            ray.shutdown()
    best = {k: max(v) for k, v in results.items()}
    figures = {"instances": args.instances, "size": args.size, "concurrency": args.concurrency,
               "model": f"RRDBNet feat {args.feat} blocks {args.blocks} grow {args.grow}", "best_instances_per_s": best,
               "ratio_pacs_vs_files": best["pacs"] / best["files"],
               "ratio_pacs_in_files_out_vs_files": best["pacs-in/files-out"] / best["files"], "rounds": results}
    print(f"\n{args.instances} instances of {args.size}x{args.size}, pacs.concurrency {args.concurrency}, "
          f"{figures['model']}, best of {args.rounds}:")
    print(f"{'method':20s} {'instances/s':>12s} {'vs files':>9s}")
    for k, v in best.items():
        print(f"{k:20s} {v:12.2f} {v / best['files']:9.2f}")
    print(f"goal: pacs / files >= 0.8 -> {figures['ratio_pacs_vs_files']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return figures


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
