"""DuckDB vs pandas vs polars on CellProfiler-like feature tables stored as Parquet (1M and 10M rows).

Three queries a profiling user runs (`cpldm sql` uses DuckDB):

* ``groupby_plate``: per-plate mean of 4 features;
* ``filter_aggregate``: rows of two sources with a large cell area, per-compound count and mean of 2 features
  (high-cardinality group-by);
* ``join_annotations``: join with a compound -> MoA annotation table, per-MoA count and mean of 2 features.

Every timing is "Parquet on disk -> result in memory" (reading included, only the needed columns), best of
``repeat`` runs, each engine and query in its own fresh process so its peak RSS is its own. The three engines'
results are checked to agree (a mismatch fails the benchmark). DuckDB and polars use every core; pandas is
single-threaded by design, which is part of what the ratio measures.

``python -m benchmarks.bench_duckdb [--quick]`` prints the table; the harness runs ``run(quick)``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import harness

ENGINES = ("duckdb", "polars", "pandas")
QUERIES = ("groupby_plate", "filter_aggregate", "join_annotations")
FULL_SIZES = (1_000_000, 10_000_000)
QUICK_SIZES = (100_000, 1_000_000)

#: CellProfiler-style feature columns (float32), enough to make rows as wide as a small real profile table.
FEATURES = (
    "Cells_AreaShape_Area", "Nuclei_AreaShape_Area", "Cells_AreaShape_Eccentricity",
    "Nuclei_AreaShape_FormFactor",
    *(f"Cells_Intensity_MeanIntensity_{ch}" for ch in ("DNA", "ER", "RNA", "AGP", "Mito")),
    *(f"Nuclei_Intensity_MeanIntensity_{ch}" for ch in ("DNA", "ER", "RNA", "AGP", "Mito")),
    "Cytoplasm_Texture_Contrast_AGP_3_00_256", "Cells_Granularity_1_Mito",
)
ROWS_PER_PLATE = 3_840  # 384 wells x 10 rows: a plate's worth of image-level rows
ROWS_PER_FILE = 1_000_000
N_SOURCES = 12
N_MOA = 200
FILTER_SOURCES = ("source_2", "source_5")
AREA_THRESHOLD = 1_000.0  # Cells_AreaShape_Area ~ N(1000, 200): keeps about half the rows of those sources

GROUPBY_PLATE = FEATURES[:4]
FILTER_AGG = FEATURES[4:6]
JOIN_AGG = FEATURES[6:8]


# ---------------------------------------------------------------- data
def n_compounds(n_rows: int) -> int:
    return max(50, n_rows // 100)


def generate(n_rows: int, out_dir: Path, seed: int = 0) -> Path:
    """Write ``features/part-*.parquet`` (n_rows rows) and ``annotations.parquet`` under out_dir.

    Features are float32 ~ N(1000, 200) for areas and U(0, 1) otherwise; metadata are JUMP-named strings.
    Written in chunks of ROWS_PER_FILE so the 10M-row set never sits in memory whole.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    feat_dir = out_dir / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)
    n_cpd = n_compounds(n_rows)
    compounds = np.array([f"JCP2022_{i:06d}" for i in range(n_cpd)], dtype=object)
    sources = np.array([f"source_{i + 1}" for i in range(N_SOURCES)], dtype=object)
    wells = np.array([f"{r}{c:02d}" for r in "ABCDEFGHIJKLMNOP" for c in range(1, 25)], dtype=object)
    for part, start in enumerate(range(0, n_rows, ROWS_PER_FILE)):
        idx = np.arange(start, min(start + ROWS_PER_FILE, n_rows))
        plate = idx // ROWS_PER_PLATE
        cols = {
            "Metadata_Source": pa.array(sources[plate % N_SOURCES], pa.string()),
            "Metadata_Plate": pa.array(np.char.add("P", plate.astype("U8")), pa.string()),
            "Metadata_Well": pa.array(wells[(idx // 10) % 384], pa.string()),
            "Metadata_JCP2022": pa.array(compounds[rng.integers(0, n_cpd, len(idx))], pa.string()),
        }
        for name in FEATURES:
            vals = rng.normal(1000, 200, len(idx)) if "AreaShape_Area" in name else rng.random(len(idx))
            cols[name] = pa.array(vals.astype(np.float32))
        pq.write_table(pa.table(cols), feat_dir / f"part-{part:04d}.parquet", row_group_size=250_000)
    moa = rng.integers(0, N_MOA, n_cpd)
    ann = pa.table({"Metadata_JCP2022": pa.array(compounds, pa.string()),
                    "Metadata_MoA": pa.array([f"moa_{m:03d}" for m in moa], pa.string())})
    pq.write_table(ann, out_dir / "annotations.parquet")
    return out_dir


# ---------------------------------------------------------------- queries per engine
def _sql(query: str, data: Path) -> str:
    feats = f"read_parquet('{data / 'features'}/*.parquet')"
    if query == "groupby_plate":
        aggs = ", ".join(f'avg("{f}") AS "mean_{f}"' for f in GROUPBY_PLATE)
        return f"SELECT Metadata_Plate, count(*) AS n, {aggs} FROM {feats} GROUP BY Metadata_Plate"
    if query == "filter_aggregate":
        aggs = ", ".join(f'avg("{f}") AS "mean_{f}"' for f in FILTER_AGG)
        srcs = ", ".join(f"'{s}'" for s in FILTER_SOURCES)
        return (f"SELECT Metadata_JCP2022, count(*) AS n, {aggs} FROM {feats} "
                f"WHERE Metadata_Source IN ({srcs}) AND Cells_AreaShape_Area > {AREA_THRESHOLD} "
                "GROUP BY Metadata_JCP2022")
    if query == "join_annotations":
        aggs = ", ".join(f'avg(f."{f}") AS "mean_{f}"' for f in JOIN_AGG)
        return (f"SELECT a.Metadata_MoA, count(*) AS n, {aggs} FROM {feats} f "
                f"JOIN read_parquet('{data / 'annotations.parquet'}') a USING (Metadata_JCP2022) "
                "GROUP BY a.Metadata_MoA")
    raise ValueError(query)


def _run_duckdb(query: str, data: Path):
    import duckdb

    con = duckdb.connect()
    return con.sql(_sql(query, data)).fetch_arrow_table()


def _run_polars(query: str, data: Path):
    import polars as pl

    feats = pl.scan_parquet(str(data / "features" / "*.parquet"))
    if query == "groupby_plate":
        key, cols, lf = "Metadata_Plate", GROUPBY_PLATE, feats
    elif query == "filter_aggregate":
        key, cols = "Metadata_JCP2022", FILTER_AGG
        lf = feats.filter(pl.col("Metadata_Source").is_in(list(FILTER_SOURCES))
                          & (pl.col("Cells_AreaShape_Area") > AREA_THRESHOLD))
    else:
        key, cols = "Metadata_MoA", JOIN_AGG
        lf = feats.join(pl.scan_parquet(str(data / "annotations.parquet")), on="Metadata_JCP2022", how="inner")
    out = lf.group_by(key).agg(pl.len().alias("n"), *(pl.col(c).mean().alias(f"mean_{c}") for c in cols))
    return out.collect().to_arrow()


def _run_pandas(query: str, data: Path):
    import pandas as pd
    import pyarrow as pa

    files = sorted((data / "features").glob("*.parquet"))
    if query == "groupby_plate":
        key, cols = "Metadata_Plate", list(GROUPBY_PLATE)
        df = pd.concat([pd.read_parquet(f, columns=[key, *cols]) for f in files], ignore_index=True)
    elif query == "filter_aggregate":
        key, cols = "Metadata_JCP2022", list(FILTER_AGG)
        df = pd.concat([pd.read_parquet(f, columns=[key, "Metadata_Source", "Cells_AreaShape_Area", *cols])
                        for f in files], ignore_index=True)
        df = df[df["Metadata_Source"].isin(FILTER_SOURCES) & (df["Cells_AreaShape_Area"] > AREA_THRESHOLD)]
    else:
        key, cols = "Metadata_MoA", list(JOIN_AGG)
        df = pd.concat([pd.read_parquet(f, columns=["Metadata_JCP2022", *cols]) for f in files],
                       ignore_index=True)
        df = df.merge(pd.read_parquet(data / "annotations.parquet"), on="Metadata_JCP2022", how="inner")
    out = df.groupby(key, sort=False, observed=True).agg(
        n=(cols[0], "size"), **{f"mean_{c}": (c, "mean") for c in cols}).reset_index()
    return pa.Table.from_pandas(out, preserve_index=False)


RUNNERS = {"duckdb": _run_duckdb, "polars": _run_polars, "pandas": _run_pandas}


def _worker(engine: str, query: str, data: Path, repeat: int, out: Path) -> dict:
    """Body of one measuring process: import the engine, run the query ``repeat`` times, keep the best."""
    import pyarrow.parquet as pq

    RUNNERS[engine]  # noqa: B018  (fail fast on a bad name)
    __import__(engine)  # import cost is not part of the query time
    baseline_mb = _current_rss_mb()
    times = []
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = RUNNERS[engine](query, data)
        times.append(time.perf_counter() - start)
    pq.write_table(result, out)
    return {"seconds": min(times), "all_seconds": times, "baseline_rss_mb": baseline_mb,
            "peak_rss_mb": harness.peak_rss_mb(include_children=False)}


def _current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _measure(engine: str, query: str, data: Path, repeat: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_duckdb", "--worker", engine, query, str(data),
           "--repeat", str(repeat), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=harness.REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} {query} worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_agree(outputs: dict[str, Path], key: str, query: str, n_rows: int) -> None:
    """All engines must return the same groups, counts and means (float32 inputs: rtol 1e-4)."""
    import pandas as pd

    frames = {e: pd.read_parquet(p).sort_values(key).reset_index(drop=True) for e, p in outputs.items()}
    ref_name, ref = "duckdb", frames["duckdb"]
    for name, df in frames.items():
        if list(df[key].astype(str)) != list(ref[key].astype(str)):
            raise AssertionError(f"{query} ({n_rows} rows): {name} groups differ from {ref_name}")
        for col in ref.columns:
            if col == key:
                continue
            if not np.allclose(df[col].to_numpy(float), ref[col].to_numpy(float), rtol=1e-4, atol=1e-6):
                raise AssertionError(f"{query} ({n_rows} rows): {name}.{col} differs from {ref_name}")


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def run(quick: bool, sizes: list[int] | None = None, repeat: int | None = None,
        queries: list[str] | None = None) -> list[dict]:
    """Benchmark figures (rows/s per engine and DuckDB speed-up ratios) for each size and query.

    ``sizes``/``repeat``/``queries`` override the defaults (full: 1M and 10M rows, best of 3; quick: 100k and
    1M, best of 2) so tests can run tiny sizes.
    """
    sizes = list(sizes or (QUICK_SIZES if quick else FULL_SIZES))
    repeat = int(repeat or (2 if quick else 3))
    queries = list(queries or QUERIES)
    keys = {"groupby_plate": "Metadata_Plate", "filter_aggregate": "Metadata_JCP2022",
            "join_annotations": "Metadata_MoA"}
    rows: list[dict] = []
    for n in sizes:
        with tempfile.TemporaryDirectory(dir=harness.work_dir("duckdb")) as tmp:
            tmp = Path(tmp)
            start = time.perf_counter()
            generate(n, tmp / "data")
            gen_s = time.perf_counter() - start
            size_mb = sum(p.stat().st_size for p in (tmp / "data").rglob("*.parquet")) / 2 ** 20
            print(f"[duckdb] {n:,} rows: generated {size_mb:.0f} MiB of Parquet in {gen_s:.1f} s", flush=True)
            for query in queries:
                results, outputs = {}, {}
                for engine in ENGINES:
                    outputs[engine] = tmp / f"{engine}-{query}.parquet"
                    results[engine] = _measure(engine, query, tmp / "data", repeat, outputs[engine])
                    print(f"[duckdb] {n:,} rows {query} {engine}: {results[engine]['seconds']:.3f} s", flush=True)
                _check_agree(outputs, keys[query], query, n)
                bench = f"{query}/{_label(n)} rows"
                for engine in ENGINES:
                    r = results[engine]
                    threads = "1 thread" if engine == "pandas" else f"{harness.describe_machine(False)['cpu_count']} threads"
                    rows.append({"benchmark": bench, "metric": f"{engine} throughput", "value": n / r["seconds"],
                                 "unit": "rows/s", "peak_mem_mb": r["peak_rss_mb"],
                                 "notes": f"best of {repeat}: {r['seconds']:.3f} s; {threads}; Parquet "
                                          f"{size_mb:.1f} MiB read; process RSS after import "
                                          f"{r['baseline_rss_mb']:.0f} MiB; results agree across engines"})
                for other in ("pandas", "polars"):
                    rows.append({"benchmark": bench, "metric": f"duckdb speed-up vs {other}",
                                 "value": results[other]["seconds"] / results["duckdb"]["seconds"], "unit": "x",
                                 "peak_mem_mb": results["duckdb"]["peak_rss_mb"],
                                 "notes": f"{other} time / duckdb time, same run"})
                    rows.append({"benchmark": bench, "metric": f"duckdb peak memory vs {other}",
                                 "value": results["duckdb"]["peak_rss_mb"] / results[other]["peak_rss_mb"],
                                 "unit": "x", "peak_mem_mb": results["duckdb"]["peak_rss_mb"],
                                 "notes": f"duckdb peak RSS / {other} peak RSS (< 1: duckdb uses less)"})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("ENGINE", "QUERY", "DATA"), help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        engine, query, data = args.worker
        print(json.dumps(_worker(engine, query, Path(data), args.repeat, args.out)))
        return
    harness.module_main(run, ["--quick"] if args.quick else [])


if __name__ == "__main__":
    main()
