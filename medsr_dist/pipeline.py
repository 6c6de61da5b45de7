"""Stage runners shared by the CLI and ``jobs/*.py``: start Ray, run a stage, print what was written.

``run_demo`` strings the stages together on an embedded default (local Ray, local folder store,
sample data it makes itself) and ends with a summary of where everything was written.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from typing import Callable

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from medsr_dist.config import MedsrConfig
from medsr_dist.storage import Storage

HOLDOUT_GT = "holdout-gt"


@contextmanager
def _stage(console: Console, title: str, progress: Callable[[], str] | None = None, every_s: float = 2.0):
    """One status line for a stage (spinner + elapsed time + ``progress()`` polled every ``every_s``), then ✓."""
    t0 = time.perf_counter()
    console.rule(f"[bold]{title}")
    with console.status(f"{title} …", spinner="dots") as status:
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(every_s):
                try:
                    extra = progress() if progress is not None else ""
                except Exception:  # noqa: BLE001 - a progress probe must never break the stage
                    extra = ""
                status.update(f"{title} … {time.perf_counter() - t0:.0f} s" + (f"  {extra}" if extra else ""))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            yield status
        finally:
            stop.set()
            poller.join(timeout=every_s + 1)
    console.print(f"[green]✓[/] {title} ({time.perf_counter() - t0:.0f} s)")


@contextmanager
def ray_output_to_file(path: str):
    """Send everything written to this process's stdout/stderr (Ray's driver loggers, Ray Data / Ray Train
    progress lines, and the output of Ray processes started inside, which inherit the descriptors) to the local
    file ``path``; yields a Console on the original terminal for the stage lines."""
    import os
    import sys

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = open(path, "a", buffering=1)
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        yield Console(file=terminal)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        terminal.close()
        log.close()


def run_prepare(cfg: MedsrConfig, console: Console):
    from medsr_dist.data.prepare import prepare_dataset
    from medsr_dist.runtime import init_ray

    init_ray(cfg)
    with _stage(console, f"prepare {cfg.prepare.input} → {cfg.prepare.output}"):
        result = prepare_dataset(cfg, Storage(cfg.storage))
    console.print(f"  images per split: {result.counts}  patients per split: {result.patients}")
    for err in result.errors:
        console.print(f"  [yellow]skipped[/] {err['key']}: {err['error']}", highlight=False)
    return result


def run_train(cfg: MedsrConfig, console: Console):
    from medsr_dist.runtime import init_ray
    from medsr_dist.train.trainer import latest_iteration, run_training

    init_ray(cfg)
    storage = Storage(cfg.storage)
    start = latest_iteration(storage, cfg)

    def checkpointed() -> str:  # progress as the checkpoints land (every train.checkpoint_every iterations)
        return f"checkpoint at iteration {latest_iteration(storage, cfg)}/{cfg.train.iterations}"

    with _stage(console, f"train {cfg.model.family} x{cfg.model.scale} ({cfg.train.num_workers} Ray Train workers, "
                         f"iterations {start}→{cfg.train.iterations})", progress=checkpointed, every_s=5.0):
        result = run_training(cfg, storage)
    shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float) and not k.startswith("out_d")}
    console.print(f"  iteration {result.iterations}: {shown}", highlight=False)
    console.print(f"  checkpoint: {result.checkpoint}\n  exported model: {result.export} (sha256 {result.export_sha256[:12]}…)")
    return result


def run_enhance(cfg: MedsrConfig, console: Console, progress_every_s: float = 10.0):
    """Enhance an archive; prints progress (items done/total, throughput) while it runs, then errors, flagged
    outputs and, on the last line, where the manifest is."""
    from medsr_dist.enhance.job import run_enhance_job
    from medsr_dist.runtime import init_ray

    init_ray(cfg)
    last = {"t": 0.0, "pct": -1}

    def progress(p) -> None:
        pct = 100 * p.finished // max(p.total, 1)
        if p.finished == p.total or p.elapsed_s - last["t"] >= progress_every_s or pct // 10 > last["pct"] // 10:
            last.update(t=p.elapsed_s, pct=pct)
            console.print(f"  enhance: {p.line()}", highlight=False)

    with _stage(console, f"enhance {cfg.enhance.input} → {cfg.enhance.output}"):
        result = run_enhance_job(cfg, Storage(cfg.storage), progress=progress)
    console.print(f"  items: {result.counts} in {result.seconds:.0f} s "
                  f"({result.input_pixels / 1e6 / max(result.seconds, 1e-9):.2f} input Mpx/s enhanced)", highlight=False)
    for row in result.rows:  # named by item id; by key only with enhance.log_keys (keys may embed identifiers)
        if row["status"] in ("error", "quarantined"):
            console.print(f"  [yellow]{row['status']}[/] {result.label(row)}: {row['error']}", highlight=False)
        elif row["flagged"] and row["status"] == "done":
            where = row["output_key"] if cfg.enhance.log_keys else result.label(row)
            console.print(f"  [yellow]flagged[/] {where}: consistency {row['consistency_psnr_db']:.1f} dB "
                          f"< {cfg.enhance.consistency_threshold_db} dB", highlight=False)
    console.print(f"  run manifest: {result.run_manifest}", highlight=False)
    console.print(f"  manifest: {result.manifest}", highlight=False)
    return result


# ----------------------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------------------
def write_demo_data(cfg: MedsrConfig, storage: Storage) -> list[dict]:
    """Sample archive (training) + hold-out set: low-resolution inputs in several file forms, with their
    high-resolution ground truth (16-bit PNG) under ``<run.root>/holdout-gt`` for the report."""
    from medsr_dist.data.synthetic import make_radiograph, write_sample_archive
    from medsr_dist.io.dicom import build_radiograph_dataset, dataset_to_bytes
    from medsr_dist.io.image import ImageMeta, encode_image

    s, scale = cfg.sample, cfg.model.scale
    write_sample_archive(lambda key, data: storage.write_bytes(storage.join(s.archive, key), data),
                         n_images=s.n_images, size=s.size, seed=cfg.run.seed)
    forms = [("png", 16, "MONOCHROME2"), ("dicom", 12, "MONOCHROME1"), ("png", 8, "MONOCHROME2")]
    holdout = []
    for i in range(s.n_holdout):
        fmt, bits, photometric = forms[i % len(forms)]
        hr = make_radiograph(10_000_019 + cfg.run.seed * 101 + i, s.size)
        lr = cv2.resize(hr, (s.size // scale, s.size // scale), interpolation=cv2.INTER_CUBIC).clip(0, 1)
        patient = f"9{i:07d}"
        key = f"{patient}_000." + ("dcm" if fmt == "dicom" else "png")
        if fmt == "dicom":
            data = dataset_to_bytes(build_radiograph_dataset(lr, bits_stored=bits, photometric=photometric,
                                                             patient_id=patient, uid_key=f"holdout/{i}"))
        else:
            meta = ImageMeta(format="png", dtype="uint16" if bits > 8 else "uint8", bits_stored=bits, channels=1,
                             photometric=photometric)
            data = encode_image(lr[:, :, None], meta)
        storage.write_bytes(storage.join(s.holdout, key), data)
        gt_meta = ImageMeta(format="png", dtype="uint16", bits_stored=16, channels=1, photometric="MONOCHROME2")
        storage.write_bytes(storage.join(cfg.run.root, HOLDOUT_GT, f"{patient}_000.png"), encode_image(hr[:, :, None], gt_meta))
        holdout.append({"key": key, "gt": f"{patient}_000.png"})
    return holdout


def write_demo_report(cfg: MedsrConfig, storage: Storage, enhanced_rows: list[dict]) -> dict:
    """PSNR/SSIM of bicubic and the model against the hold-out ground truth + side-by-side PNGs."""
    from medsr_dist.eval.report import ReportEntry, write_report
    from medsr_dist.io.image import decode_image

    report_dir = storage.join(cfg.run.root, "report")

    def entries():
        for row in enhanced_rows[: max(cfg.enhance.report_images, 0) or len(enhanced_rows)]:
            if row["status"] not in ("done", "skipped"):
                continue
            stem = row["input_key"].rsplit("/", 1)[-1].split(".")[0]
            gt_uri = storage.join(cfg.run.root, HOLDOUT_GT, f"{stem}.png")
            if not storage.exists(gt_uri):
                continue
            lr = decode_image(storage.read_bytes(row["input_key"]), row["input_key"]).pixels
            out = decode_image(storage.read_bytes(row["output_key"]), row["output_key"]).pixels
            gt = decode_image(storage.read_bytes(gt_uri), gt_uri).pixels
            yield ReportEntry(name=stem, lr=lr, output=out, ground_truth=gt)

    report = write_report(entries(), lambda key, data: storage.write_bytes(storage.join(report_dir, key), data),
                          crop_border=cfg.model.scale, model_label=f"medsr x{cfg.model.scale}",
                          title="medsr-dist demo: hold-out radiographs")
    report["dir"] = report_dir
    return report


def run_demo(cfg: MedsrConfig, console: Console, pretrain: MedsrConfig | None = None, quiet_ray: bool = True) -> dict:
    """The whole pipeline on a local Ray; returns where things were written.

    ``pretrain``: a first training stage (configs/demo_psnr.yaml: L1 only) whose export becomes
    ``cfg.model.pretrained_g`` of the second (``cfg``, a GAN family). ``quiet_ray``: Ray's own output goes to
    ``<run.root>/logs/ray.log`` (a local run root; a temporary folder otherwise) and the terminal shows one
    status line per stage.
    """
    if quiet_ray:
        import os
        import tempfile

        root = cfg.run.root.removeprefix("file://")
        log_dir = os.path.join(root if "://" not in root else tempfile.mkdtemp(prefix="medsr-demo-"), "logs")
        log_path = os.path.join(log_dir, "ray.log")
        console.print(f"[dim]Ray's log lines → {log_path}[/]", highlight=False)
        with ray_output_to_file(log_path) as terminal:
            return _run_demo(cfg, terminal, pretrain, log_path)
    return _run_demo(cfg, console, pretrain, None)


def _run_demo(cfg: MedsrConfig, console: Console, pretrain: MedsrConfig | None, log_path: str | None) -> dict:
    from medsr_dist.runtime import init_ray

    storage = Storage(cfg.storage)
    t0 = time.perf_counter()
    with _stage(console, f"sample archive → {cfg.sample.archive} (+ hold-out {cfg.sample.holdout})"):
        for prefix in (cfg.sample.archive, cfg.sample.holdout):
            for uri in storage.list_files(prefix) if storage.exists(prefix) else []:
                storage.delete(uri)  # the demo owns these folders: regenerate them from scratch
        write_demo_data(cfg, storage)
    init_ray(cfg)
    from medsr_dist.data.prepare import use_demo_group_secret

    if use_demo_group_secret():  # the sample archive's patients are synthetic; a real archive needs a real secret
        console.print("[dim]prepare: synthetic patients pseudonymised with the published demo secret "
                      "(set MEDSR_GROUP_SECRET for real archives)[/]")
    prep = run_prepare(cfg, console)
    stages = {}
    if pretrain is not None:
        if pretrain.train.output == cfg.train.output:  # keep stage 1's checkpoints and export apart from stage 2's
            pretrain.train.output = f"{cfg.train.output.rstrip('/')}-{pretrain.model.family}"
        first = run_train(pretrain, console)
        stages[f"model, stage 1 ({pretrain.model.family})"] = first.export
        cfg.model.pretrained_g = first.export  # stage 2 starts from stage 1's EMA generator
    trained = run_train(cfg, console)
    enhanced = run_enhance(cfg, console)
    with _stage(console, "report (PSNR/SSIM vs bicubic, side-by-side figures)"):
        report = write_demo_report(cfg, storage, enhanced.rows)
    summary = {
        "sample archive": cfg.sample.archive, "dataset": f"{cfg.prepare.output} ({prep.counts})",
        **stages, "checkpoint": trained.checkpoint, "model": trained.export, "enhanced": cfg.enhance.output,
        "manifest": enhanced.manifest, "report": storage.join(report["dir"], "report.md"),
        "figures": ", ".join(storage.join(report["dir"], img["panel"]) for img in report["images"]),
        **({"Ray log": log_path} if log_path else {}),
    }
    table = Table(title=f"medsr-dist demo finished in {time.perf_counter() - t0:.0f} s", show_lines=False)
    table.add_column("what")
    table.add_column("where", overflow="fold")
    for k, v in summary.items():
        table.add_row(k, str(v))
    console.print(table)
    means = report.get("mean") or {}
    if means:
        console.print(f"hold-out means: {json.dumps(means)}", highlight=False)
    console.print("[dim]Outputs are enhancements, not new acquisitions; every file carries its provenance.[/]")
    console.print(f"report: {summary['report']}", highlight=False)
    return summary
