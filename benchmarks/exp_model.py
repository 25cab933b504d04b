"""Experiment (issue 18): training-recipe levers of the c-aware model, measured against the oracle yardstick.

One demo-preset ``jump`` world (seed 0) is built once (or reused by path): simulate -> catalog -> fit-vae (the
demo VAE: model arms decode latents) -> ingest -> embed -> oracle c-aware generation (N=10) -> interventional
truth -> profile real, oracle and truth (``benchmarks.exp_world.run_world``). Then, per lever arm, in order:
train the c-aware (``scm``) model with the arm's ``TrainConfig`` overrides on top of the ``demo`` preset,
generate N=10 from the demo's seed namespace (``demo-N10``: the same confounder draws and noise as the oracle
arm), profile, and evaluate {real, oracle-c-aware-N10, the arm} with the demo evaluation preset (same folds for
every arm: the fold seed is the preset's). The best c-aware arm (mean gap closed) is also trained SCM-free.

Yardstick (issue 18): ``gap closed = (arm - chance) / (oracle - chance)`` for MoA and target mAP per label
(chance: the ``mAP-label-chance`` scoring of the same folds) and truth recovery (mean per-compound Pearson r,
chance 0), per query split (seen / unseen compounds).

A lake copied from an older demo run gets the artifact records that evaluate needs (GenerationRun, ProfileSet)
remade on the way; generation and profiling are resumable, so nothing finished is recomputed.

Also per arm: the v-prediction loss of the exported model per timestep band on a fixed subset of the training
latents with fixed noise (the demo world holds out no batch, so the train history has no validation loss).

    nice -n 19 python -m benchmarks.exp_model [--arms a b d] [--workdir benchmarks/_work/exp_model]
        [--copy-from /tmp/demo-lake] [--out benchmarks/results/exp_model] [--deadline-min 70]
        [--raw-bands ARM ...] [--no-scm-free] [--scm-free-arms ARM ...] [--vae-id ID] [--seeds 0 1 2]
        [--scenario unconfounded] [--vae-fit-steps 3000] [--guidance 2]
    python -m benchmarks.exp_model --interaction CONFOUNDED_OUT CONTROL_OUT --out DIR
    python -m benchmarks.exp_model --pair-arms BASE_OUT OTHER_OUT --out DIR
    python -m benchmarks.exp_model --gap-table LAKE EVAL_RUN [--out DIR] [--seed-pair SEED C_AWARE_DT SCM_FREE_DT ...]

``--scenario``: the world (``<workdir>/<scenario>-seed0``; ``unconfounded`` is the control where the two models
should not differ). ``--vae-id`` names a latent cache; one the lake lacks is made first: the demo VAE fitted for
``--vae-fit-steps`` steps, then ingest (as ``exp_vae_fit.sh`` made ``vae3000`` for the jump world).
``--interaction``: from two finished ``--seeds`` runs (confounded world, control world), whether the c-aware -
SCM-free difference differs between them (Welch), to ``<out>/exp_model_interaction.csv``.
``--guidance G``: generate every arm with classifier-free guidance G on the compound (the sampling lever; a
trained model is reused, the generation is ``<run>-N10-g<G>`` with the unguided run's noise and draws); with
another ``--out``, ``--pair-arms`` then pairs it with the unguided run.
``--pair-arms``: from two finished ``--seeds`` runs of different arms (same world, VAE and seeds), the second arm
minus the first per model, paired by training seed, to ``<out>/exp_model_pair_arms.csv``.
``--gap-table``: the gap closed to the c-aware oracle per data type of one finished evaluation run of any lake
(e.g. a demo lake's ``demo`` run, or one ``cpldm evaluate --run`` made), printed as the docs' markdown table and
written to ``<out>/gap_table_<EVAL_RUN>.csv``; with ``--seed-pair`` (repeated, one per training seed) also the
c-aware - SCM-free difference paired by seed, to ``<out>/paired_seeds_<EVAL_RUN>.csv``.

``--seeds``: replicate training seeds (TrainConfig.seed: initial weights, data order, noise; a training run
is reproducible bit for bit given its seed): each arm is trained c-aware and SCM-free per seed (runs
``...-s<k>``), and ``<out>/exp_model_paired_seeds.csv`` holds the c-aware - SCM-free gap difference paired by seed
(mean, between-seed SD, 95 % t interval, ``scipy.stats.ttest_rel``).

Writes ``<out>/exp_model_arms.parquet`` (one row per arm: metrics, gaps, train wall time, final losses),
``<out>/exp_model_bands.parquet`` (loss per timestep band per arm) and ``<out>/exp_model.md``. Rows are
appended as each arm finishes (an interrupted run keeps the finished arms); a rerun skips finished arms.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd

#: Lever arms: name -> (model kind, TrainConfig overrides on the demo preset). Order = issue 18's order.
# Arms are overrides of TRAIN_PRESETS["demo"]; the arms measured before the demo preset adopted min-SNR-5 name
# the plain loss (snr_gamma 0) so that they retrain exactly as measured.
ARMS: dict[str, dict] = {
    "a-baseline": {"snr_gamma": 0.0},
    "b-4x-ema-cosine": {"max_steps": 960, "ema_decay": 0.999, "lr_schedule": "cosine", "checkpoint_every": 320,
                        "val_every": 160, "snr_gamma": 0.0},
    # b's EMA (0.999: a ~1000-step horizon) still held ~38 % of the initial weights at step 960 (0.999^960);
    # b2 is b with an EMA whose horizon (~100 steps) fits the run
    "b2-4x-ema0.99-cosine": {"max_steps": 960, "ema_decay": 0.99, "lr_schedule": "cosine", "checkpoint_every": 320,
                             "val_every": 160, "snr_gamma": 0.0},
    # c: min-SNR-5 weighting (TrainConfig.snr_gamma, passed to v_prediction_loss) on the demo recipe, so that it
    # pairs by training seed with a-baseline (exp_model_seeds); the demo preset itself since it was adopted
    "c-minsnr5": {"snr_gamma": 5.0},
    # c2: min-SNR-5 on the b2 recipe (pairs by training seed with b2-4x-ema0.99-cosine)
    "c2-b2-minsnr5": {"max_steps": 960, "ema_decay": 0.99, "lr_schedule": "cosine", "checkpoint_every": 320,
                      "val_every": 160, "snr_gamma": 5.0},
    # e: c2 plus the two conditioning levers measured on the science lake (global condition in the timestep
    # embedding, inverted dropout 0.3 on the fingerprint bits; docs/train.md), for the unconfounded control
    "e-c2-globalcond-featdrop0.3": {"max_steps": 960, "ema_decay": 0.99, "lr_schedule": "cosine",
                                    "checkpoint_every": 320, "val_every": 160, "snr_gamma": 5.0,
                                    "global_condition": True, "compound_feature_dropout": 0.3},
    "d-4x-ema-cosine-cdrop0.4": {"max_steps": 960, "ema_decay": 0.999, "lr_schedule": "cosine",
                                 "checkpoint_every": 320, "val_every": 160, "confounder_dropout": 0.4,
                                 "snr_gamma": 0.0},
}
#: Demo steps the yardstick needs (committed in the world's lake before any arm runs).
NEEDED = ("simulate", "catalog", "fit-vae", "ingest", "embed", "generate-oracle-c-aware-N10", "generate-truth",
          "profile-real", "profile-oracle-c-aware-N10", "profile-truth")
ORACLE = "oracle-c-aware-N10"
DRAWS = 10
#: Timestep bands of the per-band loss (DDPM steps, 1000 in all): low noise ... pure noise.
BANDS = ((0, 100), (100, 300), (300, 600), (600, 900), (900, 1000))


def log(msg: str, path: Path | None) -> None:
    line = f"{time.strftime('%H:%M:%S', time.gmtime())} {msg}"
    print(line, flush=True)
    if path is not None:
        with open(path, "a") as fh:
            fh.write(line + "\n")


def ensure_world(workdir: Path, copy_from: str | None, logpath: Path | None, scenario: str = "jump") -> Path:
    """The ``scenario`` seed-0 world with the yardstick (built with exp_world.run_world, or copied from a demo
    lake; the copy is the jump world's)."""
    from pipelines.storage import Lake

    lake_dir = workdir / f"{scenario}-seed0"
    if not lake_dir.exists() and copy_from:
        log(f"copying {copy_from} -> {lake_dir}", logpath)
        workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", copy_from, str(lake_dir)], check=True)
    lake = Lake(str(lake_dir))
    if not all(lake.is_committed("demo", s) for s in NEEDED):
        from benchmarks.exp_world import run_world

        log(f"building the {scenario} world (demo VAE)", logpath)
        run_world(workdir, scenario, 0, (DRAWS,), 20, tiny_vae=False)
    # a lake made by an older cpldm has no artifact records, which evaluate now requires: remake them
    from cpldm_core.design import generate_preset

    gens = {ORACLE: generate_preset("demo", oracle="c-aware", draws=DRAWS, seed_namespace=f"demo-N{DRAWS}"),
            "truth": generate_preset("demo", oracle="c-aware", draws=20, run="truth")}
    for dataset in ("real", ORACLE, "truth"):
        ensure_records(lake, dataset, gens.get(dataset), logpath)
    return lake_dir


def ensure_vae(lake, vae_id: str, steps: int, logpath: Path | None) -> None:
    """Fit the demo VAE for ``steps`` steps as ``vae/<vae_id>`` and encode the sites into ``latents/<vae_id>``,
    unless done (what ``benchmarks/exp_vae_fit.sh`` did for the jump world: ``--vae-id vae3000``, 3000 steps)."""
    from cpldm_core.autoencoder import FIT_VAE_PRESETS
    from cpldm_core.images import INGEST_PRESETS
    from pipelines import fit_vae, ingest

    t0 = time.time()
    fit_vae.run(lake, dataclasses.replace(FIT_VAE_PRESETS["demo"], vae_id=vae_id, steps=steps))  # skipped if fitted
    ingest.run(lake, dataclasses.replace(INGEST_PRESETS["demo"], vae=vae_id, vae_id=vae_id))  # committed plates skip
    log(f"VAE {vae_id} ({steps} steps) fitted and its latents encoded (or found) in {time.time() - t0:.0f} s",
        logpath)


def ensure_records(lake, dataset: str, gcfg, logpath: Path | None) -> None:
    """Remake the GenerationRun / ProfileSet records that a lake made by an older cpldm lacks (evaluate needs
    them); generation and profiling are resumable, so finished blocks and units are not redone."""
    from cpldm_core.features.config import PRESETS as PROFILE_PRESETS
    from pipelines import generate, profile
    from storage_schemas.artifacts import ArtifactMissing

    try:
        profile.read_profile_set(lake, dataset)
        return
    except ArtifactMissing:
        pass
    if gcfg is not None:
        log(f"re-running generate {dataset} (records)", logpath)
        generate.run(lake, gcfg)
    log(f"re-profiling {dataset} (no ProfileSet record)", logpath)
    profile.run(lake, PROFILE_PRESETS["demo"], dataset=dataset)


def train_config(arm: str, model: str, vae_id: str = "", seed: int | None = None):
    """The demo preset with the arm's overrides; ``vae_id`` "" = the lake's only latent cache; ``seed`` None =
    the preset's training seed."""
    from cpldm_core.diffusion import TRAIN_PRESETS

    cfg = dataclasses.replace(TRAIN_PRESETS["demo"], model=model, vae_id=vae_id, **ARMS[arm])
    return cfg if seed is None else dataclasses.replace(cfg, seed=seed)


def run_name(arm: str, model: str, vae_id: str = "", seed: int | None = None) -> str:
    """models/<run>: ``scm-<arm>`` / ``scmfree-<arm>``, with ``-<vae id>`` when a VAE is named and ``-s<seed>``
    when a training seed is."""
    return (f"{'scm' if model == 'scm' else 'scmfree'}{'-' + vae_id if vae_id else ''}-{arm}"
            f"{'' if seed is None else f'-s{seed}'}")


def band_losses(lake, run: str, cfg, rows: int = 128, raw: bool = False) -> dict[str, float]:
    """v-MSE of the exported model of ``run`` per timestep band: ``rows`` training latents (a fixed, evenly
    spaced subset), 4 timesteps evenly spaced inside each band, fixed noise per (band, timestep). ``raw``: the
    latest checkpoint's optimised weights instead of the export (the EMA when EMA is on)."""
    import torch

    from cpldm_core.diffusion import make_scheduler, v_prediction_loss
    from pipelines.train import latents_rel, load_model, prepare_data, read_latent_rows

    data = prepare_data(lake, cfg, run)
    tbl = data.train
    take = np.linspace(0, tbl.num_rows - 1, min(rows, tbl.num_rows)).round().astype(int)
    sub = tbl.take(pa_indices(take))
    batch = read_latent_rows({"Metadata_LatentRow": sub.column("Metadata_LatentRow").to_numpy(),
                              "compound_idx": sub.column("compound_idx").to_numpy(),
                              "confounders": sub.column("confounders").to_pylist()}, lake, latents_rel(data.vae_id))
    model = load_model(lake, run)
    if raw:
        from pipelines.train import load_checkpoint_state

        model.load_state_dict(load_checkpoint_state(lake, run)["model"])
    sched = make_scheduler("ddpm", model.metadata["schedule"])
    x = torch.from_numpy(batch["latents"])
    comp = torch.from_numpy(data.pooled[batch["compound_idx"]])
    conf = torch.from_numpy(batch["confounders"]) if model.kind == "scm" else None
    out = {}
    with torch.no_grad():
        for lo, hi in BANDS:
            losses = []
            for k, t in enumerate(np.linspace(lo, hi - 1, 4).round().astype(int)):
                gen = torch.Generator().manual_seed(1000 * lo + k)
                losses.append(float(v_prediction_loss(model, x, comp, None, conf, scheduler=sched, generator=gen,
                                                      timesteps=torch.full((len(x),), int(t)))))
            out[f"t{lo}-{hi}"] = float(np.mean(losses))
    return out


def pa_indices(idx: np.ndarray):
    import pyarrow as pa

    return pa.array(idx.astype(np.int64))


def scores(lake, eval_run: str, arm_dt: str) -> dict[str, float]:
    """Arm / oracle / chance means over folds (mAP per label) and truth recovery, and the gaps closed."""
    return scores_of(lake.read_named("eval_results").to_pandas(), eval_run, arm_dt)


def gap_table(results: pd.DataFrame, eval_run: str) -> pd.DataFrame:
    """One row per data type of evaluation ``eval_run`` (an ``eval_results`` frame): :func:`scores_of` plus the
    mean of the six gaps (``mean_gap``). What docs/train.md's "gap closed" tables of whole demo lakes are made of
    (``--gap-table LAKE RUN``)."""
    run_rows = results[results["run"] == eval_run]   # select the run once, not once per data type
    if run_rows.empty:
        raise SystemExit(f"no evaluation run {eval_run!r}; runs: {sorted(results['run'].unique())}")
    rows = [{"data_type": dt, **scores_of(run_rows, eval_run, dt)} for dt in sorted(run_rows["data_type"].unique())]
    frame = pd.DataFrame(rows)
    return frame.assign(mean_gap=frame[list(GAP_METRICS)].mean(axis=1))


def seed_pairs(table: pd.DataFrame, pairs: list[tuple[str, str, str]], arm: str) -> pd.DataFrame:
    """c-aware - SCM-free gap closed paired by training seed (:func:`paired_over_seeds`) from one evaluation's
    :func:`gap_table`: ``pairs`` = [(seed, c-aware data type, SCM-free data type), ...], the models trained outside
    ``exp_model`` (e.g. with ``cpldm train --set seed=K`` into a science lake) and evaluated in one run."""
    return paired_over_seeds(seed_rows(table, pairs, arm))


def seed_rows(table: pd.DataFrame, pairs: list[tuple[str, str, str]], arm: str) -> pd.DataFrame:
    """The rows of :func:`seed_pairs` before pairing, laid out as an ``exp_model_arms.parquet`` (arm, model,
    seed, the gap metrics), so that :func:`world_interaction` can take them."""
    by_dt = table.set_index("data_type")
    rows = []
    for seed, scm_dt, free_dt in pairs:
        for model, dt in (("scm", scm_dt), ("scm-free", free_dt)):
            if dt not in by_dt.index:
                raise SystemExit(f"--seed-pair: no data type {dt!r} in the evaluation; it has {sorted(by_dt.index)}")
            rows.append({"arm": arm, "model": model, "seed": int(seed),
                         **{m: float(by_dt.loc[dt, m]) for m in GAP_METRICS}})
    return pd.DataFrame(rows)


def gap_markdown(table: pd.DataFrame) -> str:
    """:func:`gap_table` as the docs print it: value (gap closed) per metric, then the mean gap."""
    head = "| data type | " + " | ".join(m.removesuffix("_gap").replace("_", " ") for m in GAP_METRICS) + " | mean gap |"
    lines = [head, "|" + "---|" * (len(GAP_METRICS) + 2)]
    for _, r in table.iterrows():
        cells = []
        for m in GAP_METRICS:
            key = m.removesuffix("_gap")
            value = r[f"{key}_mAPlabel"] if key.startswith(("moa", "target")) else r[f"{key}_r"]
            cells.append(f"{value:.2f} ({100 * r[m]:.0f}%)")
        lines.append(f"| {r['data_type']} | " + " | ".join(cells) + f" | {100 * r['mean_gap']:.0f}% |")
    return "\n".join(lines)


def scores_of(res: pd.DataFrame, eval_run: str, arm_dt: str) -> dict[str, float]:
    """:func:`scores` of an ``eval_results`` frame: for MoA and target x seen and unseen, the mean over folds of
    ``mAP-label`` for ``arm_dt`` and the oracle and of ``mAP-label-chance``, and ``gap = (arm - chance) / (oracle -
    chance)``; for truth recovery, ``truth-pearson-mean`` of both and ``gap = arm / oracle``."""
    res = res[res["run"] == eval_run]
    row: dict[str, float] = {}
    folds = res[res["fold"] >= 0]
    for task in ("moa", "target"):
        for split in ("seen", "unseen"):
            g = folds[(folds["task"] == task) & (folds["query_split"] == split)]

            def mean(dt, metric):
                v = g.loc[(g["data_type"] == dt) & (g["metric"] == metric), "value"]
                return float(v.mean()) if len(v) else float("nan")

            arm, oracle = mean(arm_dt, "mAP-label"), mean(ORACLE, "mAP-label")
            chance = mean(arm_dt, "mAP-label-chance")
            key = f"{task}_{split}"
            row |= {f"{key}_mAPlabel": arm, f"{key}_oracle": oracle, f"{key}_chance": chance,
                    f"{key}_gap": (arm - chance) / (oracle - chance)}
    truth = res[(res["metric"] == "truth-pearson-mean")]
    for split in ("seen", "unseen"):
        t = truth[truth["query_split"] == split]
        arm = float(t.loc[t["data_type"] == arm_dt, "value"].mean())
        oracle = float(t.loc[t["data_type"] == ORACLE, "value"].mean())
        row |= {f"truth_{split}_r": arm, f"truth_{split}_oracle": oracle, f"truth_{split}_gap": arm / oracle}
    return row


def run_arm(lake, arm: str, model: str, logpath: Path | None, vae_id: str = "", seed: int | None = None,
            guidance: float = 1.0) -> dict:
    """Train, generate, profile and evaluate one arm (one training seed); returns its row. ``guidance`` > 1:
    generate with that classifier-free guidance scale on the compound (same noise and draws as unguided; a
    trained model is reused, so a guided rerun of finished arms costs generation and evaluation only)."""
    from cpldm_core.design import generate_preset
    from cpldm_core.evaluation.config import PRESETS as EVAL_PRESETS
    from cpldm_core.features.config import PRESETS as PROFILE_PRESETS
    from pipelines import evaluate, generate, profile, train

    run = run_name(arm, model, vae_id, seed)
    cfg = train_config(arm, model, vae_id, seed)
    t0 = time.time()
    if lake.exists(f"models/{run}/summary.json"):
        summary = lake.read_json(f"models/{run}/summary.json")
    else:
        summary = train.run(lake, cfg, run=run)
    t_train = time.time() - t0
    log(f"{run}: trained in {t_train:.0f} s (train wall {summary['wall_s']} s), final loss "
        f"{summary['final_loss']:.4f}", logpath)
    guided = "" if guidance == 1.0 else f"-g{guidance:g}"
    gcfg = generate_preset("demo", model_run=run, draws=DRAWS, seed_namespace=f"demo-N{DRAWS}",
                           run=f"{run}-N{DRAWS}{guided}", guidance_scale=guidance)
    t1 = time.time()
    generate.run(lake, gcfg)   # resumable: finished blocks are skipped
    t_gen = time.time() - t1
    profile.run(lake, PROFILE_PRESETS["demo"], dataset=gcfg.run_name)
    ensure_records(lake, gcfg.run_name, gcfg, logpath)
    t_prof = time.time() - t1 - t_gen
    found = evaluate.discover(lake, EVAL_PRESETS["demo"])
    arm_dt = next(dt for dt, ds in found.items() if ds == gcfg.run_name)
    eval_run = f"exp-model-{run}{guided}"
    t2 = time.time()
    evaluate.run(lake, dataclasses.replace(EVAL_PRESETS["demo"], run=eval_run, data_types=("real", ORACLE, arm_dt),
                                           report=False))
    t_eval = time.time() - t2
    hist = train.read_history(lake, run)
    tr = hist.loc[hist["split"] == "train"]
    val = hist.loc[hist["split"] == "val"]
    row = {"arm": arm, "model": model, "seed": seed, "run": run, "guidance": guidance, "data_type": arm_dt,
           "overrides": json.dumps(ARMS[arm], sort_keys=True), "steps": int(summary["steps"]),
           "train_wall_s": float(summary["wall_s"]), "generate_s": t_gen, "profile_s": t_prof, "evaluate_s": t_eval,
           "first_train_loss": float(tr["loss"].iloc[0]), "final_train_loss": float(tr["loss"].iloc[-10:].mean()),
           "final_val_loss": float(val["loss"].iloc[-1]) if len(val) else float("nan"),
           **scores(lake, eval_run, arm_dt)}
    log(f"{run}{guided}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items() if k.endswith("_gap")), logpath)
    bands = band_losses(lake, run, cfg)
    log(f"{run}: band losses {bands}", logpath)
    row |= {f"loss_{k}": v for k, v in bands.items()}
    return row


def mean_gap(row: dict | pd.Series) -> float:
    return float(np.mean([row[k] for k in row.keys() if str(k).endswith("_gap")]))


def paired_difference(x, y) -> dict:
    """``x - y`` paired element by element (one pair per training seed): seeds, mean difference, between-seed SD,
    95 % t interval, paired t-test p (``scipy.stats.ttest_rel``; NaN when the differences do not vary)."""
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    diff = x - y
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    p = stats.ttest_rel(x, y).pvalue if diff.std(ddof=1) > 0 else float("nan")
    return {"seeds": len(diff), "diff_mean": diff.mean(), "diff_sd": diff.std(ddof=1),
            "ci95_low": diff.mean() - half, "ci95_high": diff.mean() + half, "p_ttest_rel": p}


def paired_over_seeds(frame: pd.DataFrame) -> pd.DataFrame:
    """c-aware minus SCM-free gap closed, paired by training seed, per arm and gap metric (and their mean):
    :func:`paired_difference` and each model's mean and between-seed SD. Empty when no arm has both models for
    >= 2 seeds."""
    gaps = [c for c in frame.columns if c.endswith("_gap")]
    frame = frame.assign(mean_gap=frame[gaps].mean(axis=1))
    out = []
    for arm, g in frame.groupby("arm"):
        wide = g.pivot_table(index="seed", columns="model", values=[*gaps, "mean_gap"])
        if "scm" not in wide.columns.get_level_values(1) or "scm-free" not in wide.columns.get_level_values(1):
            continue
        for metric in [*gaps, "mean_gap"]:
            pair = wide[metric][["scm", "scm-free"]].dropna()
            if len(pair) < 2:
                continue
            d = paired_difference(pair["scm"], pair["scm-free"])
            out.append({"arm": arm, "metric": metric, "seeds": d.pop("seeds"), "scm_mean": pair["scm"].mean(),
                        "scm_sd": pair["scm"].std(ddof=1), "free_mean": pair["scm-free"].mean(),
                        "free_sd": pair["scm-free"].std(ddof=1), **d})
    return pd.DataFrame(out)


def arm_pairing(base: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Two ``--seeds`` runs of different arms on the same world, VAE and seeds (``exp_model_arms.parquet`` of
    each): per model and gap metric (and their mean), ``other - base`` paired by training seed
    (:func:`paired_difference`), with each run's value per seed (``base_by_seed``, ``other_by_seed``, in seed
    order) and its mean and between-seed SD."""
    gaps = [c for c in base.columns if c.endswith("_gap")]
    base, other = (f.dropna(subset=["seed"]).assign(mean_gap=f[gaps].mean(axis=1)) for f in (base, other))
    merged = base.merge(other, on=["model", "seed"], suffixes=("_base", "_other")).sort_values("seed")
    out = []
    for model, g in merged.groupby("model", sort=False):
        if len(g) < 2:
            continue
        for metric in [*gaps, "mean_gap"]:
            b, o = g[f"{metric}_base"], g[f"{metric}_other"]
            d = paired_difference(o, b)
            out.append({"model": model, "metric": metric, "seeds": d.pop("seeds"),
                        "base_by_seed": " / ".join(f"{v:.3f}" for v in b),
                        "other_by_seed": " / ".join(f"{v:.3f}" for v in o), "base_mean": b.mean(),
                        "base_sd": b.std(ddof=1), "other_mean": o.mean(), "other_sd": o.std(ddof=1), **d})
    return pd.DataFrame(out)


GAP_METRICS = ("moa_seen_gap", "moa_unseen_gap", "target_seen_gap", "target_unseen_gap", "truth_seen_gap",
               "truth_unseen_gap")


def vae_of_run(run: str, arm: str) -> str:
    """The latent cache a :func:`run_name` names ("demo": none named, the lake's only one, the demo VAE)."""
    rest = run.split("-", 1)[1]          # drop scm / scmfree
    return "demo" if rest.startswith(f"{arm}") else rest[:rest.index(f"-{arm}")]


def lever_summary(results_dir: Path) -> pd.DataFrame:
    """Every finished exp_model run under ``results_dir`` (``exp_model*/exp_model_arms.parquet``), one row per
    (run directory, latent cache, arm, model, guidance): training seeds, steps, mean train wall time (s), the mean
    over seeds of each gap closed and of their mean (``mean_gap``), and the between-seed SD of ``mean_gap`` (NaN
    for one seed). Gap closed = (arm - chance) / (oracle - chance), a fraction (0.31 = 31 %)."""
    frames = []
    for path in sorted(results_dir.glob("exp_model*/exp_model_arms.parquet")):
        f = pd.read_parquet(path)
        f = f.assign(experiment=path.parent.name, vae=[vae_of_run(r, a) for r, a in zip(f["run"], f["arm"])],
                     guidance=f["guidance"] if "guidance" in f else 1.0, mean_gap=f[list(GAP_METRICS)].mean(axis=1))
        frames.append(f)
    if not frames:
        return pd.DataFrame()
    keys = ["experiment", "vae", "arm", "model", "guidance"]
    grouped = pd.concat(frames, ignore_index=True).groupby(keys, sort=False)
    table = grouped[["steps", "train_wall_s", *GAP_METRICS, "mean_gap"]].mean()
    table.insert(0, "seeds", grouped.size())
    table["mean_gap_sd"] = grouped["mean_gap"].std(ddof=1)
    return table.reset_index()


def gap_tables_markdown(results_dir: Path) -> list[str]:
    """The RESULTS.md section of the whole-lake gap tables (``--gap-table ... --out DIR``:
    ``<results_dir>/<dir>/gap_table_<run>.csv``), one table per file; [] when there is none."""
    files = sorted(results_dir.glob("*/gap_table_*.csv"))
    if not files:
        return []
    lines = ["## Experiments: whole-lake gap tables (benchmarks/exp_model.py --gap-table)", "",
             "Gap closed to the c-aware oracle per data type of one finished evaluation run (a `cpldm demo` lake or a "
             "`cpldm evaluate --run` on it): the value (mAP per label, or mean Pearson r with the truth) and in "
             "brackets (value - chance) / (oracle - chance). One world, one training seed per model; machine, "
             "date and reading: docs/train.md and README.md.", ""]
    for path in files:
        run = path.stem.removeprefix("gap_table_")
        lines += [f"### {path.parent.name}: evaluation run `{run}`", "", gap_markdown(pd.read_csv(path)), ""]
    return lines


def levers_markdown(results_dir: Path) -> list[str]:
    """The RESULTS.md section of issue 18's levers (:func:`lever_summary`); [] when no exp_model run is there."""
    table = lever_summary(results_dir)
    if table.empty:
        return []
    head = "| experiment | VAE | arm | model | guidance | seeds | steps | train wall (s) | MoA seen | MoA unseen | " \
           "target seen | target unseen | truth seen | truth unseen | mean gap | SD between seeds |"
    lines = ["## Experiments: issue 18's training levers (benchmarks/exp_model.py)", "",
             "Gap closed to the c-aware oracle, (arm - chance) / (oracle - chance) in %, mean over training seeds "
             "(one row = one arm and model of one `exp_model` run under `benchmarks/results/<experiment>/`). "
             "Every run: the demo-preset jump world (or the unconfounded control where the directory says so), "
             "N=10, the demo evaluation folds, on a 2-core dev VM, no GPU (the `exp_model_seeds*` runs: the Intel "
             "Xeon VM, except `exp_model_seeds_unconfounded_b2_minsnr` and `exp_model_seeds_unconfounded_levers`: "
             "the AMD EPYC VM; `exp_model` and `exp_model_vae3000`: shared with other jobs, so their wall times "
             "are upper bounds). Paired comparisons, intervals and reading: docs/train.md.", "", head,
             "|" + "---|" * 5 + "---:|" * 11]
    for r in table.itertuples(index=False):
        pct = [f"{100 * getattr(r, m):.0f}" for m in (*GAP_METRICS, "mean_gap")]
        sd = "" if pd.isna(r.mean_gap_sd) else f"{100 * r.mean_gap_sd:.0f}"
        lines.append(f"| {r.experiment} | {r.vae} | {r.arm} | {r.model} | {r.guidance:g} | {r.seeds} | {r.steps:.0f} | "
                     f"{r.train_wall_s:.0f} | " + " | ".join(pct) + f" | {sd} |")
    return lines + [""]


def seed_differences(frame: pd.DataFrame) -> pd.DataFrame:
    """Per arm and training seed: c-aware minus SCM-free gap closed for every gap metric and their mean
    (``mean_gap``); rows only for seeds with both models."""
    gaps = [c for c in frame.columns if c.endswith("_gap")]
    frame = frame.dropna(subset=["seed"]).assign(mean_gap=lambda f: f[gaps].mean(axis=1))
    wide = frame.pivot_table(index=["arm", "seed"], columns="model", values=[*gaps, "mean_gap"])
    return pd.DataFrame({m: wide[m]["scm"] - wide[m]["scm-free"] for m in [*gaps, "mean_gap"]}).dropna()


def world_interaction(confounded: pd.DataFrame, control: pd.DataFrame) -> pd.DataFrame:
    """Does the c-aware - SCM-free difference depend on the world? Per arm and metric: the seed-paired
    difference in the confounded world and in the control, their difference (confounded - control) with a 95 %
    Welch interval and Welch t-test p (``scipy.stats.ttest_ind(equal_var=False)``; the worlds are different
    lakes, so seeds are not paired across them)."""
    from scipy import stats

    a, b = seed_differences(confounded), seed_differences(control)
    out = []
    for arm in sorted(set(a.index.get_level_values("arm")) & set(b.index.get_level_values("arm"))):
        for metric in a.columns:
            x, y = a.loc[arm, metric].to_numpy(), b.loc[arm, metric].to_numpy()
            if len(x) < 2 or len(y) < 2:
                continue
            vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
            se = np.sqrt(vx + vy)
            dof = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1)) if se > 0 else np.nan
            half = stats.t.ppf(0.975, dof) * se if se > 0 else np.nan
            out.append({"arm": arm, "metric": metric, "seeds_confounded": len(x), "seeds_control": len(y),
                        "diff_confounded": x.mean(), "diff_control": y.mean(), "interaction": x.mean() - y.mean(),
                        "ci95_low": x.mean() - y.mean() - half, "ci95_high": x.mean() - y.mean() + half,
                        "p_welch": stats.ttest_ind(x, y, equal_var=False).pvalue if se > 0 else np.nan})
    return pd.DataFrame(out)


def write_tables(out: Path, rows: list[dict], vae_id: str = "", scenario: str = "jump") -> None:
    frame = pd.DataFrame(rows)
    if "seed" not in frame.columns:
        frame["seed"] = np.nan
    frame.to_parquet(out / "exp_model_arms.parquet")
    gaps = [c for c in frame.columns if c.endswith("_gap")]
    show = frame[["arm", "model", "seed", "steps", "train_wall_s", "final_train_loss", *gaps,
                  *[c for c in frame.columns if c.startswith("loss_t")]]].copy()
    show["mean_gap"] = frame[gaps].mean(axis=1)
    paired = paired_over_seeds(frame.dropna(subset=["seed"]))
    if len(paired):
        paired.to_csv(out / "exp_model_paired_seeds.csv", index=False)
    with open(out / "exp_model.md", "w") as fh:
        fh.write(f"# exp_model: training-recipe levers (demo preset, {scenario} world seed 0, N=10, latents: "
                 f"{vae_id or 'the demo VAE'})\n\n")
        fh.write("gap = (arm - chance) / (oracle-c-aware-N10 - chance); mAP per label; truth: mean Pearson r "
                 "(chance 0). loss_t*: v-MSE per timestep band on 128 training latents, fixed noise.\n\n")
        fh.write("```\n" + show.round(3).to_string(index=False) + "\n```\n\n")
        if len(paired):
            fh.write("c-aware - SCM-free gap closed, paired by training seed (mean, between-seed SD, 95 % t "
                     "interval, paired t-test):\n\n```\n" + paired.round(3).to_string(index=False) + "\n```\n\n")
        fh.write("Raw values (arm, oracle, chance):\n\n```\n"
                 + frame.drop(columns=["overrides"]).round(4).T.to_string() + "\n```\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--workdir", default="benchmarks/_work/exp_model")
    parser.add_argument("--copy-from", default=None, help="a finished `cpldm demo --preset demo` lake to copy")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results/exp_model; "
                                                      "--gap-table writes a CSV only when it is given)")
    parser.add_argument("--log", default=None)
    parser.add_argument("--deadline-min", type=float, default=70.0,
                        help="start no arm after this many minutes (the SCM-free arm counts too)")
    parser.add_argument("--no-scm-free", action="store_true")
    parser.add_argument("--raw-bands", nargs="*", default=[], metavar="ARM",
                        help="also the per-band loss of these arms' last checkpoint weights (not the EMA export)")
    parser.add_argument("--vae-id", default="",
                        help="train every arm on latents/<id> (a lake with several caches, e.g. exp_vae_fit.sh's)")
    parser.add_argument("--scenario", default="jump", help="the world's scenario (unconfounded: the control)")
    parser.add_argument("--vae-fit-steps", type=int, default=3000,
                        help="fit steps of a --vae-id VAE the lake lacks (fitted, then ingested, before any arm)")
    parser.add_argument("--interaction", nargs=2, default=None, metavar=("CONFOUNDED_OUT", "CONTROL_OUT"),
                        help="only compare two finished --seeds runs (their --out dirs): does c-aware - SCM-free "
                             "differ between the worlds? writes <out>/exp_model_interaction.csv")
    parser.add_argument("--gap-table", nargs=2, default=None, metavar=("LAKE", "EVAL_RUN"),
                        help="print the gap closed per data type of a finished evaluation (e.g. a demo lake's "
                             "`demo` run) as a markdown table, and write it to OUT/gap_table_<EVAL_RUN>.csv")
    parser.add_argument("--seed-pair", nargs=3, action="append", default=None,
                        metavar=("SEED", "C_AWARE_DT", "SCM_FREE_DT"),
                        help="with --gap-table, repeated: the two models of one training seed in that evaluation; "
                             "writes the c-aware - SCM-free difference paired by seed to "
                             "OUT/paired_seeds_<EVAL_RUN>.csv")
    parser.add_argument("--control-run", default=None, metavar="CONTROL_OUT",
                        help="with --gap-table and --seed-pair: the --out dir of an exp_model --seeds run of one arm "
                             "in the control world (the same recipe); compares the seed pairs' c-aware - SCM-free "
                             "difference with that run's, to OUT/exp_model_interaction_<EVAL_RUN>.csv")
    parser.add_argument("--pair-arms", nargs=2, default=None, metavar=("BASE_OUT", "OTHER_OUT"),
                        help="two finished --seeds runs of different arms (same world, VAE, seeds): OTHER - BASE per "
                             "model, paired by seed, to <out>/exp_model_pair_arms.csv")
    parser.add_argument("--scm-free-arms", nargs="*", default=None, metavar="ARM",
                        help="train these arms SCM-free too (default: the best c-aware arm only)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="K",
                        help="replicate training seeds: every arm x both models x each seed (runs ...-s<K>), "
                             "then the c-aware - SCM-free difference paired by seed")
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="classifier-free guidance scale of every arm's generation (> 1: the sampling lever; "
                             "write to another --out, then --pair-arms against the unguided run)")
    args = parser.parse_args(argv)
    if not (np.isfinite(args.guidance) and args.guidance >= 1.0):
        parser.error(f"--guidance must be a finite number >= 1, got {args.guidance}")
    if args.control_run and not (args.gap_table and args.seed_pair):
        parser.error("--control-run compares the --seed-pair rows of a --gap-table; give both")
    if args.copy_from and args.scenario != "jump":
        parser.error("--copy-from copies a demo lake, whose world is the jump scenario's; drop it to build the "
                     f"{args.scenario} world")
    if args.gap_table:
        from cpldm_core.errors import UserError
        from pipelines.storage import Lake

        lake_uri, eval_run = args.gap_table
        try:
            results = Lake(lake_uri).read_named("eval_results").to_pandas()
        except UserError as e:   # no evaluation in that lake: one line, not a traceback
            raise SystemExit(f"--gap-table: {e}") from None
        table = gap_table(results, eval_run)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            table.to_csv(Path(args.out) / f"gap_table_{eval_run}.csv", index=False)
        print(gap_markdown(table))
        if args.seed_pair:
            paired = seed_pairs(table, args.seed_pair, arm=eval_run)
            if args.out:
                paired.to_csv(Path(args.out) / f"paired_seeds_{eval_run}.csv", index=False)
            print(paired.round(3).to_string(index=False))
            if args.control_run:
                control = pd.read_parquet(Path(args.control_run) / "exp_model_arms.parquet").dropna(subset=["seed"])
                arms = sorted(control["arm"].unique())
                if len(arms) != 1:
                    raise SystemExit(f"--control-run: {args.control_run} holds seeded runs of {len(arms)} arms "
                                     f"({', '.join(arms) or 'none'}); it must hold one, the seed pairs' recipe")
                interaction = world_interaction(seed_rows(table, args.seed_pair, arm=arms[0]), control)
                if args.out:
                    interaction.to_csv(Path(args.out) / f"exp_model_interaction_{eval_run}.csv", index=False)
                print(interaction.round(3).to_string(index=False))
        return 0
    args.out = args.out or "benchmarks/results/exp_model"
    for pairs, compare, name in ((args.interaction, world_interaction, "exp_model_interaction.csv"),
                                 (args.pair_arms, arm_pairing, "exp_model_pair_arms.csv")):
        if pairs:
            table = compare(*[pd.read_parquet(Path(d) / "exp_model_arms.parquet") for d in pairs])
            Path(args.out).mkdir(parents=True, exist_ok=True)
            table.to_csv(Path(args.out) / name, index=False)
            print(table.round(3).to_string(index=False))
            return 0
    vae_id = args.vae_id
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    t_start = time.time()
    logpath = Path(args.log) if args.log else None
    workdir, out = Path(args.workdir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from pipelines.storage import Lake

    lake = Lake(str(ensure_world(workdir, args.copy_from, logpath, args.scenario)))
    if vae_id and not lake.is_committed("fit-vae", vae_id):
        ensure_vae(lake, vae_id, args.vae_fit_steps, logpath)
    parquet = out / "exp_model_arms.parquet"
    rows = pd.read_parquet(parquet).to_dict("records") if parquet.exists() else []
    def seed_of(r: dict) -> int | None:
        return None if pd.isna(r.get("seed", np.nan)) else int(r["seed"])

    done = {(r["arm"], r["model"], seed_of(r)) for r in rows}
    for arm in args.raw_bands:  # of each --seeds run (or the unseeded one)
        raw_rows = []
        for seed in args.seeds if args.seeds is not None else [None]:
            name = run_name(arm, "scm", vae_id, seed)
            bands = band_losses(lake, name, train_config(arm, "scm", vae_id, seed), raw=True)
            log(f"{name}: band losses of the raw (non-EMA) checkpoint weights {bands}", logpath)
            raw_rows.append({"arm": arm, "seed": seed, "weights": "raw-checkpoint", **bands})
        pd.DataFrame(raw_rows).to_parquet(out / f"raw_bands_{arm}.parquet")

    def one(arm: str, model: str, seed: int | None) -> bool:
        """Run one (arm, model, seed) unless done; False once the deadline has passed."""
        if (arm, model, seed) in done:
            return True
        if (time.time() - t_start) / 60 > args.deadline_min:
            log(f"deadline: {arm} {model} seed {seed} not started", logpath)
            return False
        rows.append(run_arm(lake, arm, model, logpath, vae_id, seed, args.guidance))
        write_tables(out, rows, vae_id, args.scenario)
        return True

    if args.seeds is not None:
        # replicate training seeds: every arm, both models, seed by seed (a paired design: stop after whole pairs)
        pairs = [(seed, arm) for seed in args.seeds for arm in args.arms]
        for seed, arm in pairs:
            if not (one(arm, "scm", seed) and (args.no_scm_free or one(arm, "scm-free", seed))):
                break
    else:
        # a 4x arm takes ~4x the baseline's time: budget from the measured per-step cost
        for arm in args.arms:
            if not one(arm, "scm", None):
                break
        scm_rows = [r for r in rows if r["model"] == "scm" and seed_of(r) is None]
        if scm_rows and not args.no_scm_free:
            free_arms = args.scm_free_arms
            if free_arms is None:
                free_arms = [max(scm_rows, key=mean_gap)["arm"]]
                log(f"best c-aware arm: {free_arms[0]}; training it scm-free", logpath)
            for arm in free_arms:
                one(arm, "scm-free", None)
    log(f"done in {time.time() - t_start:.0f} s", logpath)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
