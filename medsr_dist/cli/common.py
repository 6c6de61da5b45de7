"""What every `medsr` command shares: the stderr console, the ``--config`` / ``key=value`` overrides /
``--fail-on-error`` parameters, and the one config loading step.

The config is loaded and validated (and local inputs checked) before Ray starts, so a typo costs
seconds, not a cluster start-up.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from medsr_dist.config import ConfigError, MedsrConfig, load_config

console = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML run config (configs/*.yaml); defaults when omitted")
OverridesArg = typer.Argument(None, help="Config overrides as key=value, e.g. train.iterations=10 model.scale=2")
FailOnErrorOpt = typer.Option(False, "--fail-on-error", help="Exit with status 1 when any input file could not be read")


def _load(config: Optional[Path], overrides: Optional[list[str]], stage: str | None = None) -> MedsrConfig:
    # lazy: preflight reads the backend registry and model files (torch); `medsr --help` stays free of them
    from medsr_dist.preflight import preflight

    try:
        return preflight(load_config(config, overrides or []), stage)
    except ConfigError as exc:
        console.print(f"[bold red]config error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None


def _fail(exc: Exception) -> None:
    """Print ``exc`` as the command's error and exit with status 1."""
    console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(1) from None
