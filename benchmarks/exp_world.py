"""Experiment (issue 16): can the simulated world show the paper's claim at all?

For every (scenario, world seed) it builds a demo-sized lake and runs, through the project's own stages (the
``cpldm demo`` steps, models left out): simulate -> catalog -> fit-vae -> ingest (the oracle renders images the
size and normalisation of the real crops) -> oracle c-aware and oracle scm-free generation at each N ->
interventional truth run -> profile real, oracles, truth -> evaluate. The oracle arms use the simulator as a
*perfect* generator p(O | T, C), so they show what g-estimation can gain over real data in that world, with no
model error in the way.

Comparisons are paired: within a world, over the 10 folds (identical references for every data type) for mAP
and ROC-AUC, and over compounds for truth recovery; across worlds, the per-world mean differences (one number
per seed: how many worlds favour the arm, and a one-sample t over seeds). Nothing is tuned: the worlds are the ``demo`` preset of
each scenario with seeds 0, 1, 2.

    python -m benchmarks.exp_world [--scenarios jump unconfounded no-effect] [--seeds 0 1 2] [--draws 10 20] [--control-draws 10]
                                   [--workdir benchmarks/_work/exp_world] [--out benchmarks/results/exp_world]

Writes, under ``<out>`` (default benchmarks/results/exp_world, outside the harness's RESULTS.md tables):
``exp_world_results.parquet`` (every fold value), ``exp_world_recovery.parquet`` (every compound's truth
recovery), ``exp_world_verdicts.parquet`` and ``exp_world.md`` (the tables quoted in docs/world.md). The tables
cover every evaluated world in ``--workdir``, so several invocations (seeds, scenarios) add up.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

#: The arms compared (prefixes of evaluate's data types).
ORACLE_ARMS = ("oracle-c-aware", "oracle-scm-free")
REFERENCES = ("real", "real-harmony")


def _steps_without_models(cfg) -> list[str]:
    """Demo step names minus training and model generation / profiling (the oracle needs no model)."""
    from pipelines.demo import _steps

    names = [name for name, _ in _steps(cfg)]
    model_runs = [n.removeprefix("generate-") for n in names
                  if n.startswith("generate-") and "oracle" not in n and n != "generate-truth"]
    drop = {f"generate-{r}" for r in model_runs} | {f"profile-{r}" for r in model_runs}
    return [n for n in names if not n.startswith("train-") and n not in drop]


def run_world(workdir: Path, scenario: str, seed: int, draws: tuple[int, ...], truth_draws: int,
              tiny_vae: bool = True) -> Path:
    """Build and evaluate one world (resumable: committed demo steps are skipped). Returns its lake path.
    ``tiny_vae=False`` keeps the demo VAE (for experiments whose model arms decode latents)."""
    from cpldm_core import autoencoder
    from pipelines.demo import DEMO_PRESETS, run
    from pipelines.storage import Lake

    # No arm here decodes latents: the oracles and the truth render with the simulator and only borrow ingest's
    # normalisation and crop, which do not depend on the VAE. The tiny VAE (seconds, not minutes) serves ingest.
    if tiny_vae:
        autoencoder.FIT_VAE_PRESETS["demo"] = autoencoder.FIT_VAE_PRESETS["tiny"]

    lake_dir = workdir / f"{scenario}-seed{seed}"
    cfg = dataclasses.replace(DEMO_PRESETS["demo"], scenario=scenario, seed=seed, oracle_draws=tuple(draws),
                              truth_draws=truth_draws, guidance_draws=(), evaluation_run="exp")
    lake = Lake(str(lake_dir))
    only = _steps_without_models(cfg)
    t0 = time.time()
    pending = [s for s in only if not lake.is_committed("demo", s)]
    if pending:   # demo.run with ``only`` reruns what it is given, so give it what is not committed yet
        run(lake, cfg, only=pending, echo=lambda line: None)
    print(f"world {scenario} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    return lake_dir


def collect(lake_dir: Path, scenario: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(fold results, per-compound truth recovery) of one world, tagged with scenario and seed."""
    from pipelines.storage import Lake

    lake = Lake(str(lake_dir))
    results = lake.read_named("eval_results").to_pandas()
    results = results[results["run"] == "exp"].drop(columns=["run"])
    recovery = lake.read_named("eval_truth_recovery").to_pandas()
    recovery = recovery[recovery["run"] == "exp"].drop(columns=["run"])
    for frame in (results, recovery):
        frame["scenario"], frame["seed"] = scenario, seed
    return results, recovery


def world_verdicts(results: pd.DataFrame, recovery: pd.DataFrame) -> pd.DataFrame:
    """Per world: every oracle arm vs real and real-harmony, paired (folds; compounds for truth), Holm."""
    from cpldm_core.evaluation.statistics import paired_and_verdicts

    rows = []
    for (scenario, seed), group in results.groupby(["scenario", "seed"]):
        rec = recovery[(recovery["scenario"] == scenario) & (recovery["seed"] == seed)]
        for reference in REFERENCES:
            _, verdicts = paired_and_verdicts(group, rec if len(rec) else None, reference=reference)
            verdicts = verdicts[verdicts["versus"] == reference]
            rows.append(verdicts.assign(scenario=scenario, seed=seed))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def across_seeds(verdicts: pd.DataFrame) -> pd.DataFrame:
    """One row per (scenario, arm, versus, task, split, metric): mean difference over seeds, its SD, how many
    seeds favour the arm, one-sample t-test p over seeds, and the per-seed adjusted verdicts."""
    from scipy import stats

    keys = ["scenario", "arm", "versus", "task", "query_split", "metric"]
    rows = []
    for key, g in verdicts.groupby(keys):
        d = g["difference"].to_numpy(dtype=float)
        p = float(stats.ttest_1samp(d, 0.0).pvalue) if len(d) > 1 and np.std(d) > 0 else float("nan")
        rows.append({**dict(zip(keys, key)), "arm_mean": g["arm_mean"].mean(), "versus_mean": g["versus_mean"].mean(),
                     "difference_mean": d.mean(), "difference_sd": d.std(ddof=1) if len(d) > 1 else np.nan,
                     "seeds": len(d), "seeds_arm_better": int((g["verdict"] == "better").sum()),
                     "seeds_arm_worse": int((g["verdict"] == "worse").sum()), "p_over_seeds": p})
    return pd.DataFrame(rows)


def chance_check(results: pd.DataFrame) -> pd.DataFrame:
    """``no-effect``: each data type's mean over folds vs the chance scoring (``*-chance`` metrics), in units
    of the chance scoring's SD over folds."""
    frame = results[(results["fold"] >= 0)]
    rows = []
    for (scenario, seed, dtype, task, split), g in frame.groupby(["scenario", "seed", "data_type", "task",
                                                                   "query_split"]):
        for metric in ("mAP", "mAP-label", "ROC-AUC"):
            real = g.loc[g["metric"] == metric, "value"]
            chance = g.loc[g["metric"] == f"{metric}-chance", "value"]
            if len(real) and len(chance):
                sd = chance.std(ddof=1)
                rows.append({"scenario": scenario, "seed": seed, "data_type": dtype, "task": task,
                             "query_split": split, "metric": metric, "value": real.mean(),
                             "chance": chance.mean(), "z_vs_chance": (real.mean() - chance.mean()) / sd if sd > 0
                             else np.nan})
    return pd.DataFrame(rows)


def _block(frame: pd.DataFrame) -> str:
    """A fixed-width table in a Markdown code block (no tabulate dependency)."""
    return "```\n" + frame.to_string(index=False) + "\n```"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=["jump", "unconfounded", "no-effect"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--draws", nargs="+", type=int, default=[10, 20], help="oracle N in the jump world")
    parser.add_argument("--control-draws", nargs="+", type=int, default=[10],
                        help="oracle N in the control worlds (unconfounded, no-effect)")
    parser.add_argument("--truth-draws", type=int, default=20)
    parser.add_argument("--workdir", default="benchmarks/_work/exp_world")
    parser.add_argument("--out", default="benchmarks/results/exp_world")
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    workdir, out = Path(args.workdir), Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    # seed-major: an interrupted experiment has every scenario at the first seeds
    for seed in args.seeds:
        for scenario in args.scenarios:
            draws = args.draws if scenario == "jump" else args.control_draws
            run_world(workdir, scenario, seed, tuple(draws), args.truth_draws)
    # the tables cover every evaluated world in the work directory (several invocations may have built them)
    all_results, all_recovery, worlds = [], [], []
    for lake_dir in sorted(workdir.iterdir()):
        scenario, _, seed = lake_dir.name.rpartition("-seed")
        if not seed.isdigit() or not (lake_dir / "_markers" / "demo" / "evaluate.json").exists():
            continue
        results, recovery = collect(lake_dir, scenario, int(seed))
        all_results.append(results)
        all_recovery.append(recovery)
        worlds.append(lake_dir.name)
    results, recovery = pd.concat(all_results), pd.concat(all_recovery)
    results.to_parquet(out / "exp_world_results.parquet")
    recovery.to_parquet(out / "exp_world_recovery.parquet")
    verdicts = world_verdicts(results, recovery)
    verdicts.to_parquet(out / "exp_world_verdicts.parquet")
    summary = across_seeds(verdicts)
    chance = chance_check(results)
    with open(out / "exp_world.md", "w") as fh:
        fh.write(f"# exp_world: oracle arms vs real data (demo preset), worlds: {', '.join(worlds)}\n\n")
        draws = results[results["data_type"].str.startswith("oracle")]
        fh.write("Oracle data types per world: " + "; ".join(
            f"{w}: {', '.join(sorted(set(g['data_type'])))}" for w, g in
            draws.assign(w=draws["scenario"] + "-seed" + draws["seed"].astype(str)).groupby("w")) + "\n\n")
        fh.write("## Across seeds (difference = arm - versus; per-seed verdicts are paired, Holm-adjusted)\n\n")
        fh.write(_block(summary.round(4)) + "\n\n")
        fh.write("## Per world\n\n")
        fh.write(_block(verdicts.round(4)) + "\n\n")
        if len(chance):
            fh.write("## Distance from chance (every data type)\n\n")
            fh.write(_block(chance.round(3)) + "\n")
    print(summary.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
