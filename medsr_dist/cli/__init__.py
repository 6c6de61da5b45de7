"""`medsr` command line: one command per stage, each taking ``--config`` plus ``key=value`` overrides.

The one place where the command groups are assembled into ``app`` (the ``medsr`` entry point, and what jobs/*.py
run). Commands of the apps added without a name become top-level commands; ``weights`` and ``mri`` are groups.

- ``stages``: config, prepare, train, degrade, demo (medsr_dist/cli/stages.py)
- ``infer``: enhance, export, status (medsr_dist/cli/infer.py)
- ``eval``: evaluation protocols (medsr_dist/cli/eval.py)
- ``serve``: the on-demand endpoint (medsr_dist/cli/serve.py)
- ``weights ...``: model zoo, ncnn import (medsr_dist/cli/weights.py)
- ``mri ...``: 3-D volumes (medsr_dist/cli/mri.py)

The config is loaded and validated (and local inputs checked) before Ray starts, so a typo costs
seconds, not a cluster start-up (medsr_dist/cli/common.py).
"""
from __future__ import annotations

import logging
import sys

import typer

from medsr_dist.cli.eval import eval_app
from medsr_dist.cli.infer import infer_app
from medsr_dist.cli.mri import mri_app
from medsr_dist.cli.serve import serve_app
from medsr_dist.cli.stages import stages_app
from medsr_dist.cli.weights import weights_app

app = typer.Typer(
    help="medsr-dist: distributed training and batch inference of medical image super-resolution on Ray.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
# The order here is the order of `medsr --help`: the top-level commands first, then the groups.
app.add_typer(stages_app)
app.add_typer(infer_app)
app.add_typer(eval_app)
app.add_typer(serve_app)
app.add_typer(weights_app, name="weights")
app.add_typer(mri_app, name="mri")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level")) -> None:
    _setup_logging(verbose)


def entrypoint() -> None:  # pragma: no cover - console script shim
    sys.exit(app())
