"""``cpldm cluster up-local | down-local | status-local``: a Ray head on 127.0.0.1 for ``ray job submit``.

The laptop twin of a cloud cluster: stages are submitted as jobs exactly as on AWS/Kubernetes
(``ray job submit --address http://127.0.0.1:<dashboard port> --working-dir . -- cpldm ...``).

The head gets its own ``--temp-dir`` (default ``/tmp/cpldm-ray-<port>``) and every port explicitly, and is
stopped by *its own* identity: the processes whose command line names that temp dir (GCS, raylet,
dashboard, monitors) and their descendants. Never ``ray stop``, which kills every Ray process on the machine.
State (addresses, ports, temp dir) is kept in ``<temp_dir>/cpldm-head.json``.

Token authentication follows ``RAY_AUTH_MODE`` (default ``token``: Ray writes ``~/.ray/auth_token`` and
``ray job submit`` reads it). Tests set ``RAY_AUTH_MODE=disabled`` for both ``ray start`` and
``ray job submit``.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cpldm_core.errors import UserError
from pipelines.storage import pid_alive

log = logging.getLogger(__name__)

STATE_FILE = "cpldm-head.json"
DEFAULT_PORT = 6379            # Ray's default GCS port
DEFAULT_DASHBOARD_PORT = 8265  # Ray's default dashboard / job-server port

#: Environment for the head: loopback only (without this Ray replaces 127.0.0.1 by the network address),
#: no usage reporting, token auth unless the caller chose otherwise.
HEAD_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass(frozen=True)
class LocalHead:
    """A running (or recorded) local head."""

    address: str          # GCS address for RAY_ADDRESS / ray.init: 127.0.0.1:<port>
    dashboard_url: str    # job server for `ray job submit --address`
    temp_dir: str
    port: int
    dashboard_port: int
    client_port: int
    num_cpus: int | None
    auth_mode: str

    def env(self) -> dict[str, str]:
        """Variables a client needs to submit to this head (merge into ``os.environ``)."""
        return {"RAY_ADDRESS": self.dashboard_url, "RAY_AUTH_MODE": self.auth_mode,
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def free_ports(count: int, avoid: tuple[int, ...] = ()) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (ephemeral range, away from Ray's worker ports 10002-19999).

    All sockets stay bound until every port is chosen: asking one at a time lets the kernel hand back the
    same just-released port twice (CI once started a head whose GCS and dashboard got the same port).
    Ports in ``avoid`` (already promised to the caller's other components) are never returned.
    """
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in avoid and port not in ports:
                ports.append(port)
        return ports
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """One free TCP port on 127.0.0.1 (see :func:`free_ports` when a caller needs several)."""
    return free_ports(1)[0]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def default_temp_dir(port: int) -> str:
    # short: Ray's unix sockets live below it and socket paths are limited to ~107 bytes
    return f"/tmp/cpldm-ray-{port}"


def ray_executable() -> str:
    """The ``ray`` CLI of this interpreter's environment (not whatever is first on PATH)."""
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


def up_local(port: int = DEFAULT_PORT, dashboard_port: int = DEFAULT_DASHBOARD_PORT, temp_dir: str | None = None,
             num_cpus: int | None = None, client_port: int | None = None, timeout_s: float = 180.0,
             object_store_bytes: int | None = None) -> LocalHead:
    """Start a Ray head on 127.0.0.1 with its own temp dir and explicit ports; return its description.

    Raises :class:`UserError` when a port is taken or ``ray start`` fails (its output is in the message).
    """
    temp_dir = str(Path(temp_dir or default_temp_dir(port)).resolve())
    if len(temp_dir) > 60:
        raise UserError(f"--temp-dir {temp_dir} is too long: Ray's socket paths below it must stay under "
                        "107 bytes; use a short path such as /tmp/cpldm-ray")
    for name, p in (("--port", port), ("--dashboard-port", dashboard_port)):
        if _port_open(p):
            raise UserError(f"{name} {p} is already in use on 127.0.0.1 (another Ray head?); pick another port")
    if port == dashboard_port:
        raise UserError(f"--port and --dashboard-port are both {port}; give the head two different ports")
    client_port_free, agent_port = free_ports(2, avoid=(port, dashboard_port, client_port or 0))
    client_port = client_port or client_port_free
    auth_mode = os.environ.get("RAY_AUTH_MODE", "token")
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    cmd = [ray_executable(), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--include-dashboard", "true",
           "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent_port),
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    if object_store_bytes:
        cmd += ["--object-store-memory", str(int(object_store_bytes))]
    env = {**os.environ, **HEAD_ENV, "RAY_AUTH_MODE": auth_mode}
    env.pop("RAY_ADDRESS", None)  # `ray start --head` must not join another cluster
    # jobs run `cpldm ...` as a shell command: find it (and python) in this environment first
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    log.info("starting local Ray head: %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    head = LocalHead(address=f"127.0.0.1:{port}", dashboard_url=f"http://127.0.0.1:{dashboard_port}",
                     temp_dir=temp_dir, port=port, dashboard_port=dashboard_port, client_port=client_port,
                     num_cpus=num_cpus, auth_mode=auth_mode)
    if proc.returncode != 0:
        stop_processes(temp_dir)  # whatever half-started
        raise UserError(f"ray start failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    (Path(temp_dir) / STATE_FILE).write_text(json.dumps(asdict(head), indent=2))
    try:
        wait_for_job_server(head, timeout_s=timeout_s)
        wait_for_job_agent(head, agent_port, timeout_s=timeout_s)
    except UserError:
        stop_processes(temp_dir)   # a head that cannot take jobs is of no use: do not leave it running
        raise
    return head


def wait_for_job_agent(head: LocalHead, agent_port: int, timeout_s: float = 120.0) -> None:
    """Block until the head node's dashboard agent listens on ``agent_port``. The job server hands every
    submission to that agent and gives up after 10 s without one ("No available agent to submit job"): on a
    busy machine the agent can start later than that after the job server answers (seen in a test run). The agent
    registers itself with the GCS right after its HTTP server is up, which is what this waits for."""
    _wait_until(lambda: _port_open(agent_port), timeout_s,
                f"the head's dashboard agent (port {agent_port}) did not start within {timeout_s:.0f} s; jobs cannot "
                f"be submitted; logs: {head.temp_dir}/session_latest/logs/dashboard_agent.log")


def wait_for_job_server(head: LocalHead, timeout_s: float = 120.0) -> None:
    """Block until the dashboard's job API answers (it starts a little after ``ray start`` returns)."""
    _wait_until(lambda: _job_server_answers(head.dashboard_url), timeout_s,
                f"the job server at {head.dashboard_url} did not answer within {timeout_s:.0f} s; "
                f"logs: {head.temp_dir}/session_latest/logs")


def _job_server_answers(dashboard_url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{dashboard_url}/api/version", timeout=5) as resp:
            return resp.status == 200
    except urllib.error.HTTPError as exc:
        return exc.code in (401, 403)  # up, and insisting on the token: good enough
    except (urllib.error.URLError, OSError):
        return False


def _wait_until(ready, timeout_s: float, failure: str) -> None:
    """Poll ``ready()`` every 0.5 s until it is true; UserError(``failure``) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise UserError(failure)
        time.sleep(0.5)


def read_head(temp_dir: str) -> LocalHead:
    state = Path(temp_dir) / STATE_FILE
    if not state.exists():
        raise UserError(f"no local head recorded in {temp_dir} ({STATE_FILE} missing); was it started with "
                        "`cpldm cluster up-local`?")
    return LocalHead(**json.loads(state.read_text()))


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process (``ps`` works on Linux and macOS)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            table[int(parts[0])] = (int(parts[1]), parts[2] if len(parts) > 2 else "")
    return table


def head_processes(temp_dir: str) -> list[int]:
    """Pids of the head started with ``temp_dir``: processes naming it, plus all their descendants."""
    table = _process_table()
    me = os.getpid()
    ancestors, p = set(), me
    while p in table and p not in ancestors:  # never ourselves or our callers (their args may name the dir)
        ancestors.add(p)
        p = table[p][0]
    roots = {pid for pid, (_, args) in table.items() if temp_dir in args and pid not in ancestors}
    return sorted(descendants(roots, {pid: ppid for pid, (ppid, _) in table.items()}, ancestors))


def descendants(roots: set[int], parent_of: dict[int, int], exclude: set[int] = frozenset()) -> set[int]:
    """``roots`` and every process below them (``parent_of``: pid -> parent pid), never adding an ``exclude`` pid."""
    found, changed = set(roots), True
    while changed:
        changed = False
        for pid, ppid in parent_of.items():
            if ppid in found and pid not in found and pid not in exclude:
                found.add(pid)
                changed = True
    return found


def stop_processes(temp_dir: str, grace_s: float = 10.0, extra: tuple[int, ...] = ()) -> int:
    """SIGTERM the head's processes (those of ``temp_dir``, if given, and the ``extra`` pids), SIGKILL what is left
    after ``grace_s``; returns how many survived."""
    pids = sorted(set(head_processes(temp_dir) if temp_dir else ()) | set(extra))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.2)
        pids = [p for p in pids if pid_alive(p)]
        if not pids:
            break
    return len(pids)


def down_local(temp_dir: str) -> dict:
    """Stop the head recorded in ``temp_dir`` (by its own processes); the temp dir's logs are kept."""
    head = read_head(temp_dir)
    n = len(head_processes(head.temp_dir))
    left = stop_processes(head.temp_dir)
    if left:
        raise UserError(f"{left} process(es) of the head in {temp_dir} survived SIGKILL")
    (Path(temp_dir) / STATE_FILE).unlink(missing_ok=True)
    return {"stopped": head.address, "processes": n}


def status_local(temp_dir: str) -> dict:
    head = read_head(temp_dir)
    return {**asdict(head), "processes": len(head_processes(head.temp_dir)), "gcs_up": _port_open(head.port),
            "job_server_up": _port_open(head.dashboard_port)}


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("cluster", help="local Ray head for `ray job submit` (up-local/down-local)",
                              description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cluster_command", metavar="<action>", required=True)
    up = sub.add_parser("up-local", help="start a Ray head on 127.0.0.1 with its own temp dir")
    down = sub.add_parser("down-local", help="stop that head (only it; never `ray stop`)")
    status = sub.add_parser("status-local", help="show that head's addresses and whether it is up")
    for q in (up, down, status):
        q.add_argument("--port", type=int, default=DEFAULT_PORT, help="GCS port (default 6379)")
        q.add_argument("--temp-dir", default=None, help="Ray temp dir (default /tmp/cpldm-ray-<port>)")
    up.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                    help="dashboard / job server port (default 8265)")
    up.add_argument("--num-cpus", type=int, default=None, help="CPUs the head offers (default: all)")
    up.set_defaults(func=_cli_up)
    down.set_defaults(func=_cli_down)
    status.set_defaults(func=_cli_status)


def _temp(args) -> str:
    return args.temp_dir or default_temp_dir(args.port)


def _cli_up(args) -> int:
    head = up_local(port=args.port, dashboard_port=args.dashboard_port, temp_dir=_temp(args),
                    num_cpus=args.num_cpus)
    print(json.dumps(asdict(head), indent=2))
    print(f"\nsubmit stages with:\n  ray job submit --address {head.dashboard_url} --working-dir . -- "
          f"cpldm --lake <URI> <stage> ...\nstop with:\n  cpldm cluster down-local --port {head.port}"
          + (f" --temp-dir {head.temp_dir}" if args.temp_dir else ""))
    return 0


def _cli_down(args) -> int:
    print(json.dumps(down_local(_temp(args))))
    return 0


def _cli_status(args) -> int:
    info = status_local(_temp(args))
    print(json.dumps(info, indent=2))
    return 0 if info["gcs_up"] else 1
