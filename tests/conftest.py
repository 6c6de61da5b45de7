"""Shared pytest fixtures for medsr-dist."""
from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest

from medsr_dist.config import StorageConfig
from medsr_dist.storage import Storage
from ray_cluster import free_port  # tests/ is on sys.path (no __init__.py: pytest's rootdir-style import)

# Prepared datasets group DICOM images by a pseudonym of their PatientID keyed with a site secret, and `prepare`
# refuses an archive with PatientIDs when none is set. The tests' secret, set here for the whole session (and so
# inherited by Ray heads, jobs and CLI subprocesses); tests of the no-secret case remove it themselves.
os.environ.setdefault("MEDSR_GROUP_SECRET", "medsr-dist test suite secret (not a real one)")


# ------------------------------------------------------------------------------------------------------
# S3: a real S3-compatible server (moto in server mode) on 127.0.0.1, reached over HTTP like any other
# endpoint. Nothing is patched: code under test talks to it through s3fs/botocore, and so do Ray workers.
# ------------------------------------------------------------------------------------------------------

# Dummy credentials and region for the test server. They go into os.environ for the whole session so that
# child processes (a Ray head and its workers started after this fixture) inherit them; shared AWS config
# files are pointed away so a developer's real profile can never be used by a test.
_S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "medsr-test",
    "AWS_SECRET_ACCESS_KEY": "medsr-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL (``http://127.0.0.1:<port>``) of a local S3 server running for the whole session.

    Request it *before* starting any Ray cluster in a test, so Ray processes inherit the credentials.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name, value in _S3_TEST_ENV.items():
            env.setenv(name, value)
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
        env.setenv("NO_PROXY", no_proxy)
        env.setenv("no_proxy", no_proxy)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(scope="session")
def _s3_admin(s3_server: str):
    """A boto3 client for setting up and tearing down test buckets (built once: it takes ~0.3 s)."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_server)


@pytest.fixture
def s3_bucket(_s3_admin) -> Iterator[str]:
    """A fresh, empty bucket for this test, as ``s3://<bucket>``; emptied and removed afterwards."""
    client = _s3_admin
    bucket = f"medsr-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=item["Key"])
    client.delete_bucket(Bucket=bucket)


@pytest.fixture
def storage_s3(s3_server: str) -> Storage:
    """A Storage configured for the local S3 server (credentials come from the environment)."""
    return Storage(StorageConfig(endpoint_url=s3_server))


# ------------------------------------------------------------------------------------------------------
# PACS: a real Orthanc with its DICOMweb plugin on 127.0.0.1 (tests/orthanc.py), credentials enabled.
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def orthanc_server():
    """One Orthanc for the session (fails under CI when it is not installed, skips elsewhere)."""
    from orthanc import local_orthanc, require_orthanc

    require_orthanc()
    with local_orthanc() as server:
        yield server


@pytest.fixture
def orthanc(orthanc_server):
    """The session's Orthanc, running (a test may have stopped it) and empty."""
    orthanc_server.start()
    orthanc_server.clear()
    return orthanc_server


# ------------------------------------------------------------------------------------------------------
# Inference: a tiny trained-model export (model.pth + meta.json), as `medsr train` writes it.
# ------------------------------------------------------------------------------------------------------

TINY_RRDBNET = {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}


TINY_MSRRESNET = {"num_feat": 8, "num_block": 1}


def write_tiny_model(write, scale: int = 4, seed: int = 0, name: str = "tiny-test@1",
                     generator: str = "RRDBNet") -> bytes:
    """Write a seeded tiny RRDBNet (num_feat 8, num_block 1, num_grow_ch 4) export through ``write(name, data)``:
    ``model.pth`` (BasicSR layout: params + params_ema) and ``meta.json`` (family, scale, generator, sha256, name),
    exactly the files of ``<train.output>/export/``. The last layer is biased towards mid-grey so outputs are not
    clamped to black. ``generator="MSRResNet"``: a tiny MSRResNet (num_feat 8, num_block 1; psnr family) instead,
    its last layer seeded small, so that at scale 1 (MRI's through-plane refiner) it is near the identity.
    Returns the model.pth bytes."""
    import hashlib
    import json

    import torch

    import medsr_dist.compat  # noqa: F401  (must precede basicsr)
    from basicsr.archs.rrdbnet_arch import RRDBNet
    from medsr_dist.models.archs import generator_from
    from medsr_dist.models.weights import save_basicsr_checkpoint

    torch.manual_seed(seed)
    if generator == "MSRResNet":
        fields = {"type": "MSRResNet", "num_in_ch": 3, "num_out_ch": 3, **TINY_MSRRESNET}
        net = generator_from(fields, scale)
        with torch.no_grad():
            net.conv_last.weight.normal_(0, 0.01)
        family = "psnr"
    else:
        fields = {"type": "RRDBNet", "num_in_ch": 3, "num_out_ch": 3, **TINY_RRDBNET}
        net = RRDBNet(num_in_ch=3, num_out_ch=3, scale=scale, **TINY_RRDBNET)
        with torch.no_grad():
            net.conv_last.bias.fill_(0.5)
        family = "realesrgan"
    data = save_basicsr_checkpoint(net, "", ema=net)
    meta = {"family": family, "scale": scale, "generator": fields, "iteration": 1, "run": "tiny-test", "name": name,
            "sha256": hashlib.sha256(data).hexdigest()}
    write("model.pth", data)
    write("meta.json", json.dumps(meta, indent=2).encode())
    return data


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A local folder holding a tiny x4 model export (model.pth + meta.json); use ``<dir>/model.pth``."""
    root = tmp_path_factory.mktemp("tiny-model")
    write_tiny_model(lambda name, data: (root / name).write_bytes(data))
    return str(root)
