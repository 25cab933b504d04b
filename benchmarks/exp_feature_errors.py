"""Experiment (issue 18): where synthetic profiles lose the compound signal, per CellProfiler feature group.

Given a finished (evaluated) lake, for every data type that evaluate finds (``real``, ``vae-recon`` and
``vae-recon-<run>``, the trained arms ``c-aware-N10`` / ``non-c-aware-N10`` [``-g2``], the oracle arms) plus the
interventional ``truth`` itself, the script builds the treatment profiles that evaluate's truth recovery scores
(:func:`cpldm_core.evaluation.truth.truth_space_profiles`: the features the recipe selects on ``truth``, MAD
normalised against each plate's / draw's DMSO, clipped at the outlier threshold, mean per compound over the same
wells evaluate averages; the EvaluateConfig is the lake's EvalRun's) and compares each compound's profile with
(a) its ``real`` profile and (b) its ``truth`` profile, per feature, then per feature group
(:mod:`cpldm_core.evaluation.feature_errors`): mean absolute error (whole profile, and compound effect = profile
minus the mean compound), Pearson r across compounds of the compound effect, the effect's size relative to the
reference (below 1: the signal is shrunk), and each group's share of the total absolute error. Computed for all
compared compounds and per query split (seen / unseen compounds of the catalog's split).

    nice -n 19 python -m benchmarks.exp_feature_errors --lake /tmp/demo-lake [--name demo] [--eval-run demo]
        [--data-types real vae-recon c-aware-N10 ...] [--out benchmarks/results/exp_feature_errors] [--per-feature]

Reads the lake only. Writes ``<out>/exp_feature_errors_<name>.parquet`` (per group; ``level`` says which
grouping; seen / unseen splits at the coarse levels), with --per-feature
``<out>/exp_feature_errors_<name>_features.parquet`` (per feature, all compounds) and ``<out>/exp_feature_errors.md``
(tables for every ``<name>`` in ``<out>``, so runs on several lakes add up). --data-types takes evaluate's
data-type names or the features dataset names (``scm-N10``); default: every data type listed above.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("exp_feature_errors")

#: Groupings reported (``level`` column): CellProfiler name parts of :func:`feature_errors.feature_group`.
LEVELS = {"all": [], "module": ["module"], "channel": ["channel"], "compartment": ["compartment"],
          "module-channel": ["module", "channel"], "compartment-module": ["compartment", "module"],
          "group": ["compartment", "module", "channel"]}
#: Evaluate data types compared by default (prefixes); real-harmony / real-allwells / chemistry-nn are left out
#: (Harmony output and a neighbour's profile say nothing about what a generator loses).
DEFAULT_PREFIXES = ("real", "vae-recon", "c-aware", "non-c-aware", "oracle-")
LEFT_OUT = ("real-harmony", "real-allwells", "chemistry-nn")
#: Levels also reported per query split (seen / unseen compounds).
SPLIT_LEVELS = ("all", "module", "channel")
TRUTH = "truth"
REFERENCES = ("real", TRUTH)
GROUP_COLUMNS = ("compartment", "module", "channel")
#: Bootstrap replicates (compounds resampled) of the effect r intervals.
N_BOOT = 200
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "exp_feature_errors"


def eval_config(lake, run: str):
    """The EvaluateConfig of the lake's EvalRun ``run`` (one read of its record)."""
    from cpldm_core.configuration import from_dict
    from cpldm_core.evaluation.config import EvaluateConfig
    from storage_schemas.artifacts import EvalRun, artifact_dir, read_record

    record = read_record(lake, artifact_dir("EvalRun", run), EvalRun, run)
    return from_dict(EvaluateConfig, dict(record.config))


def pick_data_types(found: dict[str, str], wanted: list[str] | None) -> dict[str, str]:
    """``{data type: dataset}`` to compare: ``wanted`` (data-type or dataset names) or the default set; truth added.

    Raises:
        UserError: a wanted name that is neither a data type nor a dataset of the lake.
    """
    from cpldm_core.errors import UserError

    if not wanted:
        picked = {dt: ds for dt, ds in found.items() if dt.startswith(DEFAULT_PREFIXES) and dt not in LEFT_OUT}
        return {**picked, TRUTH: TRUTH}
    by_dataset = {ds: dt for dt, ds in found.items() if dt not in LEFT_OUT}
    picked = {}
    for name in wanted:
        if name == TRUTH:
            picked[TRUTH] = TRUTH
        elif name in found and name not in LEFT_OUT:
            picked[name] = found[name]
        elif name in by_dataset:
            picked[by_dataset[name]] = name
        else:
            raise UserError(f"--data-types {name}: not a data type ({', '.join(sorted(by_dataset.values()))}) "
                            f"nor a dataset ({', '.join(sorted(by_dataset))}) of the lake")
    return {**picked, TRUTH: TRUTH}   # every comparison is against the truth (and real, added by the caller)


def truth_space(con, data_type: str, dataset: str, truth, cfg, split, heldout
                ) -> tuple[np.ndarray, np.ndarray]:
    """(compound ids, (m, k) profiles) of one data type on the truth's features, averaged over the wells that
    evaluate averages (real / vae-recon: the held-out-batch rule for seen compounds; synthetic: every draw)."""
    from cpldm_core.evaluation import recipe
    from cpldm_core.evaluation.truth import truth_space_profiles
    from pipelines.evaluate import REAL, VAE_RECON, read_wells

    if data_type == TRUTH:
        return np.asarray(truth.compounds, dtype=object), np.asarray(truth.profiles, np.float32)
    meta, values, names = read_wells(con, dataset)
    is_control = recipe.control_rows(meta)
    keep = ~is_control
    if (data_type == REAL or data_type.startswith(VAE_RECON)) and heldout:   # as evaluate_data_type does
        keep, _ = recipe.heldout_profile_rows(meta, split, heldout, is_control)
    return truth_space_profiles(meta, values, names, truth.features, is_control, keep & ~is_control,
                                cfg.outlier_threshold, cfg.mad_epsilon)


def compare(profiles: dict[str, tuple[np.ndarray, np.ndarray]], features: list[str], split) -> tuple[
        pd.DataFrame, pd.DataFrame]:
    """Per-feature and per-group figures of every data type against every reference, per query split.

    The compounds compared are those every data type, real and truth profile, so (a) and (b) and every data type
    are on the same compounds. Returns (per-feature frame, per-group frame with a ``level`` column)."""
    from cpldm_core.evaluation.feature_errors import (bootstrap_effect_r, feature_errors, group_errors,
                                                      group_interval)

    common = sorted(set.intersection(*(set(ids) for ids, _ in profiles.values())))
    aligned = {}
    for dt, (ids, prof) in profiles.items():
        pos = {c: i for i, c in enumerate(ids)}
        aligned[dt] = prof[[pos[c] for c in common]].astype(np.float64)
    compounds = np.array(common, dtype=object)
    splits = {"all": np.ones(len(common), bool)}
    if split is not None:
        of = split.reindex(compounds).fillna("unseen").to_numpy()
        splits.update({s: of == s for s in sorted(set(of))})
    rows, intervals = [], []
    for name, pick in splits.items():
        for dt in profiles:
            for ref in REFERENCES:
                per = feature_errors(aligned[dt][pick], aligned[ref][pick], features)
                keys = dict(data_type=dt, reference=ref, query_split=name, n_compounds=int(pick.sum()))
                rows.append(per.assign(**keys))
                boot = bootstrap_effect_r(aligned[dt][pick], aligned[ref][pick], N_BOOT, seed=0)
                for level, cols in LEVELS.items():
                    if name != "all" and level not in SPLIT_LEVELS:
                        continue
                    labels = per[cols].agg(" ".join, axis=1).to_numpy() if cols else np.full(len(per), "all")
                    intervals.append(group_interval(boot, labels).assign(level=level, **keys))
    per_feature = pd.concat(rows, ignore_index=True)
    keys = ["data_type", "reference", "query_split", "n_compounds"]
    groups = []
    for level, cols in LEVELS.items():
        g = group_errors(per_feature, keys + cols)
        g["group"] = g[cols].agg(" ".join, axis=1) if cols else "all"
        for c in GROUP_COLUMNS:
            if c not in cols:
                g[c] = "*"
        groups.append(g.assign(level=level))
    per_group = pd.concat(groups, ignore_index=True).merge(pd.concat(intervals, ignore_index=True),
                                                           on=["level", *keys, "group"], how="left")
    # seen / unseen at the coarse levels only: their groups of a few features over ~40 compounds are noise
    per_group = per_group[(per_group["query_split"] == "all") | per_group["level"].isin(SPLIT_LEVELS)]
    first = ["level", *keys, "group", *GROUP_COLUMNS]
    return per_feature, per_group[first + [c for c in per_group.columns if c not in first]].reset_index(drop=True)


def run(lake_uri: str, name: str, eval_run: str, wanted: list[str] | None, out: Path, per_feature_table: bool = False
        ) -> pd.DataFrame:
    """Compute and write the tables of one lake (the per-feature one with ``per_feature_table``); returns the
    per-group frame."""
    from cpldm_core.errors import UserError
    from pipelines import sql
    from pipelines.evaluate import discover, load_heldout_batches, load_split, load_truth
    from pipelines.profile import read_profile_set
    from pipelines.profile_import import dataset_is_normalized
    from pipelines.storage import Lake

    t0 = time.time()
    lake = Lake(lake_uri)
    cfg = eval_config(lake, eval_run)
    con, views = sql.connect(lake)
    views = set(views)
    try:
        heldout = load_heldout_batches(lake, views)
        split = load_split(lake, views)
        # every data type of the lake, whichever the EvalRun evaluated (only its science settings are used)
        found = discover(lake, replace(cfg, data_types=()), heldout=bool(heldout), fingerprints=False)
        if "real" not in found:
            raise UserError(f"{lake.uri_of('features/well/dataset=real')}: no real profiles; run `cpldm profile`")
        picked = pick_data_types(found, wanted)
        normalized = [ds for ds in picked.values() if ds != TRUTH and dataset_is_normalized(lake, ds)]
        if normalized:   # truth_space_profiles would normalise them a second time
            raise UserError(f"dataset(s) {normalized} were imported already normalised; this comparison needs raw "
                            "features normalised like the truth")
        truth = load_truth(lake, cfg)
        if truth is None:
            raise UserError(f"{lake.uri_of('features/well/dataset=truth')}: no truth dataset; the comparison needs "
                            "`cpldm generate --oracle c-aware --run truth` and `cpldm profile --dataset truth`")
        profiles = {dt: truth_space(con, dt, ds, truth, cfg, split, heldout) for dt, ds in picked.items()}
        if "real" not in profiles:
            profiles["real"] = truth_space(con, "real", found["real"], truth, cfg, split, heldout)
    finally:
        con.close()
    log.info("%s: %d data types on %d truth features (%.1f s)", name, len(profiles), len(truth.features),
             time.time() - t0)
    per_feature, per_group = compare(profiles, truth.features, split)
    sets = {dt: read_profile_set(lake, ds).fingerprint[:12] for dt, ds in {**picked, "real": found["real"]}.items()}
    for frame in (per_feature, per_group):
        frame.insert(0, "lake", name)
        frame["dataset"] = frame["data_type"].map({**picked, "real": found["real"]})
        frame["profile_set"] = frame["data_type"].map(sets)
    out.mkdir(parents=True, exist_ok=True)
    floats = {c: "float32" for c in per_group.columns if per_group[c].dtype == np.float64}   # 7 digits suffice
    per_group.astype(floats).to_parquet(out / f"exp_feature_errors_{name}.parquet", index=False)
    if per_feature_table:
        per_feature[per_feature["query_split"] == "all"].to_parquet(
            out / f"exp_feature_errors_{name}_features.parquet", index=False)
    log.info("%s: wrote %s (%d rows) in %.1f s", name, out, len(per_group), time.time() - t0)
    return per_group


# ---------------------------------------------------------------------------------------------- report
def _order(data_types) -> list[str]:
    rank = {p: i for i, p in enumerate(("real", "vae-recon", "non-c-aware", "c-aware", "oracle-scm-free",
                                        "oracle-c-aware", TRUTH))}
    return sorted(data_types, key=lambda d: (min((i for p, i in rank.items() if d.startswith(p)), default=99), d))


def _pivot(frame: pd.DataFrame, level: str, reference: str, value: str, split: str = "all") -> pd.DataFrame:
    sub = frame[(frame["level"] == level) & (frame["reference"] == reference) & (frame["query_split"] == split)]
    table = sub.pivot_table(index="group", columns="data_type", values=value, aggfunc="first")
    table = table[[d for d in _order(table.columns)]]
    n = sub.drop_duplicates("group").set_index("group")["n_features"]
    table.insert(0, "n feat", n.reindex(table.index))
    return table


def _ci_table(frame: pd.DataFrame, reference: str, level: str, split: str = "all", min_features: int = 10
              ) -> pd.DataFrame:
    """Data types x (all features, each group of ``level`` with >= ``min_features`` features): "r [lo, hi]"
    strings of the effect r vs ``reference``."""
    sub = frame[(frame["reference"] == reference) & (frame["query_split"] == split)
                & ((frame["level"] == "all") | ((frame["level"] == level) & (frame["n_features"] >= min_features)))]
    cell = sub.assign(cell=[f"{r:.2f} [{lo:.2f}, {hi:.2f}]" for r, lo, hi in
                            sub[["effect_r", "effect_r_lo", "effect_r_hi"]].itertuples(index=False)])
    table = cell.pivot_table(index="data_type", columns="group", values="cell", aggfunc="first")
    table = table.loc[[d for d in _order(table.index) if d != reference],
                      ["all", *sorted(c for c in table.columns if c != "all")]]
    table.index.name = "data type"
    return table


def _markdown(table: pd.DataFrame, digits: int = 2) -> str:
    head = "| " + " | ".join([table.index.name or "", *map(str, table.columns)]) + " |"
    rows = [head, "|" + "---|" * (len(table.columns) + 1)]
    for idx, row in table.iterrows():
        cells = [f"{int(v)}" if col == "n feat" else f"{v:.{digits}f}" if isinstance(v, float) and np.isfinite(v)
                 else ("" if isinstance(v, float) else str(v)) for col, v in row.items()]
        rows.append("| " + " | ".join([str(idx), *cells]) + " |")
    return "\n".join(rows)


def findings(frame: pd.DataFrame, min_features: int = 10) -> list[str]:
    """One line per data type vs truth (all compounds): overall effect r and ratio, and the module x channel
    groups of >= ``min_features`` features where the compound effect is kept worst and best."""
    lines = []
    pick = (frame["reference"] == TRUTH) & (frame["query_split"] == "all")
    for dt in _order(frame["data_type"].unique()):
        if dt == TRUTH:
            continue
        mine = frame[pick & (frame["data_type"] == dt)]
        overall = mine[mine["level"] == "all"].iloc[0]
        groups = mine[(mine["level"] == "module-channel") & (mine["n_features"] >= min_features)]
        groups = groups.set_index(groups["module"] + " " + groups["channel"])
        worst, best = groups["effect_r"].idxmin(), groups["effect_r"].idxmax()
        lines.append(f"- `{dt}`: effect r {overall['effect_r']:.2f}, effect ratio {overall['effect_ratio']:.2f}; "
                     f"r lowest in {worst} ({groups.loc[worst, 'effect_r']:.2f}), highest in {best} "
                     f"({groups.loc[best, 'effect_r']:.2f})")
    return lines


def write_report(out: Path) -> Path:
    """``<out>/exp_feature_errors.md`` from every ``exp_feature_errors_<name>.parquet`` in ``out``."""
    files = sorted(p for p in out.glob("exp_feature_errors_*.parquet") if not p.stem.endswith("_features"))
    text = ["# Per-feature errors of synthetic vs real and truth profiles (issue 18)", "",
            "Written by `benchmarks/exp_feature_errors.py` (tables regenerated from the parquet files beside it).",
            "Profiles: evaluate's truth-space treatment profiles (truth-selected features, DMSO robust SD units, "
            "mean per compound). *effect* = profile minus the mean compound of its data type; `effect r` = Pearson "
            "r across compounds per feature, averaged over the group's features; `effect ratio` = mean |effect| / "
            "the reference's (< 1: the compound signal is shrunk); `share` = the group's share of the summed "
            "absolute effect error. All compounds (seen and unseen) unless said. `truth` vs truth is 0 / 1 by "
            "construction; `real` vs real likewise.", ""]
    for path in files:
        frame = pd.read_parquet(path)
        name = frame["lake"].iloc[0]
        n = int(frame.loc[frame["query_split"] == "all", "n_compounds"].iloc[0])
        text += [f"## Lake `{name}` ({n} compounds, {int(frame.loc[frame['level'] == 'all', 'n_features'].iloc[0])} "
                 "truth features)", ""]
        sets = frame.drop_duplicates("data_type").set_index("data_type")
        text += ["Data type: features dataset (ProfileSet fingerprint): " + "; ".join(
            f"`{dt}`: {sets.loc[dt, 'dataset']} ({sets.loc[dt, 'profile_set']})" for dt in _order(sets.index)) + ".",
            ""]
        overall = []
        for ref in REFERENCES:
            for value, label in (("mae", "MAE"), ("mae_effect", "effect MAE"), ("effect_r", "effect r"),
                                 ("effect_ratio", "effect ratio")):
                row = _pivot(frame, "all", ref, value).drop(columns="n feat")
                row.index = [f"{label} vs {ref}"]
                overall.append(row)
        splits = [s for s in frame["query_split"].unique() if s != "all"]
        for s in splits:
            row = _pivot(frame, "all", TRUTH, "effect_r", s).drop(columns="n feat")
            row.index = [f"effect r vs truth, {s}"]
            overall.append(row)
        table = pd.concat(overall)
        table.index.name = "all features"
        text += ["### Overall", "", _markdown(table), "",
                 f"### effect r vs truth with 95% bootstrap interval ({N_BOOT} resamples of the compounds), by "
                 "module", "", _markdown(_ci_table(frame, TRUTH, "module")), "",
                 "### the same by channel (groups of >= 10 features; `-`: AreaShape)", "",
                 _markdown(_ci_table(frame, TRUTH, "channel")), ""]
        tables = [(level, "effect_r", "effect r vs truth") for level in ("module", "channel", "compartment",
                                                                          "module-channel")]
        tables += [(level, "share_error_effect", "share of effect error vs truth") for level in
                   ("module", "module-channel")]
        for level, value, label in tables:
            t = _pivot(frame, level, TRUTH, value)
            t.index.name = level
            text += [f"### {label}, by {level}", "", _markdown(t), ""]
        t = _pivot(frame, "module", TRUTH, "effect_ratio")
        t.index.name = "module"
        text += ["### effect ratio vs truth, by module", "", _markdown(t), ""]
        t = _pivot(frame, "module", "real", "effect_r")
        t.index.name = "module"
        text += ["### effect r vs real, by module", "", _markdown(t), ""]
        text += ["### Where each data type loses the compound effect (vs truth, all compounds)", "",
                 *findings(frame), ""]
    path = out / "exp_feature_errors.md"
    path.write_text("\n".join(text))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", required=True, help="a finished, evaluated lake (read only)")
    parser.add_argument("--name", default=None, help="table name of this lake (default: the lake folder's name)")
    parser.add_argument("--eval-run", default="demo", help="EvalRun whose config builds the profiles")
    parser.add_argument("--data-types", nargs="*", default=None,
                        help="evaluate data types or features datasets (default: real, vae-recon*, trained and "
                             "oracle arms, truth)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--per-feature", action="store_true",
                        help="also write the per-feature table (all compounds; ~0.7 MB per lake)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from cpldm_core.errors import UserError
    from storage_schemas import SchemaError

    name = args.name or Path(args.lake.rstrip("/")).name
    try:
        run(args.lake, name, args.eval_run, args.data_types, args.out, args.per_feature)
    except (UserError, SchemaError) as exc:   # one line, as the CLI prints them
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(write_report(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
