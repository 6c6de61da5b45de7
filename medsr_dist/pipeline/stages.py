"""Stage runners shared by the CLI and ``jobs/*.py``: start Ray, run a stage, print what was written.

:mod:`medsr_dist.pipeline.demo` strings them together (``run_demo``).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable

from rich.console import Console

from medsr_dist.config import MedsrConfig
from medsr_dist.data.prepare import prepare_dataset
from medsr_dist.enhance.job import run_enhance_job
from medsr_dist.runtime import init_ray
from medsr_dist.storage import Storage


@contextmanager
def stage_status(console: Console, title: str, progress: Callable[[], str] | None = None, every_s: float = 2.0):
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
    init_ray(cfg)
    with stage_status(console, f"prepare {cfg.prepare.input} → {cfg.prepare.output}"):
        result = prepare_dataset(cfg, Storage(cfg.storage))
    console.print(f"  images per split: {result.counts}  patients per split: {result.patients}")
    for err in result.errors:  # named by pseudonym: <output>/index.jsonl maps it to the file
        console.print(f"  [yellow]skipped[/] {err['key']}: {err['error']}", highlight=False)
    if result.errors:
        console.print(f"  files by pseudonym: {Storage.join(result.output, 'index.jsonl')}", highlight=False)
    return result


def run_train(cfg: MedsrConfig, console: Console):
    # lazy: the training stack imports torch and basicsr; `medsr prepare` and `medsr enhance` never need it
    from medsr_dist.train.trainer import latest_iteration, run_training

    init_ray(cfg)
    storage = Storage(cfg.storage)
    start = latest_iteration(storage, cfg)

    def checkpointed() -> str:  # progress as the checkpoints land (every train.checkpoint_every iterations)
        return f"checkpoint at iteration {latest_iteration(storage, cfg)}/{cfg.train.iterations}"

    with stage_status(console, f"train {cfg.model.family} x{cfg.model.scale} ({cfg.train.num_workers} Ray Train workers, "
                         f"iterations {start}→{cfg.train.iterations})", progress=checkpointed, every_s=5.0):
        result = run_training(cfg, storage)
    shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float) and not k.startswith("out_d")}
    console.print(f"  iteration {result.iterations}: {shown}", highlight=False)
    console.print(f"  checkpoint: {result.checkpoint}\n  exported model: {result.export} (sha256 {result.export_sha256[:12]}…)")
    return result


def run_enhance(cfg: MedsrConfig, console: Console, progress_every_s: float = 10.0):
    """Enhance an archive; prints progress (items done/total, throughput) while it runs, then errors, flagged
    outputs and, on the last line, where the manifest is."""
    init_ray(cfg)
    last = {"t": 0.0, "pct": -1}

    def progress(p) -> None:
        pct = 100 * p.finished // max(p.total, 1)
        if p.finished == p.total or p.elapsed_s - last["t"] >= progress_every_s or pct // 10 > last["pct"] // 10:
            last.update(t=p.elapsed_s, pct=pct)
            console.print(f"  enhance: {p.line()}", highlight=False)

    with stage_status(console, f"enhance {cfg.enhance.input} → {cfg.enhance.output}"):
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
