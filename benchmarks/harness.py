"""Benchmark harness: discover ``benchmarks/bench_*.py``, run each in its own process, record figures.

A benchmark module exposes ``run(quick: bool, **options) -> list[dict]``; each dict is one figure with keys
``benchmark, metric, value, unit, peak_mem_mb, notes`` and optionally ``device`` (``"cpu"``, ``"cuda"``,
``"cuda:0"``...; default ``"cpu"``), ``cost_stage`` (ingest|train|generate|profile: this throughput feeds
``cpldm cost``) and ``cost_per`` (instance|gpu|vcpu: what the figure is per).

Each module runs in a fresh subprocess (``python -m benchmarks.harness --child NAME``) so that

* its peak resident memory is its own (``resource.getrusage`` high-water mark of that process),
* a crash, an exception or a timeout fails that benchmark only; the failure is recorded in RESULTS.md.

Rows are written to ``benchmarks/results/<name>.parquet`` (one file per module, replaced by every run of that
module) and ``benchmarks/RESULTS.md`` is rebuilt from every Parquet file present, so ``--only`` updates one
section and keeps the others (each section names its own machine and date).

GPU figures: a row whose device is CUDA gets the GPU's name in ``device``; a row whose unit is ``FLOP/s`` on a
CUDA device gets a companion row "<metric> fraction of peak bf16" (unit ``fraction``) using
:data:`PEAK_BF16_DENSE_TFLOPS` (dense, no sparsity, from the vendor datasheets).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
#: Scratch space for generated data and logs (git-ignored); override with $CPLDM_BENCH_WORK.
WORK_DIR = Path(os.environ.get("CPLDM_BENCH_WORK", BENCH_DIR / "_work"))

REQUIRED_KEYS = ("benchmark", "metric", "value", "unit", "peak_mem_mb", "notes")
COST_STAGES = ("ingest", "train", "generate", "profile")
COST_PER = ("instance", "gpu", "vcpu")
#: Section order in RESULTS.md (pipeline order); other modules follow alphabetically.
STAGE_ORDER = ("simulate", "ingest", "embed", "train", "generate", "profile", "evaluate", "duckdb")

#: Peak dense bf16 tensor throughput, TFLOP/s, from NVIDIA datasheets (H100 SXM5 / H200 SXM: 989.4;
#: H100 PCIe: 756; A100 SXM/PCIe: 312; L40S: 362.05; L4: 121). (regex on the CUDA device name, label, TFLOP/s);
#: first match wins, so the PCIe H100 is listed before the generic H100.
PEAK_BF16_DENSE_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"H100.*PCIe", "H100 PCIe", 756.0),
    (r"H100", "H100 SXM", 989.4),
    (r"H200", "H200", 989.4),
    (r"A100", "A100", 312.0),
    (r"L40S", "L40S", 362.05),
    (r"\bL4\b", "L4", 121.0),
)

COLUMNS = (  # column order of the Parquet files
    "stage", "benchmark", "metric", "value", "unit", "peak_mem_mb", "notes", "device",
    "fraction_of_peak_bf16", "cost_stage", "cost_per", "status", "quick", "run_date", "machine",
    "cpu_count", "gpu", "wall_s", "process_peak_rss_mb", "load_avg",
)


# ---------------------------------------------------------------- machine and device description
def describe_machine(probe_gpu: bool = True) -> dict:
    """CPU model, usable cores, RAM (GiB), GPU(s) (name x count, or "none"), OS, Python, UTC date."""
    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    ram_gib = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    gpus = _gpu_names() if probe_gpu else []
    gpu = "none" if not gpus else f"{gpus[0]} x{len(gpus)}"
    return {
        "cpu_model": cpu_model, "cpu_count": cores, "ram_gib": round(ram_gib, 1), "gpu": gpu,
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_avg": _load_avg(),
    }


def _load_avg() -> str:
    """1/5/15-minute load averages: on a shared machine, timings above ~cores are contended."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return ""


def machine_summary(m: dict) -> str:
    """One line naming the machine, e.g. 'AMD EPYC, 2 cores, 23.4 GiB RAM, GPU: none'."""
    return f"{m['cpu_model']}, {m['cpu_count']} cores, {m['ram_gib']} GiB RAM, GPU: {m['gpu']}"


def _gpu_names() -> list[str]:
    """CUDA device names: nvidia-smi when present (cheap), else torch when already importable."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
            if out.returncode == 0 and names:
                return names
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        import torch  # noqa: PLC0415  (only to ask about CUDA)
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def device_label(device: str = "cpu") -> str:
    """Label for a row's ``device``: "cpu", or "cuda:0 (NVIDIA H100 80GB HBM3)" for a CUDA device.

    Benchmark modules may call it themselves; the harness applies it to every row that names a CUDA device
    without its GPU name.
    """
    device = str(device or "cpu")
    if not device.startswith("cuda") or "(" in device:
        return device
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    try:
        import torch  # noqa: PLC0415
        name = torch.cuda.get_device_name(index) if torch.cuda.is_available() else "CUDA unavailable"
    except ImportError:
        name = "torch missing"
    return f"cuda:{index} ({name})"


def peak_bf16_flops(gpu_name: str) -> float | None:
    """Dense bf16 peak of a GPU in FLOP/s from :data:`PEAK_BF16_DENSE_TFLOPS`, or None when not listed."""
    for pattern, _label, tflops in PEAK_BF16_DENSE_TFLOPS:
        if re.search(pattern, gpu_name):
            return tflops * 1e12
    return None


def vm_hwm_mb(pid: int | str = "self") -> float | None:
    """High-water resident memory of process ``pid`` (MiB): ``VmHWM`` from /proc/<pid>/status; None without
    /proc or once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def process_cpu_s(pid: int | str = "self") -> float | None:
    """CPU seconds (user + system) process ``pid`` has used so far, from /proc/<pid>/stat; None without /proc
    or once the process is gone. Ray workers are not the driver's children: count them with
    :func:`machine_busy_cpu_s`."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime, stime (fields 14, 15)
    except (OSError, IndexError, ValueError):
        return None


def machine_busy_cpu_s() -> float | None:
    """CPU seconds all cores of this machine have spent busy since boot (/proc/stat: user, nice, system, irq,
    softirq, steal); the difference over a run, divided by cores x wall seconds, is the machine's utilisation."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def rss_of_env_mb(name: str, value: str) -> float:
    """Summed resident memory (MiB, ``VmRSS``) of every process whose environment holds ``name=value``: a
    driver and all the Ray processes of the cluster it started (they inherit its environment, also when the
    command line names nothing), when ``value`` is unique to that run. Shared pages (Ray's object store) count
    once per process that maps them, so this bounds the run's memory from above. 0.0 without /proc."""
    needle = f"\0{name}={value}\0".encode()
    total = 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle not in b"\0" + fh.read() + b"\0":
                    continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):   # gone meanwhile, or another user's
            continue
    return total / 1024


def peak_rss_mb(include_children: bool = True) -> float:
    """High-water resident memory of this process (and of its waited-for children), MiB.

    Linux: ``VmHWM`` from /proc/self/status, which restarts at exec; ``ru_maxrss`` does not (it keeps the
    forking parent's size across exec), so it would floor a small child at its parent's RSS. Children: the
    ``RUSAGE_CHILDREN`` high-water mark (largest waited-for descendant).
    """
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2 ** 20  # ru_maxrss: KiB on Linux, bytes on macOS
    own = vm_hwm_mb("self")
    if own is None:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    if not include_children:
        return own
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall clock, perf_counter)."""

    def __enter__(self) -> "Timer":
        self._start = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start


def result_row(benchmark: str, metric: str, value: float, unit: str, notes: str = "", **extra) -> dict:
    """One benchmark row as :func:`normalise_rows` wants it, with this process's peak RSS (MiB, children
    excluded) at the time the figure is recorded; ``extra``: optional columns (``cost_stage``, ``device``...)."""
    return {"benchmark": benchmark, "metric": metric, "value": float(value), "unit": unit,
            "peak_mem_mb": round(peak_rss_mb(include_children=False), 1), "notes": notes, **extra}


def work_dir(name: str) -> Path:
    """A scratch directory for benchmark ``name`` (git-ignored), created on demand."""
    path = WORK_DIR / name
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- rows
def normalise_rows(rows: Any, stage: str) -> list[dict]:
    """Validate a module's rows and add harness columns; raises ValueError naming the bad row and key.

    Every figure must be a finite positive number with a non-empty unit (throughputs, ratios, seconds and
    memory are all positive), so a zero or NaN is a bug in the benchmark, not a result.
    """
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"bench_{stage}.run() must return a non-empty list of dicts, got {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"bench_{stage}: row {i} is not a dict: {row!r}")
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"bench_{stage}: row {i} ({row.get('metric')!r}) lacks {', '.join(missing)}")
        value = float(row["value"])
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"bench_{stage}: row {i} ({row['benchmark']}/{row['metric']}) value {value!r} "
                             "is not a finite positive number")
        if not str(row["unit"]).strip():
            raise ValueError(f"bench_{stage}: row {i} ({row['benchmark']}/{row['metric']}) has no unit")
        cost_stage = str(row.get("cost_stage") or "")
        if cost_stage and cost_stage not in COST_STAGES:
            raise ValueError(f"bench_{stage}: row {i}: cost_stage {cost_stage!r} not in {COST_STAGES}")
        cost_per = str(row.get("cost_per") or "")
        if cost_per and cost_per not in COST_PER:
            raise ValueError(f"bench_{stage}: row {i}: cost_per {cost_per!r} not in {COST_PER}")
        peak = row["peak_mem_mb"]
        device = device_label(row.get("device") or "cpu")
        out.append({
            "stage": stage, "benchmark": str(row["benchmark"]), "metric": str(row["metric"]), "value": value,
            "unit": str(row["unit"]), "peak_mem_mb": float(peak) if peak is not None else float("nan"),
            "notes": str(row["notes"] or ""), "device": device, "fraction_of_peak_bf16": float("nan"),
            "cost_stage": cost_stage, "cost_per": cost_per, "status": "ok",
        })
        flops = _as_flops(value, str(row["unit"]))
        if flops is not None and device.startswith("cuda"):
            peak_flops = peak_bf16_flops(device)
            if peak_flops is not None:
                out[-1]["fraction_of_peak_bf16"] = flops / peak_flops
                out.append({**out[-1], "metric": f"{row['metric']} fraction of peak bf16",
                            "value": flops / peak_flops, "unit": "fraction", "cost_stage": "", "cost_per": "",
                            "notes": f"{flops / 1e12:.1f} TFLOP/s / {peak_flops / 1e12:.1f} dense bf16 peak"})
    return out


def _as_flops(value: float, unit: str) -> float | None:
    scale = {"FLOP/s": 1.0, "GFLOP/s": 1e9, "TFLOP/s": 1e12}.get(unit.strip())
    return None if scale is None else value * scale


# ---------------------------------------------------------------- running
#: Modules run only when named (``--only scale``): their full size takes hours on 2 cores.
OPT_IN = ("scale", "scale_profile")


def discover(bench_dir: Path = BENCH_DIR) -> list[str]:
    """Names of the benchmark modules present: ``bench_<name>.py`` -> ``<name>``, in RESULTS.md order."""
    names = [p.stem[len("bench_"):] for p in bench_dir.glob("bench_*.py")]
    return sorted(names, key=_stage_sort_key)


def _stage_sort_key(name: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER), name)


def _child(name: str, quick: bool, options: dict, out_path: Path, package: str = "benchmarks") -> int:
    """Body of the benchmark subprocess: import, run, validate, and write a JSON outcome."""
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"{package}.bench_{name}")
        rows = module.run(quick, **options) if options else module.run(quick)
        rows = normalise_rows(rows, name)
        process_peak = peak_rss_mb()
        for row in rows:  # a figure without its own peak gets the (upper-bound) process high-water mark
            if math.isnan(row["peak_mem_mb"]):
                row["peak_mem_mb"] = process_peak
                row["notes"] = f"{row['notes']} (peak_mem_mb = process peak RSS)".strip()
        outcome = {"status": "ok", "rows": rows}
    except BaseException as exc:  # noqa: BLE001  (recorded, not swallowed: the parent marks the failure)
        outcome = {"status": "failed", "error": "".join(traceback.format_exception(exc))[-4000:], "rows": []}
    outcome["wall_s"] = time.perf_counter() - start
    outcome["process_peak_rss_mb"] = peak_rss_mb()
    outcome["load_avg"] = _load_avg()
    out_path.write_text(json.dumps(outcome, default=str))
    return 0 if outcome["status"] == "ok" else 1


def run_one(name: str, quick: bool, *, options: dict | None = None, timeout_s: float | None = None,
            log_dir: Path | None = None, package: str = "benchmarks", pythonpath: Iterable[str] = ()) -> dict:
    """Run benchmark ``name`` in a subprocess. Returns ``{"status", "rows", "error", "wall_s",
    "process_peak_rss_mb"}``; status is ok, failed or timeout. Output goes to ``<log_dir>/<name>.log``.
    ``package``/``pythonpath`` locate the module (``<package>.bench_<name>``) for modules outside this repo."""
    log_dir = log_dir or (WORK_DIR / "logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path = log_dir / f"{name}.outcome.json"
    out_path.unlink(missing_ok=True)
    log_path = log_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "benchmarks.harness", "--child", name, "--out", str(out_path),
           "--options", json.dumps(options or {}), "--package", package] + (["--quick"] if quick else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [*pythonpath, str(REPO_ROOT),
                                                                      os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the benchmark's own process group (it may have started workers)
            proc.wait()
            return {"status": "timeout", "rows": [], "wall_s": time.perf_counter() - start,
                    "process_peak_rss_mb": float("nan"),
                    "error": f"killed after {timeout_s:.0f} s (timeout)\n" + _tail(log_path)}
    if out_path.exists():
        outcome = json.loads(out_path.read_text())
        if outcome["status"] != "ok":
            outcome["error"] = outcome.get("error", "") + "\n--- log tail ---\n" + _tail(log_path, 15)
        return outcome
    return {"status": "failed", "rows": [], "wall_s": time.perf_counter() - start,
            "process_peak_rss_mb": float("nan"),
            "error": f"process exited with code {rc} without an outcome (killed? out of memory?)\n"
                     + _tail(log_path)}


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def outcome_table(name: str, outcome: dict, quick: bool, machine: dict):
    """Arrow table of one module's outcome (a single status row when it failed)."""
    import pyarrow as pa  # noqa: PLC0415

    rows = outcome["rows"] or [{
        "stage": name, "benchmark": name, "metric": "run", "value": float("nan"), "unit": "",
        "peak_mem_mb": float("nan"), "notes": (outcome.get("error") or "")[-4000:], "device": "",
        "fraction_of_peak_bf16": float("nan"), "cost_stage": "", "cost_per": "", "status": outcome["status"],
    }]
    extra = {"quick": quick, "run_date": machine["date_utc"], "machine": machine_summary(machine),
             "cpu_count": int(machine["cpu_count"]), "gpu": machine["gpu"], "wall_s": float(outcome["wall_s"]),
             "process_peak_rss_mb": float(outcome["process_peak_rss_mb"]),
             "load_avg": f"{machine['load_avg']} at start, {outcome.get('load_avg', '')} at end"}
    records = [{**r, **extra} for r in rows]
    types = {"value": pa.float64(), "peak_mem_mb": pa.float64(), "fraction_of_peak_bf16": pa.float64(),
             "quick": pa.bool_(), "cpu_count": pa.int64(), "wall_s": pa.float64(),
             "process_peak_rss_mb": pa.float64()}
    schema = pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])
    return pa.Table.from_pylist(records, schema=schema)


def run_benchmarks(names: Iterable[str] | None = None, *, quick: bool = False,
                   options: dict[str, dict] | None = None, results_dir: Path = RESULTS_DIR,
                   results_md: Path | None = RESULTS_MD, timeout_s: float | None = None,
                   log: Callable[[str], None] = print, bench_dir: Path = BENCH_DIR,
                   package: str = "benchmarks") -> dict[str, dict]:
    """Run the named benchmark modules (default: all discovered), write ``results_dir/<name>.parquet`` and
    rebuild ``results_md``. ``options[name]`` are keyword arguments for that module's ``run``.
    ``bench_dir``/``package`` point at another directory of ``bench_*.py`` modules (tests use it).
    Returns ``{name: outcome}``."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    available = discover(bench_dir)
    names = list(names) if names else [n for n in available if n not in OPT_IN]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}")
    machine = describe_machine()
    log(f"machine: {machine_summary(machine)}; {machine['date_utc']}; quick={quick}")
    results_dir.mkdir(parents=True, exist_ok=True)
    outcomes = {}
    for name in names:
        log(f"[{name}] running ...")
        outcome = run_one(name, quick, options=(options or {}).get(name), timeout_s=timeout_s, package=package,
                          pythonpath=[str(bench_dir.parent)] if bench_dir != BENCH_DIR else [],
                          log_dir=results_dir.parent / "_logs" if bench_dir != BENCH_DIR else None)
        pq.write_table(outcome_table(name, outcome, quick, machine), results_dir / f"{name}.parquet")
        outcomes[name] = outcome
        if outcome["status"] == "ok":
            log(f"[{name}] ok: {len(outcome['rows'])} figures in {outcome['wall_s']:.1f} s, "
                f"peak RSS {outcome['process_peak_rss_mb']:.0f} MiB")
        else:
            log(f"[{name}] {outcome['status'].upper()} after {outcome['wall_s']:.1f} s:\n{outcome['error']}")
    if results_md is not None:
        write_results_md(results_dir, results_md)
        log(f"wrote {results_md} and {results_dir}/")
    return outcomes


# ---------------------------------------------------------------- reporting
def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if value == 0 or 1e-3 <= abs(value) < 1e12:
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:.3g}"


def markdown_table(rows: list[dict]) -> str:
    """Markdown table of figure rows (benchmark, metric, value, unit, peak memory, device, notes)."""
    lines = ["| benchmark | metric | value | unit | peak mem (MiB) | device | notes |",
             "|---|---|---:|---|---:|---|---|"]
    for r in rows:
        notes = str(r.get("notes", "")).replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['benchmark']} | {r['metric']} | {_fmt(r['value'])} | {r['unit']} | "
                     f"{_fmt(r.get('peak_mem_mb'))} | {r.get('device', 'cpu')} | {notes} |")
    return "\n".join(lines)


def write_results_md(results_dir: Path = RESULTS_DIR, results_md: Path = RESULTS_MD) -> str:
    """Rebuild RESULTS.md from every ``results_dir/*.parquet``: one section per module, machine and date named;
    then the training-lever experiments and whole-lake gap tables found under ``results_dir``
    (``exp_model.levers_markdown``, ``exp_model.gap_tables_markdown``)."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    files = sorted(results_dir.glob("*.parquet"), key=lambda p: _stage_sort_key(p.stem))
    parts = ["# cpldm benchmark results", "",
             "Written by `python -m benchmarks` (`make bench`; `--quick` for CI-sized runs) from "
             "`benchmarks/results/<name>.parquet`. Each section names the machine and date of its own run; "
             "throughputs are items/s, ratios (x) are measured in the same run, peak memory is the "
             "process high-water RSS unless the notes say otherwise. How to read and extend: docs/benchmarks.md.",
             ""]
    summary = ["| module | status | figures | run (UTC) | mode | wall (s) | process peak RSS (MiB) | "
               "load avg 1/5/15 min | machine |",
               "|---|---|---:|---|---|---:|---:|---|---|"]
    sections = []
    for path in files:
        rows = pq.read_table(path).to_pylist()
        if not rows:
            continue
        first = rows[0]
        mode = "quick" if first["quick"] else "full"
        status = first["status"]
        n_ok = sum(r["status"] == "ok" for r in rows)
        summary.append(f"| {path.stem} | {status} | {n_ok} | {first['run_date']} | {mode} | "
                       f"{_fmt(first['wall_s'])} | {_fmt(first['process_peak_rss_mb'])} | "
                       f"{first.get('load_avg') or ''} | {first['machine']} |")
        sections += [f"## {path.stem}", "",
                     f"Run {first['run_date']} ({mode} mode) on {first['machine']}"
                     + (f"; load average {first['load_avg']}." if first.get("load_avg") else "."), ""]
        if status != "ok":
            sections += [f"**{status.upper()}**: no figures. Error:", "", "```", first["notes"].strip(), "```", ""]
        else:
            sections += [markdown_table(rows), ""]
    from benchmarks.exp_model import gap_tables_markdown, levers_markdown  # noqa: PLC0415  (issue 18's runs)

    sections += levers_markdown(results_dir) + gap_tables_markdown(results_dir)
    text = "\n".join(parts + summary + [""] + sections)
    results_md.write_text(text)
    return text


# ---------------------------------------------------------------- module entry points
def module_main(run: Callable[..., list[dict]], argv: list[str] | None = None) -> None:
    """``python -m benchmarks.bench_<name> [--quick]``: run in-process and print a markdown table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="CI-sized run")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    print(markdown_table(rows))


def _child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="internal: run one benchmark module (used by the harness)")
    parser.add_argument("--child", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--options", default="{}")
    parser.add_argument("--package", default="benchmarks")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    return _child(args.child, args.quick, json.loads(args.options), args.out, args.package)


if __name__ == "__main__":
    sys.exit(_child_main())
