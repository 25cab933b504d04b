"""Experiment helper (issue 18): two finished ``exp_model --seeds`` runs of different arms on the same world,
VAE and training seeds, compared per model paired by training seed (gap closed per metric: each seed's values,
means and SDs, the mean difference with its 95 % t interval and ``scipy.stats.ttest_rel``), plus the mean loss per
timestep band of each run. Writes the text it prints to ``--out`` when given.

    python -m benchmarks.exp_model_pair_arms benchmarks/results/exp_model_seeds \\
        benchmarks/results/exp_model_seeds_minsnr --out benchmarks/results/exp_model_seeds_minsnr/paired_vs_a_baseline.txt
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

GAPS = ("moa_seen_gap", "moa_unseen_gap", "target_seen_gap", "target_unseen_gap", "truth_seen_gap",
        "truth_unseen_gap")


def pair_arms(base_dir: Path, other_dir: Path) -> str:
    """Per model (``scm``, ``scm-free``): ``other`` - ``base`` gap closed, paired by training seed, in points."""
    base, other = (pd.read_parquet(Path(d) / "exp_model_arms.parquet") for d in (base_dir, other_dir))
    for d in (base, other):
        d["mean_gap"] = d[list(GAPS)].mean(axis=1)
    m = base.merge(other, on=["model", "seed"], suffixes=("_a", "_c"))
    lines = []
    for model in ("scm", "scm-free"):
        x = m[m.model == model]
        lines.append(f"{model} seeds {list(x.seed)} (a = {base_dir}, c = {other_dir})")
        for g in (*GAPS, "mean_gap"):
            d = x[g + "_c"] - x[g + "_a"]
            lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=d.std(ddof=1) / np.sqrt(len(d)))
            p = stats.ttest_rel(x[g + "_c"], x[g + "_a"]).pvalue
            seeds = {k: " / ".join(f"{v * 100:.0f}" for v in x[g + k]) for k in ("_a", "_c")}
            lines.append(f"  {g:18s} a {seeds['_a']}  c {seeds['_c']}  mean a {x[g + '_a'].mean() * 100:.0f} "
                         f"({x[g + '_a'].std() * 100:.0f}) c {x[g + '_c'].mean() * 100:.0f} "
                         f"({x[g + '_c'].std() * 100:.0f})  diff {d.mean() * 100:+.0f} [{lo * 100:+.0f}, "
                         f"{hi * 100:+.0f}] p {p:.3f}")
    bands = [k for k in other.columns if k.startswith("loss_t")]
    for name, d in (("c", other), ("a", base)):
        lines.append(f"loss per band, {name}:\n" + d.groupby("model")[bands].mean().round(2).to_string())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_dir", type=Path, help="the reference arm's exp_model --out directory (a)")
    parser.add_argument("other_dir", type=Path, help="the lever arm's exp_model --out directory (c)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    text = pair_arms(args.base_dir, args.other_dir)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
