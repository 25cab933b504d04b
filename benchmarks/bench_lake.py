"""The lake at scale: `cpldm lake ls`, `cpldm sql` (count, group-by) and `cpldm lake validate` on a table of
10^5 rows held in realistic part counts and in many small parts, then `cpldm lake compact` and the same again.

The table is ``synthetic_manifest`` (one row per generated image), written through ``Lake.write_named`` exactly
as ``cpldm generate`` writes it: one part per design block, so part count = images / block size (a 100,000-image
run with blocks of 8 leaves 12,500 parts). Each command runs as the user runs it, ``python -m pipelines.cli ...``
in a fresh process: its wall time includes the interpreter and imports (measured alone as ``python -c pass`` +
imports: the ``startup`` row), and its peak memory is that process's high-water RSS.

``python -m benchmarks.bench_lake [--quick]`` prints a markdown table. Options: ``rows`` (default 100,000;
quick 10,000), ``parts`` (list of part counts; default [100, 2000]; quick [10, 200]).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests._fixtures import write_manifest_parts

REPO = Path(__file__).resolve().parents[1]


_CHILD = """
import json, sys, time, io, contextlib
from pathlib import Path
t0 = time.perf_counter()
from pipelines.cli import build_parser, main
build_parser()   # imports every command's module, as `cpldm` does before running one
from benchmarks.harness import peak_rss_mb
results = [{"startup_s": time.perf_counter() - t0, "peak_mb": peak_rss_mb(False)}]
for argv in json.loads(sys.argv[1]):
    try:   # reset this process's peak-RSS mark (Linux): each command's peak is its own
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    out = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    results.append({"rc": rc, "seconds": time.perf_counter() - t, "peak_mb": peak_rss_mb(False),
                    "out": out.getvalue()[-2000:]})
print(json.dumps(results))
"""


def run_cli(commands: list[list[str]]) -> tuple[dict, list[dict]]:
    """Each ``cpldm ARGV`` of ``commands`` in turn in one fresh process (imports paid once, as the ``startup``
    entry): ``(startup {"startup_s", "peak_mb"}, [{"rc", "seconds", "peak_mb", "out"}, ...])``; a command's
    peak is the process's high-water RSS during it (reset before each, /proc/self/clear_refs)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(commands)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"cpldm commands failed:\n{proc.stdout[-1000:]}\n{proc.stderr[-2000:]}")
    startup, *results = json.loads(proc.stdout.strip().splitlines()[-1])
    for argv, r in zip(commands, results):
        if r["rc"] != 0:
            raise RuntimeError(f"cpldm {' '.join(argv)} exited {r['rc']}:\n{r['out']}")
    return startup, results


def _measure(lake_uri: str, label: str, rows: int) -> list[dict]:
    commands = {
        "lake ls": ["--lake", lake_uri, "lake", "ls"],
        "sql count(*)": ["--lake", lake_uri, "sql", "SELECT count(*) AS n FROM synthetic_manifest"],
        "sql group-by": ["--lake", lake_uri, "sql", "SELECT Metadata_Source, count(*) AS n, "
                         "avg(Metadata_Seed) AS s FROM synthetic_manifest GROUP BY 1 ORDER BY 1"],
        "lake validate": ["--lake", lake_uri, "lake", "validate"],
    }
    startup, results = run_cli(list(commands.values()))
    out = []
    for name, r in zip(commands, results):
        if name == "sql count(*)" and str(rows) not in r["out"]:
            raise RuntimeError(f"{label}: count(*) printed {r['out']!r}, expected {rows}")
        out.append({"benchmark": label, "metric": f"{name}", "value": r["seconds"], "unit": "s",
                    "peak_mem_mb": r["peak_mb"],
                    "notes": f"the command alone; the process's start + imports took {startup['startup_s']:.1f} s "
                             f"({startup['peak_mb']:.0f} MiB) before it"})
    return out


def run(quick: bool, rows: int | None = None, parts: list[int] | None = None) -> list[dict]:
    from benchmarks import harness
    from pipelines.compaction import compact_table
    from pipelines.storage import Lake

    rows = int(rows or (10_000 if quick else 100_000))
    parts = [int(p) for p in (parts or ([10, 200] if quick else [100, 2000]))]
    result = []
    startup, _ = run_cli([])
    result.append({"benchmark": "startup", "metric": "python + cpldm CLI imports", "value": startup["startup_s"],
                   "unit": "s", "peak_mem_mb": startup["peak_mb"],
                   "notes": "paid once per `cpldm` command before it runs (the CLI imports every stage)"})
    for n_parts in parts:
        work = Path(tempfile.mkdtemp(dir=harness.work_dir("lake")))
        try:
            lake = Lake(str(work / "lake"))
            lake.init()
            t0 = time.perf_counter()
            write_manifest_parts(lake, rows, n_parts)
            write_s = time.perf_counter() - t0
            label = f"{rows:,} rows in {n_parts:,} parts"
            result.append({"benchmark": label, "metric": "write parts (Lake.write_named)", "value": rows / write_s,
                           "unit": "rows/s", "peak_mem_mb": harness.peak_rss_mb(False),
                           "notes": f"{write_s:.1f} s, {n_parts / write_s:.0f} parts/s, validated + zstd + fsync"})
            result += _measure(lake.uri, label, rows)
            t0 = time.perf_counter()
            done = compact_table(lake, "synthetic_manifest")
            compact_s = time.perf_counter() - t0
            result.append({"benchmark": label, "metric": "lake compact", "value": compact_s, "unit": "s",
                           "peak_mem_mb": harness.peak_rss_mb(False),
                           "notes": f"{done['parts_before']} parts -> {done['files_after']} file(s), in-process"})
            result += _measure(lake.uri, f"{label}, compacted", rows)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> None:
    from benchmarks import harness
    harness.module_main(run, argv)


if __name__ == "__main__":
    main()
