"""Experiment (issue 17): replicate training seeds -- how much does retraining move the synthetic arms?

The evaluation's fold statistics re-draw reference compounds on *fixed* profiles, so they say nothing about the
variance of training (another seed moved synthetic mAP by ~0.1 in the demo). Here one lake (the ``cpldm demo``
steps up to ingest and embed, and the real profiles) is shared, and for each training seed k = 0..K-1 both models
are trained (``train --set seed=k``, runs ``scm-s<k>`` / ``scm-free-s<k>``), generate N draws each from the
*same* seed namespace (identical noise and confounder draws for every seed: the seeds differ by training only),
and are profiled. One evaluation run (``exp-replicates``) then scores every seed's arms on identical folds.

Per seed: each arm's mean over folds of mAP (per query), mAP-label (per label) and ROC-AUC per task x split, with
the fold SD. Across seeds: mean, **between-seed SD** of those per-seed means, and the paired c-aware - scm-free
comparison over seeds (mean difference, SD, 95 % t interval, paired t ``scipy.stats.ttest_rel``; Wilcoxon's
smallest two-sided p with K=3 pairs is 0.25, so it is reported only from K >= 6).

    python -m benchmarks.exp_replicates --preset tiny --seeds 0 1 2 [--draws 2] [--workdir ...] [--out ...]
    python -m benchmarks.exp_replicates --preset demo --seeds 0 1 2 --draws 10      # the coordinator's run

Writes under ``<out>`` (default benchmarks/results/exp_replicates/<preset>/): ``per_seed.csv`` (seed x arm x task
x split x metric: fold mean and SD), ``between_seeds.csv`` (arm: mean and between-seed SD, mean fold SD),
``paired_seeds.csv`` (c-aware - scm-free over seeds) and ``exp_replicates.md`` (the tables for docs/evaluate.md).
Resumable: the lake's committed demo steps, trained models, generation blocks and profiled units are kept.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

METRICS = ("mAP", "mAP-label", "ROC-AUC")
ARMS = {"scm": "c-aware", "scm-free": "non-c-aware"}
EVAL_RUN = "exp-replicates"
NAMESPACE = "replicates"
#: demo steps shared by every seed: the world, its catalog, VAE, latents, embeddings and the real profiles
SHARED_STEPS = ("simulate", "catalog", "fit-vae", "ingest", "embed", "profile-real")


def model_run(kind: str, seed: int) -> str:
    return f"{kind}-s{seed}"


def build_lake(lake, preset: str, seeds: list[int], draws: int, log=print) -> list[str]:
    """Shared demo steps, then per seed train both models, generate and profile. Returns the generation runs."""
    from cpldm_core.design import generate_preset
    from cpldm_core.diffusion import TRAIN_PRESETS
    from cpldm_core.features.config import PRESETS as PROFILE_PRESETS
    from pipelines import demo, generate, profile, train

    cfg = dataclasses.replace(demo.DEMO_PRESETS[preset], evaluation_run=EVAL_RUN)
    pending = [s for s in SHARED_STEPS if not lake.is_committed(demo.DEMO_STAGE, s)]
    if pending:   # demo.run with ``only`` reruns what it is given: give it what is not committed yet
        demo.run(lake, cfg, only=pending, echo=lambda line: None)
    runs = []
    for seed in seeds:
        for kind in ARMS:
            name = model_run(kind, seed)
            t0 = time.time()
            if not lake.exists(f"{train.final_dir(name)}/weights.pt"):
                train.run(lake, dataclasses.replace(TRAIN_PRESETS[preset], model=kind, seed=seed), run=name)
            gcfg = generate_preset(preset, model_run=name, draws=draws, seed_namespace=NAMESPACE,
                                   run=f"{name}-N{draws}")
            generate.run(lake, gcfg)
            profile.run(lake, PROFILE_PRESETS[preset], dataset=gcfg.run_name)
            runs.append(gcfg.run_name)
            log(f"seed {seed} {kind}: trained, generated and profiled in {time.time() - t0:.0f} s")
    return runs


def evaluate_all(lake, preset: str, runs: list[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """One evaluation of real and every seed's arms on identical folds. Returns (fold results, data type ->
    generation run)."""
    from cpldm_core.evaluation.config import preset as eval_preset
    from pipelines import evaluate

    cfg = eval_preset(preset, run=EVAL_RUN)
    con, views = evaluate._connect(lake)
    con.close()
    with_heldout = bool(evaluate.load_heldout_batches(lake, views))
    found = evaluate.discover(lake, cfg, heldout=with_heldout)
    dataset_of = {dt: ds for dt, ds in found.items() if ds in runs}
    cfg = dataclasses.replace(cfg, data_types=("real", *sorted(dataset_of)))
    evaluate.run(lake, cfg)
    results = lake.read_table(f"eval/run={EVAL_RUN}/results.parquet").to_pandas()
    return results, dataset_of


def per_seed(results: pd.DataFrame, dataset_of: dict[str, str]) -> pd.DataFrame:
    """seed x arm x task x split x metric: mean and SD over folds (real: seed -1, the same for every seed)."""
    folds = results[(results["fold"] >= 0) & results["metric"].isin(METRICS)].copy()
    run_of = {**dataset_of, "real": "real"}
    folds = folds[folds["data_type"].isin(run_of)]
    folds["run"] = folds["data_type"].map(run_of)
    folds["arm"] = ["real" if r == "real" else ARMS[r.rsplit("-s", 1)[0]] for r in folds["run"]]
    folds["seed"] = [-1 if r == "real" else int(r.rsplit("-s", 1)[1].split("-N")[0]) for r in folds["run"]]
    keys = ["seed", "arm", "task", "query_split", "metric"]
    return (folds.groupby(keys)["value"].agg(fold_mean="mean", fold_sd="std", folds="count").reset_index()
            .sort_values(keys, kind="stable").reset_index(drop=True))


def between_seeds(table: pd.DataFrame) -> pd.DataFrame:
    """arm x task x split x metric: mean over seeds of the fold means, between-seed SD, mean fold SD, seeds."""
    arms = table[table["seed"] >= 0]
    keys = ["arm", "task", "query_split", "metric"]
    return (arms.groupby(keys).agg(mean=("fold_mean", "mean"), between_seed_sd=("fold_mean", "std"),
                                   mean_fold_sd=("fold_sd", "mean"), seeds=("seed", "nunique")).reset_index())


def paired_over_seeds(table: pd.DataFrame) -> pd.DataFrame:
    """c-aware - non-c-aware per seed (fold means), then over seeds: mean, SD, 95 % t CI, paired t p
    (:func:`benchmarks.exp_model.paired_difference`), and a Wilcoxon p from 6 seeds on (scipy)."""
    from scipy import stats

    from benchmarks.exp_model import paired_difference

    arms = table[table["seed"] >= 0]
    wide = arms.pivot_table(index=["task", "query_split", "metric", "seed"], columns="arm", values="fold_mean")
    rows = []
    for (task, split, metric), group in wide.groupby(level=[0, 1, 2]):
        group = group.dropna(subset=list(ARMS.values()))
        a, b = group["c-aware"].to_numpy(), group["non-c-aware"].to_numpy()
        d = a - b
        n = len(d)
        row = {"task": task, "query_split": split, "metric": metric, "seeds": n,
               "mean_diff": float(d.mean()) if n else np.nan, "sd_diff": float(d.std(ddof=1)) if n > 1 else np.nan,
               "seeds_c_aware_better": int((d > 0).sum())}
        if n > 1:
            t = paired_difference(a, b)
            row.update(ci_low=t["ci95_low"], ci_high=t["ci95_high"], p_t=t["p_ttest_rel"])
        if n >= 6:
            row["p_wilcoxon"] = float(stats.wilcoxon(a, b).pvalue)
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(preset: str, seeds: list[int], draws: int, table, between, paired, seconds: float) -> str:
    def block(frame):   # a fixed-width table in a code block (tabulate, which to_markdown needs, is not installed)
        return "```\n" + frame.round(4).to_string(index=False) + "\n```" if len(frame) else "(none)"

    head = between[between["task"] == "moa"]
    return "\n".join([
        f"# Replicate training seeds ({preset} preset, seeds {seeds}, N={draws}, {seconds / 60:.1f} min)", "",
        "Between-seed SD = SD over training seeds of each seed's mean over folds; mean fold SD = the SD the "
        "evaluation reports for one trained model. mAP = per query, mAP-label = per label (the paper's).", "",
        "## MoA: mean and between-seed SD", "", block(head), "",
        "## c-aware - non-c-aware, paired over seeds", "", block(paired), "",
        "## Every task", "", block(between), "",
        "## Per seed", "", block(table), ""])


def main(argv: list[str] | None = None) -> int:
    from pipelines.storage import Lake

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("tiny", "demo"), default="tiny")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--draws", type=int, default=None, help="N per compound (default: the preset's first N)")
    parser.add_argument("--workdir", default="benchmarks/_work/exp_replicates")
    parser.add_argument("--out", default=None, help="default benchmarks/results/exp_replicates/<preset>")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("--seeds: at least 2 training seeds (3 or more for a between-seed SD worth reading)")
    from pipelines.demo import DEMO_PRESETS
    draws = args.draws or DEMO_PRESETS[args.preset].draws[0]
    out = Path(args.out or f"benchmarks/results/exp_replicates/{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    lake = Lake(str(Path(args.workdir) / args.preset))
    lake.init()
    t0 = time.time()
    runs = build_lake(lake, args.preset, args.seeds, draws)
    results, dataset_of = evaluate_all(lake, args.preset, runs)
    table = per_seed(results, dataset_of)
    between, paired = between_seeds(table), paired_over_seeds(table)
    seconds = time.time() - t0
    table.to_csv(out / "per_seed.csv", index=False)
    between.to_csv(out / "between_seeds.csv", index=False)
    paired.to_csv(out / "paired_seeds.csv", index=False)
    text = markdown(args.preset, args.seeds, draws, table, between, paired, seconds)
    (out / "exp_replicates.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
