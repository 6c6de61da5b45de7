"""`medsr enhance`, `medsr export` and `medsr status`: the inference side's commands.

    medsr enhance -c configs/enhance_nightly.yaml [--log-keys] [key=value ...]
    medsr export --format onnx -c configs/enhance_nightly.yaml          # model.onnx beside enhance.checkpoint
    medsr export --format onnx --checkpoint runs/x/train/export/model.pth --output /tmp/x4.onnx
    medsr status s3://archive/enhanced -c configs/enhance_nightly.yaml  # -c only for storage settings
    medsr status dicomweb+http://pacs:8042/dicom-web -c configs/enhance_pacs.yaml   # manifest at enhance.manifest
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medsr_dist.cli.common import ConfigOpt, FailOnErrorOpt, OverridesArg, _load, console
from medsr_dist.storage import LeaseHeldError, Storage
from medsr_dist.uris import is_dicomweb

infer_app = typer.Typer()

LogKeysOpt = typer.Option(False, "--log-keys", help="Name input keys in logs and progress (enhance.log_keys); "
                          "default: items are named by item id, since keys often embed accession numbers or names")


@infer_app.command()
def enhance(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
            fail_on_error: bool = FailOnErrorOpt, log_keys: bool = LogKeysOpt) -> None:
    """Enhance every image under enhance.input with a trained model (Ray Data batch inference)."""
    from medsr_dist.enhance.job import ReplicasNotStartedError  # lazy: stage code, not loaded by --help
    from medsr_dist.pacs.dicomweb import PacsError  # lazy: stage code, not loaded by --help
    from medsr_dist.pipeline import run_enhance  # lazy: stage code, not loaded by --help

    cfg = _load(config, [*(overrides or []), *(["enhance.log_keys=true"] if log_keys else [])], "enhance")
    try:
        result = run_enhance(cfg, console)
    except LeaseHeldError as exc:  # another run is writing this output prefix: leave it alone
        console.print(f"[bold red]enhance:[/] {exc}", highlight=False)
        raise typer.Exit(3) from None
    except PacsError as exc:  # the PACS cannot be queried (down, credentials refused...): the run cannot start
        console.print(f"[bold red]enhance:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except ReplicasNotStartedError as exc:  # the cluster cannot hold enhance.min_replicas: nothing was read
        console.print(f"[bold red]enhance:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    if result.n_errors and (fail_on_error or cfg.enhance.fail_on_error):
        raise typer.Exit(1)


@infer_app.command()
def export(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = OverridesArg,
    fmt: str = typer.Option("onnx", "--format", "-f", help="Export format (onnx)"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Model to export (default: enhance.checkpoint)"),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="Where to write (default: enhance.onnx_model, else model.onnx beside the checkpoint)"),
    opset: int = typer.Option(17, "--opset", help="ONNX opset"),
    exporter: str = typer.Option("auto", "--exporter", help="torch exporter: auto, torchscript or dynamo"),
) -> None:
    """Export a model for the onnxruntime backend (dynamic batch/height/width), checked against torch (<= 1e-4)."""
    from medsr_dist.infer.export import export_model_file  # lazy: stage code, not loaded by --help
    from medsr_dist.infer.model_file import read_model_file  # lazy: stage code, not loaded by --help

    if fmt != "onnx":
        console.print(f"[bold red]error:[/] unknown format {fmt!r} (supported: onnx)", highlight=False)
        raise typer.Exit(2)
    cfg = _load(config, overrides)
    try:
        model = read_model_file(checkpoint or cfg.enhance.checkpoint, cfg.storage,
                                onnx_uri=None if checkpoint else cfg.enhance.onnx_model)
        result = export_model_file(model, Storage(cfg.storage), output, opset=opset, exporter=exporter)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"exported {model.name} (x{model.scale}, sha256 {model.sha256[:12]}…) with the {result.exporter} "
                  f"exporter: ONNX Runtime vs torch max abs difference {result.max_abs_diff:.2e} on a "
                  f"{'x'.join(map(str, result.check_shape))} batch", highlight=False)
    typer.echo(result.uri)


@infer_app.command()
def status(
    output: str = typer.Argument(..., help="Output prefix or DICOMweb endpoint of `medsr enhance` (enhance.output; "
                                 "a DICOMweb output's manifest is found at enhance.manifest of -c/overrides)"),
    overrides: Optional[list[str]] = OverridesArg,
    config: Optional[Path] = ConfigOpt,
    log_keys: bool = typer.Option(False, "--log-keys", help="Name input/output keys (default: item ids)"),
) -> None:
    """Summarise the manifests under an output prefix: outputs, ignored, quarantined, flagged, the latest run's
    counts and errors (items named by item id unless --log-keys)."""
    from medsr_dist.enhance.status import format_summary, manifest_summary  # lazy: stage code, not loaded by --help

    cfg = _load(config, overrides)
    try:
        same_run = is_dicomweb(output) or output.rstrip("/") == str(cfg.enhance.output).rstrip("/")
        summary = manifest_summary(Storage(cfg.storage), output, cfg.enhance.manifest if same_run else None,
                                   threshold_db=cfg.enhance.consistency_threshold_db,
                                   uncertainty_threshold=cfg.enhance.uncertainty_threshold)
    except ValueError as exc:  # a DICOMweb endpoint without enhance.manifest
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except FileNotFoundError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    typer.echo(format_summary(summary, log_keys=log_keys or cfg.enhance.log_keys))
