"""`medsr serve`: the on-demand endpoint on a local Ray (or ``ray.address``) for a try; see medsr_dist/serve/.

    medsr serve -c configs/serve.yaml [key=value ...]     # prints the URL; Ctrl-C stops
    serve deploy configs/serve_app.yaml                   # on a cluster (import_path: medsr_dist.serve.app:app_builder)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medsr_dist.cli.common import ConfigOpt, OverridesArg, _load, console

serve_app = typer.Typer()


@serve_app.command()
def serve(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Serve the configured models over HTTP (POST /v1/enhance, GET /v1/models, /healthz, /docs) until Ctrl-C."""
    from medsr_dist.serve.app import run_local  # lazy: stage code, not loaded by --help

    cfg = _load(config, overrides)
    try:
        run_local(cfg, echo=lambda text: console.print(text, highlight=False))
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[bold red]serve error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
