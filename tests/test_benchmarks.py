"""Benchmark harness: quick mode produces complete figures; failures and timeouts are recorded, not fatal.

The stage benchmarks are heavy, so the real run here is bench_duckdb at a tiny size (its quick mode with
``sizes``/``repeat``/``queries`` overridden through the harness options); every other discovered module is
checked statically for the ``run(quick)`` contract. ``CPLDM_BENCH_ALL=1`` runs every module's quick mode.
"""
from __future__ import annotations

import ast
import math
import os

import pyarrow.parquet as pq
import pytest

from benchmarks import harness
from benchmarks.__main__ import parse_options


def _check_figures(rows: list[dict]) -> None:
    assert rows
    for r in rows:
        if r["metric"] == "run":
            continue
        label = f"{r['stage']}: {r['benchmark']} / {r['metric']}"
        assert r["status"] == "ok", label
        assert math.isfinite(r["value"]) and r["value"] > 0, label
        assert r["unit"].strip(), label
        assert math.isnan(r["peak_mem_mb"]) or r["peak_mem_mb"] > 0, label
        assert r["device"], label


def test_duckdb_quick_through_harness(tmp_path):
    results = tmp_path / "results"
    md = tmp_path / "RESULTS.md"
    outcomes = harness.run_benchmarks(
        ["duckdb"], quick=True, results_dir=results, results_md=md, log=lambda _msg: None,
        options={"duckdb": {"sizes": [2000], "repeat": 1, "queries": ["groupby_plate"]}})
    assert outcomes["duckdb"]["status"] == "ok", outcomes["duckdb"].get("error")
    rows = pq.read_table(results / "duckdb.parquet").to_pylist()
    _check_figures(rows)
    metrics = {(r["benchmark"], r["metric"], r["unit"]) for r in rows}
    for engine in ("duckdb", "polars", "pandas"):
        assert ("groupby_plate/2k rows", f"{engine} throughput", "rows/s") in metrics
    assert ("groupby_plate/2k rows", "duckdb speed-up vs pandas", "x") in metrics
    # the ratio is the ratio of the measured times of the same run
    by_metric = {r["metric"]: r for r in rows}
    ratio = by_metric["duckdb throughput"]["value"] / by_metric["pandas throughput"]["value"]
    assert by_metric["duckdb speed-up vs pandas"]["value"] == pytest.approx(ratio)
    assert all(r["peak_mem_mb"] > 0 and r["machine"] and r["run_date"] for r in rows)
    text = md.read_text()
    assert "## duckdb" in text and rows[0]["machine"] in text and "duckdb throughput" in text


def test_all_discovered_modules_expose_run_quick():
    names = harness.discover()
    assert "duckdb" in names
    for name in names:
        tree = ast.parse((harness.BENCH_DIR / f"bench_{name}.py").read_text())
        runs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
        assert runs, f"bench_{name}.py defines no run()"
        params = [a.arg for a in runs[0].args.args]
        assert params[:1] == ["quick"], f"bench_{name}.run must take quick first, has {params}"


@pytest.mark.skipif(os.environ.get("CPLDM_BENCH_ALL") != "1", reason="set CPLDM_BENCH_ALL=1 (slow)")
def test_every_module_quick(tmp_path):
    outcomes = harness.run_benchmarks(quick=True, results_dir=tmp_path / "r", results_md=tmp_path / "R.md")
    failed = {n: o["error"] for n, o in outcomes.items() if o["status"] != "ok"}
    assert not failed, failed
    for path in (tmp_path / "r").glob("*.parquet"):
        _check_figures(pq.read_table(path).to_pylist())


FAKE_MODULES = {
    "ok": "def run(quick, scale=1.0):\n"
          "    return [{'benchmark': 'b', 'metric': 'm', 'value': 2.0 * scale, 'unit': 'items/s',\n"
          "             'peak_mem_mb': None, 'notes': 'quick' if quick else 'full'},\n"
          "            {'benchmark': 'b', 'metric': 'mm', 'value': 494.7, 'unit': 'TFLOP/s',\n"
          "             'peak_mem_mb': 1.0, 'notes': '', 'device': 'cuda:0 (NVIDIA H100 80GB HBM3)'}]\n",
    "boom": "def run(quick):\n    raise RuntimeError('simulated failure in boom')\n",
    "zero": "def run(quick):\n    return [{'benchmark': 'b', 'metric': 'm', 'value': 0.0, 'unit': 'items/s',\n"
            "             'peak_mem_mb': 1.0, 'notes': ''}]\n",
    "slow": "import time\ndef run(quick):\n    time.sleep(60)\n",
}


def test_failures_timeouts_and_gpu_fraction_are_recorded(tmp_path):
    pkg = tmp_path / "fakebench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, src in FAKE_MODULES.items():
        (pkg / f"bench_{name}.py").write_text(src)
    results, md = tmp_path / "results", tmp_path / "RESULTS.md"
    outcomes = harness.run_benchmarks(quick=True, results_dir=results, results_md=md, timeout_s=8,
                                      bench_dir=pkg, package="fakebench", log=lambda _msg: None,
                                      options={"ok": {"scale": 3.0}})
    assert {n: o["status"] for n, o in outcomes.items()} == {
        "boom": "failed", "ok": "ok", "slow": "timeout", "zero": "failed"}
    ok = pq.read_table(results / "ok.parquet").to_pylist()
    assert ok[0]["value"] == 6.0 and ok[0]["notes"].startswith("quick")          # option passed through
    # a figure without its own peak gets the process high-water mark, and says so
    assert 1.0 < ok[0]["peak_mem_mb"] <= ok[0]["process_peak_rss_mb"] and "process peak RSS" in ok[0]["notes"]
    frac = [r for r in ok if r["unit"] == "fraction"]
    assert len(frac) == 1 and frac[0]["value"] == pytest.approx(494.7 / 989.4)
    boom = pq.read_table(results / "boom.parquet").to_pylist()
    assert boom[0]["status"] == "failed" and "simulated failure in boom" in boom[0]["notes"]
    text = md.read_text()
    assert "**FAILED**" in text and "simulated failure in boom" in text and "**TIMEOUT**" in text
    assert "is not a finite positive number" in text


def test_normalise_rows_rejects_incomplete_figures():
    good = {"benchmark": "b", "metric": "m", "value": 1.0, "unit": "x", "peak_mem_mb": 1.0, "notes": ""}
    assert harness.normalise_rows([good], "s")[0]["device"] == "cpu"
    for bad, msg in [({**good, "unit": " "}, "has no unit"), ({**good, "value": float("nan")}, "finite positive"),
                     ({k: v for k, v in good.items() if k != "notes"}, "lacks notes"),
                     ({**good, "cost_stage": "paint"}, "cost_stage")]:
        with pytest.raises(ValueError, match=msg):
            harness.normalise_rows([bad], "s")
    with pytest.raises(ValueError, match="non-empty list"):
        harness.normalise_rows([], "s")
    # the row every bench module builds: complete, with this process's VmHWM (not ru_maxrss, which counts the
    # forking parent's size across exec) and extra columns kept
    built = harness.result_row("b", "m", 2, "x", cost_stage="generate")
    assert harness.normalise_rows([built], "s")[0]["cost_stage"] == "generate"
    assert built["peak_mem_mb"] == pytest.approx(harness.vm_hwm_mb("self"), abs=2.0)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_rss_of_env_counts_exactly_the_processes_carrying_the_marker(tmp_path):
    import subprocess
    import sys
    import time
    import uuid

    mark = uuid.uuid4().hex
    code = "import sys, time; x = bytearray(64 * 2 ** 20); print(1, flush=True); time.sleep(60)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "BENCH_MARK": mark},
                              stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for p in procs:
            p.stdout.readline()   # its 64 MiB are allocated and touched
        time.sleep(0.2)
        rss = []
        for p in procs:   # the naive reading: each process's own VmRSS line
            line = next(x for x in open(f"/proc/{p.pid}/status") if x.startswith("VmRSS:"))
            rss.append(int(line.split()[1]) / 1024)
        assert min(rss) > 64
        assert harness.rss_of_env_mb("BENCH_MARK", mark) == pytest.approx(sum(rss), abs=1.0)
        assert harness.rss_of_env_mb("BENCH_MARK", mark[:-1]) == 0.0   # a prefix is another value
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_peak_flops_table_and_options():
    assert harness.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert harness.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert harness.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert harness.peak_bf16_flops("NVIDIA L40S") == 362.05e12
    assert harness.peak_bf16_flops("Tesla T4") is None
    assert parse_options(["duckdb.sizes=[10,20]", "duckdb.note=abc", "x.n=3"]) == {
        "duckdb": {"sizes": [10, 20], "note": "abc"}, "x": {"n": 3}}
    with pytest.raises(SystemExit):
        parse_options(["nodot=1"])


GPU_CHECK_FIGURES = (  # (benchmark prefix, metric prefix, unit): every figure benchmarks/gpu_check.sh records
    ("encode ", "crops/s per ", "crops/s"),
    ("train step ", "samples/s per ", "samples/s"),
    ("train step ", "model FLOP/s", "TFLOP/s"),
    ("sample ", "images/s per ", "images/s"),
    ("sample ", "sampling only", "images/s"),
    ("sample ", "decode only", "images/s"),
    ("sample ", "first call", "s"),
    ("DDP train step ", "samples/s total", "samples/s"),
    ("DDP train step ", "2-process / 1-process", "x"),
)


def test_gpu_check_script_runs_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh without a GPU: the same code at tiny shapes, every figure with its device."""
    import subprocess

    results = tmp_path / "results"
    proc = subprocess.run(["bash", str(harness.BENCH_DIR / "gpu_check.sh"), "--cpu", "--quick",
                           "--results-dir", str(results)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = pq.read_table(results / "gpu.parquet").to_pylist()
    _check_figures(rows)
    for bench, metric, unit in GPU_CHECK_FIGURES:
        hits = [r for r in rows if r["benchmark"].startswith(bench) and r["metric"].startswith(metric)]
        assert len(hits) == 1 and hits[0]["unit"] == unit, (bench, metric, [r["metric"] for r in rows])
        assert hits[0]["device"] == "cpu" and "not a cost figure" in hits[0]["notes"]
    assert not any(r["cost_stage"] for r in rows)   # toy CPU shapes never price a stage
    by = {(r["benchmark"].split()[0], r["metric"].split(" (")[0]): r["value"] for r in rows}
    # images/s including decode is the harmonic combination of the two timed parts of the same run
    both = next(v for (b, m), v in by.items() if b == "sample" and m.startswith("images/s"))
    assert both == pytest.approx(1 / (1 / by[("sample", "sampling only")] + 1 / by[("sample", "decode only")]))
    single = next(v for (b, m), v in by.items() if b == "train" and m.startswith("samples/s"))
    ratio = next(v for (b, m), v in by.items() if b == "DDP" and m.startswith("2-process"))
    assert ratio == pytest.approx(by[("DDP", "samples/s total")] / single)
    report = (results / "gpu_check.md").read_text()
    assert "No CUDA device" in report and rows[0]["machine"] in report and "| encode tiny VAE" in report
    assert "## gpu" in (tmp_path / "RESULTS.md").read_text()


def test_lever_summary_matches_a_naive_mean_over_seeds_and_lands_in_results_md(tmp_path):
    """Issue 18's lever table: per (experiment, VAE, arm, model, guidance) the mean over seeds of each gap and of
    their row mean, against a plain-Python computation; the section is appended to RESULTS.md."""
    import numpy as np
    import pandas as pd

    from benchmarks.exp_model import GAP_METRICS, lever_summary, run_name

    rng = np.random.default_rng(3)
    rows = []
    for arm, vae in (("a-baseline", "vae3000"), ("c-minsnr5", "")):
        for model in ("scm", "scm-free"):
            for seed in (0, 1, 2):
                rows.append({"arm": arm, "model": model, "seed": seed, "run": run_name(arm, model, vae, seed),
                             "steps": 240, "train_wall_s": float(rng.uniform(90, 110)),
                             **{m: float(rng.uniform(-0.1, 0.8)) for m in GAP_METRICS}})
    (tmp_path / "exp_model_x").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "exp_model_x" / "exp_model_arms.parquet")
    table = lever_summary(tmp_path).set_index(["arm", "model"])
    assert len(table) == 4 and set(table["vae"]) == {"vae3000", "demo"}
    for (arm, model), r in table.iterrows():
        mine = [x for x in rows if x["arm"] == arm and x["model"] == model]
        per_seed = [sum(x[m] for m in GAP_METRICS) / len(GAP_METRICS) for x in mine]
        assert r["seeds"] == 3 and r["guidance"] == 1.0
        assert r["mean_gap"] == pytest.approx(sum(per_seed) / 3, rel=1e-12)
        assert r["mean_gap_sd"] == pytest.approx(float(np.std(per_seed, ddof=1)), rel=1e-12)
        assert r["moa_seen_gap"] == pytest.approx(sum(x["moa_seen_gap"] for x in mine) / 3, rel=1e-12)
    text = harness.write_results_md(tmp_path, tmp_path / "RESULTS.md")
    assert "## Experiments: issue 18's training levers" in text
    assert "| exp_model_x | demo | c-minsnr5 | scm-free | 1 | 3 | 240 |" in text


def test_gap_table_matches_a_naive_computation_of_the_gap_closed(tmp_path):
    """``exp_model --gap-table``: per data type, (arm - chance) / (oracle - chance) of fold means for MoA / target
    and arm / oracle for truth recovery, recomputed here from the rows with plain Python; other runs and the
    per-query metric are ignored; an unknown run is refused."""
    import numpy as np
    import pandas as pd

    from benchmarks.exp_model import GAP_METRICS, ORACLE, gap_markdown, gap_table

    rng = np.random.default_rng(11)
    rows = []
    for run in ("demo", "other"):
        for dt in (ORACLE, "real", "c-aware-N10"):
            for task in ("moa", "target"):
                for split in ("seen", "unseen"):
                    for fold in range(4):
                        for metric in ("mAP-label", "mAP-label-chance", "mAP"):
                            rows.append({"run": run, "data_type": dt, "task": task, "query_split": split,
                                         "fold": fold, "metric": metric, "value": float(rng.uniform(0.05, 0.9))})
            for split in ("seen", "unseen"):
                rows.append({"run": run, "data_type": dt, "task": "truth", "query_split": split, "fold": -1,
                             "metric": "truth-pearson-mean", "value": float(rng.uniform(0.1, 0.9))})
    res = pd.DataFrame(rows)
    table = gap_table(res, "demo").set_index("data_type")
    assert sorted(table.index) == sorted([ORACLE, "real", "c-aware-N10"])

    def mean(dt, task, split, metric):
        vals = [r["value"] for r in rows if r["run"] == "demo" and r["data_type"] == dt and r["task"] == task
                and r["query_split"] == split and r["metric"] == metric]
        return sum(vals) / len(vals)

    for dt in table.index:
        gaps = []
        for task in ("moa", "target"):
            for split in ("seen", "unseen"):
                arm, oracle = mean(dt, task, split, "mAP-label"), mean(ORACLE, task, split, "mAP-label")
                chance = mean(dt, task, split, "mAP-label-chance")
                gaps.append((arm - chance) / (oracle - chance))
                assert table.loc[dt, f"{task}_{split}_gap"] == pytest.approx(gaps[-1], rel=1e-12)
        for split in ("seen", "unseen"):
            gaps.append(mean(dt, "truth", split, "truth-pearson-mean") / mean(ORACLE, "truth", split,
                                                                             "truth-pearson-mean"))
            assert table.loc[dt, f"truth_{split}_gap"] == pytest.approx(gaps[-1], rel=1e-12)
        assert table.loc[dt, "mean_gap"] == pytest.approx(sum(gaps) / len(GAP_METRICS), rel=1e-12)
    text = gap_markdown(table.reset_index())
    assert f"| {ORACLE} | " in text and text.count("(100%)") == len(GAP_METRICS)
    # a table written with --out lands in RESULTS.md, rebuilt from the results directory
    (tmp_path / "science").mkdir()
    table.reset_index().to_csv(tmp_path / "science" / "gap_table_demo.csv", index=False)
    md = harness.write_results_md(tmp_path, tmp_path / "RESULTS.md")
    assert "### science: evaluation run `demo`" in md and text in md
    with pytest.raises(SystemExit, match="no evaluation run 'nope'"):
        gap_table(res, "nope")


def test_seed_pairs_is_the_paired_t_test_of_the_gap_table_rows():
    """``--gap-table ... --seed-pair``: c-aware - SCM-free per gap metric and for the mean gap, paired by seed,
    against scipy's paired t-test on the rows picked by hand; an unknown data type is refused."""
    import numpy as np
    import pandas as pd
    from scipy import stats

    from benchmarks.exp_model import GAP_METRICS, seed_pairs

    rng = np.random.default_rng(5)
    dts = [f"c-aware-s{k}" for k in range(3)] + [f"free-s{k}" for k in range(3)] + ["real"]
    table = pd.DataFrame({"data_type": dts, **{m: rng.uniform(0, 1, len(dts)) for m in GAP_METRICS}})
    table["mean_gap"] = table[list(GAP_METRICS)].mean(axis=1)
    pairs = [(str(k), f"c-aware-s{k}", f"free-s{k}") for k in range(3)]
    out = seed_pairs(table, pairs, arm="gcd").set_index("metric")
    assert set(out.index) == {*GAP_METRICS, "mean_gap"} and (out["seeds"] == 3).all()
    for metric in [*GAP_METRICS, "mean_gap"]:
        scm = table[metric].to_numpy()[:3]
        free = table[metric].to_numpy()[3:6]
        assert out.loc[metric, "diff_mean"] == pytest.approx((scm - free).mean(), rel=1e-12)
        assert out.loc[metric, "p_ttest_rel"] == pytest.approx(stats.ttest_rel(scm, free).pvalue, rel=1e-9)
    with pytest.raises(SystemExit, match="no data type 'nope'"):
        seed_pairs(table, [("0", "nope", "free-s0"), ("1", "c-aware-s1", "free-s1")], arm="gcd")


def test_world_interaction_of_seed_pairs_is_welch_on_the_per_seed_differences():
    """``--gap-table ... --seed-pair ... --control-run``: the seed pairs of a science lake (confounded world) against
    an exp_model --seeds run in the control world: per metric, the difference of the two worlds' mean c-aware -
    SCM-free differences, with scipy's Welch t-test on the per-seed differences picked by hand."""
    import numpy as np
    import pandas as pd
    from scipy import stats

    from benchmarks.exp_model import GAP_METRICS, seed_rows, world_interaction

    rng = np.random.default_rng(7)
    dts = [f"c-aware-s{k}" for k in range(3)] + [f"free-s{k}" for k in range(3)]
    table = pd.DataFrame({"data_type": dts, **{m: rng.uniform(0, 1, len(dts)) for m in GAP_METRICS}})
    pairs = [(str(k), f"c-aware-s{k}", f"free-s{k}") for k in range(3)]
    # the control: 4 seeds (unequal sizes, so Welch's degrees of freedom matter), one arm
    control = pd.DataFrame([{"arm": "e", "model": model, "seed": k, **{m: rng.uniform(0, 1) for m in GAP_METRICS}}
                            for k in range(4) for model in ("scm", "scm-free")])
    out = world_interaction(seed_rows(table, pairs, arm="e"), control).set_index("metric")
    assert set(out.index) == {*GAP_METRICS, "mean_gap"}
    assert (out["seeds_confounded"] == 3).all() and (out["seeds_control"] == 4).all()
    for metric in [*GAP_METRICS, "mean_gap"]:
        if metric == "mean_gap":
            conf = table[list(GAP_METRICS)].mean(axis=1).to_numpy()
            ctrl = control[list(GAP_METRICS)].mean(axis=1).to_numpy()
        else:
            conf, ctrl = table[metric].to_numpy(), control[metric].to_numpy()
        x = conf[:3] - conf[3:]            # c-aware - SCM-free per seed, confounded world
        y = ctrl[0::2] - ctrl[1::2]        # rows alternate scm, scm-free per seed
        assert out.loc[metric, "interaction"] == pytest.approx(x.mean() - y.mean(), rel=1e-12)
        assert out.loc[metric, "p_welch"] == pytest.approx(stats.ttest_ind(x, y, equal_var=False).pvalue, rel=1e-9)
