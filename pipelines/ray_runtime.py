"""Starting or joining Ray the same way from the CLI, jobs and tests.

``ensure_ray()`` joins the cluster given by ``--ray-address``/``RAY_ADDRESS`` (what ``ray job submit`` sets) or
starts an in-process local Ray (the embedded default), bound to 127.0.0.1, with the non-secret environment
variables that S3 access and Ray Train need forwarded to every worker.

Credentials never travel in the ``runtime_env``: Ray writes its ``env_vars`` in plain text to
``/tmp/ray/session_*/logs/runtime_env_agent.log`` (world-readable) and, on a cluster, to the job's metadata.
A local cluster's workers inherit the driver's environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
included) because its raylet is a child of this process; on a real cluster the nodes get credentials from
their instance role or from the environment ``ray start`` ran with (see docs/cluster.md).

A local cluster dies with its driver: Ray kills the processes the driver started itself (GCS, raylet) when it
dies, but the raylet's children (``DashboardAgent``, ``RuntimeEnvAgent``, workers still running a task) are
orphaned and live on for seconds to minutes. :func:`start_watchdog` starts, with the cluster, a small process
that waits for the driver to disappear (``SIGKILL`` included) and then stops every process of that cluster:
those whose environment carries the driver's :data:`OWNER_ENV` token (orphans name nothing on their command
line), their descendants as recorded every second while the driver lived (Ray's agents overwrite part of their
own environment with ``setproctitle``, which can hide the token), and those naming the session directory
(``cluster_local.stop_processes``). A driver that joins an existing
cluster (``RAY_ADDRESS``) starts none.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid

log = logging.getLogger(__name__)

#: Set in the environment a local cluster is started with, so that every process of it (and no other) inherits it.
OWNER_ENV = "CPLDM_RAY_OWNER"
#: Seconds between the watchdog's checks that its driver is alive.
WATCH_INTERVAL_S = 0.2
#: Seconds the watchdog gives the cluster's processes to exit on SIGTERM before SIGKILL.
WATCH_GRACE_S = 2.0
#: Seconds the watchdog keeps sweeping for processes of the cluster that started while it stopped the others.
WATCH_SWEEP_S = 20.0
#: Seconds it sweeps at least, even when it finds nothing: an agent started late by a dying raylet once
#: appeared after two empty passes (tests/test_security.py, on a loaded 2-core machine). (The DashboardAgent that
#: once outlived a whole sweep was not late: its environment hid the token; see :func:`cluster_tree`.)
WATCH_MIN_SWEEP_S = 5.0
#: What the watchdog did, pass by pass, in the session's log directory (for a cluster that outlived its driver).
WATCH_LOG = "cpldm_watchdog.log"
#: The watchdog of this process's local cluster (its stdin pipe carries the session directory).
_WATCHDOG: subprocess.Popen | None = None

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
        watchdog = start_watchdog()  # before ray.init: a driver killed while the cluster starts leaves nothing
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     object_store_memory=store, **kwargs)
        finally:
            os.environ.pop(OWNER_ENV, None)  # the cluster has it; later children of this process are not Ray's
        _tell_session(watchdog, ray)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet and os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0") != "1"
    ctx.print_on_execution_start = not quiet
    if quiet:
        quiet_ray_logs()  # importing ray.data configures its loggers again
    log.log(logging.DEBUG if quiet else logging.INFO, "ray: %s", ray.cluster_resources())
    return ray


# ---------------------------------------------------------------------------------------------- watchdog
def start_watchdog() -> subprocess.Popen | None:
    """Mark the environment with a fresh :data:`OWNER_ENV` token and start the watchdog of the local cluster
    about to be started (``python -m pipelines.ray_runtime --watch <driver pid> <token>``); ``None`` if it
    cannot start (the cluster then runs unwatched, as before)."""
    global _WATCHDOG
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    os.environ[OWNER_ENV] = token
    try:
        # its own session: a Ctrl-C to the driver's terminal group must not stop it before it has cleaned up
        argv = [sys.executable, "-m", "pipelines.ray_runtime", "--watch", str(os.getpid()), token]
        _WATCHDOG = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    except OSError as exc:
        log.warning("ray: no watchdog for the local cluster (%s): if this process is killed, Ray's agents "
                    "outlive it", exc)
        _WATCHDOG = None
    return _WATCHDOG


def _tell_session(watchdog: subprocess.Popen | None, ray) -> None:
    """Send the cluster's session directory to its watchdog (processes naming it are the cluster's too)."""
    if watchdog is None:
        return
    try:
        session = ray._private.worker._global_node.get_session_dir_path()
        watchdog.stdin.write(session + "\n")
        watchdog.stdin.flush()
    except (AttributeError, OSError) as exc:  # private API moved, or the watchdog died: the token still works
        log.debug("ray: session directory not sent to the watchdog: %s", exc)


def owned_processes(token: str) -> list[int]:
    """Pids (other than this one) whose environment holds ``OWNER_ENV=token``: every process of the cluster a
    driver started, also those orphaned when it died. Read from ``/proc`` (Linux); empty elsewhere."""
    needle = f"\0{OWNER_ENV}={token}\0".encode()
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in b"\0" + fh.read() + b"\0":
                    found.append(int(entry))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def _process_starts() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks since boot) of every live process (zombies left out), from
    /proc/<pid>/stat (the start time tells a process from a later one that reuses its pid). Empty without /proc."""
    table = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            if fields[0] not in (b"Z", b"X"):   # state (field 3): a zombie is gone for every purpose here
                table[int(entry)] = (int(fields[1]), int(fields[19]))   # ppid (field 4), starttime (field 22)
        except (OSError, IndexError, ValueError):   # gone meanwhile
            continue
    return table


def cluster_tree(token: str, table: dict[int, tuple[int, int]], driver_pid: int) -> dict[int, int]:
    """pid -> start time of the processes carrying the token (but the driver, which holds it until ``ray.init``
    returns) and all their descendants. The descendants count because a process may hide its environment: Ray's
    agents call ``setproctitle``, which overwrites the start of their ``/proc/<pid>/environ`` with the new title
    (the token was gone from an orphaned DashboardAgent's environment in about one killed-driver test in six,
    depending on where the raylet put it among the variables), but their parent, the raylet, carries it."""
    from pipelines.cluster_local import descendants

    roots = {pid for pid in owned_processes(token) if pid in table and pid != driver_pid}
    tree = descendants(roots, {pid: ppid for pid, (ppid, _) in table.items()}, {os.getpid()})
    return {pid: table[pid][1] for pid in tree}


def watch(driver_pid: int, token: str) -> int:
    """The watchdog's loop: while ``driver_pid`` (its parent) lives, read the session directory from stdin and,
    every second, record the cluster's processes (:func:`cluster_tree`); once it is gone, stop the cluster's
    processes: those recorded (if the same process still holds the pid), those carrying the token and those
    naming the session directory. Returns how many survived SIGKILL."""
    import select

    from pipelines.cluster_local import head_processes, stop_processes

    session, stdin_open = "", True
    known: dict[int, int] = {}
    next_record = 0.0
    while os.getppid() == driver_pid:  # a dead parent's children are re-parented: exact, immune to pid reuse
        if time.monotonic() >= next_record:
            known.update(cluster_tree(token, _process_starts(), driver_pid))
            next_record = time.monotonic() + 1.0
        if stdin_open and not session:
            if select.select([sys.stdin], [], [], WATCH_INTERVAL_S)[0]:
                line = sys.stdin.readline()
                session, stdin_open = line.strip(), bool(line)
        else:
            time.sleep(WATCH_INTERVAL_S)
    start = time.monotonic()
    empty_passes = 0
    log_path = os.path.join(session, "logs", WATCH_LOG) if session else None
    while True:
        # sweep until three passes a second apart find nothing (by token or by session directory), and for at
        # least WATCH_MIN_SWEEP_S: a raylet stopped after its agents may start a new agent in between
        elapsed = time.monotonic() - start
        try:
            table = _process_starts()
            recorded = {pid for pid, started in known.items() if table.get(pid, (0, None))[1] == started}
            found = sorted(set(cluster_tree(token, table, driver_pid)) | recorded
                           | set(head_processes(session) if session else ()))
            names = [_process_name(pid) for pid in found]
            left = stop_processes("", grace_s=WATCH_GRACE_S, extra=tuple(found))
            _watch_log(log_path, f"{elapsed:6.1f}s stopped {list(zip(found, names))}, {left} survived SIGKILL")
        except (OSError, subprocess.SubprocessError) as exc:  # one failed pass (ps under load) must not end the sweep
            found, left = [None], 0
            _watch_log(log_path, f"{elapsed:6.1f}s pass failed: {exc!r}")
        empty_passes = 0 if found else empty_passes + 1
        elapsed = time.monotonic() - start
        if (empty_passes >= 3 and elapsed >= WATCH_MIN_SWEEP_S) or elapsed > WATCH_SWEEP_S:
            return left
        time.sleep(1.0 if not found else WATCH_INTERVAL_S)


def _process_name(pid: int) -> str:
    """The first 40 characters of a process's command line ('' once it is gone): for the watchdog's log."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read(40).replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _watch_log(path: str | None, line: str) -> None:
    """Append one line to the watchdog's log (best effort: the session directory may be gone)."""
    if path is None:
        return
    try:
        with open(path, "a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {line}\n")
    except OSError:
        pass


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--watch":
        sys.exit(1 if watch(int(sys.argv[2]), sys.argv[3]) else 0)
    sys.exit("usage: python -m pipelines.ray_runtime --watch <driver pid> <token>")
