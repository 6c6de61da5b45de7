"""Infrastructure sections: the run (name, root, seed), object storage and the Ray cluster."""
from __future__ import annotations

from pydantic import Field, PrivateAttr

from medsr_dist.config.base import Section


class RunConfig(Section):
    name: str = Field("medsr", description="Run name; used for the Ray Train run and output folders")
    root: str = Field("./demo-run", description="Store prefix under which stage outputs default")
    seed: int = Field(0, description="Seed for sampling, degradation and initialisation")


class StorageConfig(Section):
    """How to reach object storage. Credentials come from the standard AWS environment/config files."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://minio:9000")
    region: str | None = Field(None, description="AWS region name")
    anon: bool = Field(False, description="Anonymous access (public buckets)")
    profile: str | None = Field(None, description="AWS profile from ~/.aws/config")
    # Not a config key: the local prefixes a job confines its writes to ({prefix: the key naming it}), set by
    # medsr_dist.storage.Storage.confine_writes. A private attribute travels with the config when a Storage is
    # pickled into Ray tasks (whatever Storage subclass ships it), and never appears in a dump or a config file.
    _write_roots: dict[str, str] = PrivateAttr(default_factory=dict)


class RayConfig(Section):
    address: str | None = Field(
        None,
        description="Cluster to join ('auto' inside `ray job submit`); empty: RAY_ADDRESS, else a local instance",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local instance (default: all)")
    progress: bool = Field(True, description="Show Ray Data progress bars")
