"""Where Ray starts: the one place the driver connects to (or starts) a cluster."""
from __future__ import annotations

import logging
import os

from medsr_dist.config import MedsrConfig

log = logging.getLogger(__name__)


def init_ray(cfg: MedsrConfig):
    """Join ``ray.address`` (or ``RAY_ADDRESS``, as inside ``ray job submit``), else start a local instance."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        kwargs = {"address": address or "local", "ignore_reinit_error": True, "log_to_driver": True}
        if not address:  # a private local instance, never some other cluster that happens to run here
            kwargs.update(num_cpus=cfg.ray.num_cpus, include_dashboard=False)
        ray.init(**kwargs)
    configure_data_context(cfg, DataContext.get_current())
    return ray


def configure_data_context(cfg: MedsrConfig, ctx) -> None:
    """Ray Data settings of a run on ``ctx`` (a ``DataContext``): the driver's, or that of a process building
    datasets for it (the Ray Train controller rebuilding the training stream)."""
    ctx.enable_progress_bars = cfg.ray.progress
    ctx.print_on_execution_start = False


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
