"""Shared fixtures: a real moto S3 server on 127.0.0.1, one in-process Ray cluster per test session,
and temporary lakes parametrised over local and S3.

Fake AWS credentials are set before anything imports boto/pyarrow so nothing ever probes the cloud
metadata address.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

os.environ.update({
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
})
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("RAY_ADDRESS", None)

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.exists():
    SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """A file under ../shared; skips the calling test when absent (fresh clone of the project alone)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is optional)")
    return path


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a real moto S3 server on 127.0.0.1 (random free port), started and stopped here.

    Also exported as ``AWS_ENDPOINT_URL`` for code that reads it (Ray workers started afterwards inherit it).
    """
    from moto.server import ThreadedMotoServer

    from pipelines.cluster_local import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = url
    yield url
    os.environ.pop("AWS_ENDPOINT_URL", None)
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One in-process Ray cluster (2 CPUs, loopback) shared by every test of the session.

    Depends on ``s3_endpoint`` so workers inherit ``AWS_ENDPOINT_URL``.
    """
    from pipelines.ray_runtime import ensure_ray

    ray = ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def make_bucket(endpoint: str, name: str | None = None) -> str:
    import boto3

    name = name or f"lake-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def local_lake(tmp_path):
    from pipelines.storage import Lake

    lake = Lake(str(tmp_path / "lake"))
    lake.init()
    return lake


@pytest.fixture
def s3_lake(s3_endpoint):
    from pipelines.storage import Lake

    lake = Lake(f"s3://{make_bucket(s3_endpoint)}/lake", endpoint_url=s3_endpoint)
    lake.init()
    return lake


@pytest.fixture(params=["local", "s3"])
def lake(request, tmp_path):
    """A fresh, initialised lake, once on a local directory and once on the moto S3 server."""
    from pipelines.storage import Lake

    if request.param == "local":
        lake = Lake(str(tmp_path / "lake"))
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        lake = Lake(f"s3://{make_bucket(endpoint)}/lake", endpoint_url=endpoint)
    lake.init()
    return lake
