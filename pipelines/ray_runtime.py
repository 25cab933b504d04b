"""Starting or joining Ray the same way from the CLI, jobs and tests.

``ensure_ray()`` joins the cluster given by ``--ray-address``/``RAY_ADDRESS`` (what ``ray job submit`` sets) or
starts an in-process local Ray (the embedded default), bound to 127.0.0.1, with the non-secret environment
variables that S3 access and Ray Train need forwarded to every worker.

Credentials never travel in the ``runtime_env``: Ray writes its ``env_vars`` in plain text to
``/tmp/ray/session_*/logs/runtime_env_agent.log`` (world-readable) and, on a cluster, to the job's metadata.
A local cluster's workers inherit the driver's environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
included) because its raylet is a child of this process; on a real cluster the nodes get credentials from
their instance role or from the environment ``ray start`` ran with (see docs/cluster.md).
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: Variables forwarded to Ray workers: S3 endpoint and region, Ray Train's report interval. Never a secret.
FORWARDED_ENV = (
    "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_EC2_METADATA_DISABLED", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
)

#: Defaults that keep a local cluster on loopback and Ray Train responsive (see docs/ENVIRONMENT notes).
LOCAL_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "AWS_EC2_METADATA_DISABLED": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0"),
}


#: Ray loggers turned down unless ``--verbose``: the token-auth notice of a local cluster, Ray Data's execution plans
#: and per-dataset lines, and its deprecation notes (``concurrency=``), none of which the user can act on.
QUIET_LOGGERS = {"ray._private.authentication.authentication_token_setup": logging.ERROR,
                 "ray.data": logging.WARNING, "ray.data._internal.util": logging.ERROR,
                 "ray.data._internal.progress": logging.ERROR}


def quiet_ray_logs() -> None:
    """Turn Ray's own notices down (call before ``ray.init``; ``cpldm --verbose`` skips this)."""
    # the driver's C++ core worker logs "actor ... has constructor arguments in the object store" as an error
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def ensure_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool | None = None):
    """Initialise Ray once per process and return the ``ray`` module.

    Args:
        address: cluster address (``auto``, ``ray://...``, ``127.0.0.1:6379``); ``None`` uses
            ``$RAY_ADDRESS`` when set, else starts an in-process local cluster.
        num_cpus: CPUs for a local cluster (default: all cores).
        quiet: hide Ray's notices, progress output and worker logs (default: unless ``cpldm --verbose``).
    """
    import ray

    if ray.is_initialized():
        return ray
    if quiet is None:
        from pipelines.progress import verbose
        quiet = not verbose()
    if quiet:
        quiet_ray_logs()
    for key, value in LOCAL_DEFAULTS.items():
        os.environ.setdefault(key, value)
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(runtime_env={"env_vars": env_vars}, logging_level=logging.WARNING if quiet else logging.INFO,
                  log_to_driver=not quiet, configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # a bounded object store keeps several local clusters (tests, demo) within a laptop's shared memory
        store = int(float(os.environ.get("CPLDM_OBJECT_STORE_BYTES", 1.5e9)))
        # address="local": always start a private cluster, never attach to another `ray start` on the machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 object_store_memory=store, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet and os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0") != "1"
    ctx.print_on_execution_start = not quiet
    if quiet:
        quiet_ray_logs()  # importing ray.data configures its loggers again
    log.log(logging.DEBUG if quiet else logging.INFO, "ray: %s", ray.cluster_resources())
    return ray
