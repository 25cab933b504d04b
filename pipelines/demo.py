"""``cpldm demo``: the whole method end to end on the embedded default.

simulate -> catalog -> fit-vae -> ingest -> embed -> train scm and scm-free -> generate (both models at N=10 with
and without guidance, from identical noise; the oracles; the truth run) -> vae-recon (the VAE's ceiling) -> profile
real and synthetic -> gallery (images of cells) -> evaluate -> report.

Every step calls the stage's own ``run(lake, config)`` (the same code ``cpldm <stage>`` and ``ray job submit``
run), on an in-process Ray unless ``--ray-address``/``RAY_ADDRESS`` is given. Each finished step is committed with
a marker (``_markers/demo/<step>``), so a rerun skips what is done; the stages themselves are resumable too, so an
interrupted step continues where it stopped.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Callable, Literal

from cpldm_core.configuration import config_to_dict
from cpldm_core.errors import UserError
from pipelines.progress import quiet_stage_logs, stage_line
from pipelines.storage import Lake

log = logging.getLogger(__name__)

DEMO_STAGE = "demo"


@dataclass(frozen=True)
class DemoConfig:
    """What ``cpldm demo`` runs.

    Attributes:
        preset: stage presets to use: ``tiny`` (CI, a few minutes) or ``demo`` (the embedded default).
        scenario: simulator scenario (``jump``: cpg0016-like plates and confounding; ``unconfounded``, ``no-effect``).
        seed: simulator seed.
        draws: the g-estimation sizes N generated for both models (the paper uses 10 and 100).
        oracle_draws: N of the oracle generators (the simulator as a perfect p(O | T, C)), c-aware and scm-free.
        truth_draws: N of the interventional truth run (``truth``: the c-aware oracle over p'(C), own namespace).
        oracle_vae: also render the c-aware oracle through the VAE (``oracle-c-aware-vae-N<draws>``, same draws as
            the models): a perfect generator of latents, the ceiling of either trained model; the gap between it
            and the oracle is the VAE's share, between it and a model the denoiser's.
        guidance_scale: a classifier-free guidance scale > 1 generated besides 1.0 ...
        guidance_draws: ... at these N ...
        guidance_models: ... for these models (``scm``, ``scm-free``).
        evaluation_run: name of the evaluation run (``eval/<run>/``).
        fit_vae_set: ``KEY=VALUE`` overrides of the VAE fit's stage preset (``science``: ``steps=3000``).
        ingest_set: ``KEY=VALUE`` overrides of the ingest preset (e.g. ``crop_mode=tile``: 4 crops per site).
        train_set: ``KEY=VALUE`` overrides of both models' training preset (``science``: 4x the steps, EMA 0.99,
            cosine decay: the recipe of benchmarks/exp_model.py's best arm).
    """

    preset: Literal["tiny", "demo"] = "demo"
    scenario: str = "jump"
    seed: int = 0
    draws: tuple[int, ...] = (10,)
    oracle_draws: tuple[int, ...] = (10,)
    truth_draws: int = 20
    oracle_vae: bool = True
    guidance_scale: float = 2.0
    guidance_draws: tuple[int, ...] = (10,)
    guidance_models: tuple[str, ...] = ("scm",)
    evaluation_run: str = "demo"
    fit_vae_set: tuple[str, ...] = ()
    ingest_set: tuple[str, ...] = ()
    train_set: tuple[str, ...] = ()


#: The levers that paid in issue 18's experiments (benchmarks/results/exp_vae, exp_model_vae3000): a VAE fitted
#: 10x longer and the 4x / EMA 0.99 / cosine training recipe. Too slow for the 20-minute demo on 2 cores.
SCIENCE_FIT_VAE = ("steps=3000",)
SCIENCE_TRAIN = ("max_steps=960", "ema_decay=0.99", "lr_schedule=cosine", "checkpoint_every=320", "val_every=160")

DEMO_PRESETS = {
    # CI-sized: one N per arm and no guided arms (tests/test_generate.py covers guidance); its test took 9.7 min
    # of the suite's budget on 2 cores with the guided arms
    # (and no VAE-ceiling oracle: tests/test_generate.py covers --oracle-vae)
    "tiny": DemoConfig(preset="tiny", draws=(2,), oracle_draws=(2,), truth_draws=4, guidance_draws=(),
                       oracle_vae=False),
    # the paper's N are 10 and 100; the demo generates N=10 only (with N=20 arms it took 25.5 min on 2 CPU
    # cores, over its 20-minute budget; with N=10 and both models guided, 20.8 min); the N sweep is an experiment
    # (docs/world.md). Guidance 2 for the c-aware model only (it changed neither model measurably). Truth: N=20.
    "demo": DemoConfig(preset="demo", draws=(10,), oracle_draws=(10,), truth_draws=20, guidance_draws=(10,)),
    # the demo's world and arms with the levers that paid (<= 60 min on 2 cores; docs/train.md)
    "science": DemoConfig(preset="demo", draws=(10,), oracle_draws=(10,), truth_draws=20, guidance_draws=(10,),
                          fit_vae_set=SCIENCE_FIT_VAE, train_set=SCIENCE_TRAIN),
}

MODELS = ("scm", "scm-free")


def _steps(cfg: DemoConfig) -> list[tuple[str, Callable[[Lake], dict]]]:
    """The demo's steps in order, each a (name, function of the lake) pair."""
    from pipelines import (catalog, embed, evaluate, fit_vae, gallery, generate, ingest, profile, simulate, train,
                           vae_recon)
    from cpldm_core.autoencoder import FIT_VAE_PRESETS, FitVaeConfig
    from cpldm_core.configuration import load_config
    from cpldm_core.compounds import EMBED_PRESETS
    from cpldm_core.design import generate_preset
    from cpldm_core.diffusion import TRAIN_PRESETS, TrainConfig
    from cpldm_core.evaluation.config import PRESETS as EVAL_PRESETS
    from cpldm_core.features.config import PRESETS as PROFILE_PRESETS
    from cpldm_core.images import INGEST_PRESETS, IngestConfig
    from cpldm_core.load_data import CATALOG_PRESETS
    from cpldm_core.simulate.config import simulation_config

    p = cfg.preset
    # overrides are parsed before anything runs: a bad key fails at once, naming the key
    fit_vae_config = load_config(FitVaeConfig, None, list(cfg.fit_vae_set), base=FIT_VAE_PRESETS[p])
    ingest_config = load_config(IngestConfig, None, list(cfg.ingest_set), base=INGEST_PRESETS[p])
    steps: list[tuple[str, Callable[[Lake], dict]]] = [
        ("simulate", lambda lake: simulate.run(lake, simulation_config(p, cfg.scenario, cfg.seed), preview=True)),
        ("catalog", lambda lake: catalog.run(lake, CATALOG_PRESETS[p])),
        ("fit-vae", lambda lake: fit_vae.run(lake, fit_vae_config)),
        ("ingest", lambda lake: ingest.run(lake, ingest_config)),
        ("embed", lambda lake: embed.run(lake, EMBED_PRESETS[p])),
    ]
    train_base = load_config(TrainConfig, None, list(cfg.train_set), base=TRAIN_PRESETS[p])
    for model in MODELS:
        steps.append((f"train-{model}", lambda lake, m=model: train.run(lake, replace(train_base, model=m), run=m)))
    gen_runs = []
    for n in cfg.draws:
        for model in MODELS:
            # one seed namespace per N: both models draw the same confounders and noise for (compound, i)
            gcfg = generate_preset(p, model_run=model, draws=n, seed_namespace=f"demo-N{n}")
            gen_runs.append(gcfg.run_name)
            steps.append((f"generate-{gcfg.run_name}", lambda lake, g=gcfg: generate.run(lake, g)))
    for n in cfg.guidance_draws:
        for model in cfg.guidance_models:
            # same namespace as the unguided run at this N: guided and unguided images share noise and draws
            gcfg = generate_preset(p, model_run=model, draws=n, seed_namespace=f"demo-N{n}",
                                   guidance_scale=cfg.guidance_scale)
            gen_runs.append(gcfg.run_name)
            steps.append((f"generate-{gcfg.run_name}", lambda lake, g=gcfg: generate.run(lake, g)))
    for n in cfg.oracle_draws:
        # the two oracles, then (oracle_vae) the c-aware one through the VAE, all with the models' draws
        for oracle, through_vae in (("c-aware", False), ("scm-free", False), ("c-aware", True)):
            if through_vae and not cfg.oracle_vae:
                continue
            gcfg = generate_preset(p, oracle=oracle, oracle_vae=through_vae, draws=n, seed_namespace=f"demo-N{n}")
            gen_runs.append(gcfg.run_name)
            steps.append((f"generate-{gcfg.run_name}", lambda lake, g=gcfg: generate.run(lake, g)))
    # the interventional truth: the c-aware oracle over p'(C), its own namespace (fresh cells and noise)
    truth = generate_preset(p, oracle="c-aware", draws=cfg.truth_draws, run="truth")
    gen_runs.append(truth.run_name)
    steps.append(("generate-truth", lambda lake, g=truth: generate.run(lake, g)))
    # the VAE's ceiling: the real arm's evaluated crops encoded and decoded, profiled like a generation run
    steps.append(("vae-recon", lambda lake: vae_recon.run(lake, vae_recon.PRESETS[p])))
    gen_runs.append(vae_recon.RUN)
    steps.append(("profile-real", lambda lake: profile.run(lake, PROFILE_PRESETS[p], dataset="real")))
    for gen_run in gen_runs:
        steps.append((f"profile-{gen_run}", lambda lake, d=gen_run: profile.run(lake, PROFILE_PRESETS[p], dataset=d)))
    # pictures first: the evaluation report links the gallery written under eval/<run>/gallery/
    steps.append(("gallery", lambda lake: gallery.run(lake, gallery.GalleryConfig(run=cfg.evaluation_run))))
    steps.append(("evaluate", lambda lake: evaluate.run(lake, replace(EVAL_PRESETS[p], run=cfg.evaluation_run))))
    return steps


def _brief(summary: dict) -> str:
    """One line out of a stage's summary dict: its scalar counts."""
    items = [f"{k}={v}" for k, v in summary.items() if isinstance(v, (int, float, str)) and len(str(v)) < 40]
    return ", ".join(items[:6])


class _EchoStream:
    """A write()-able stream that hands each complete line to ``echo`` (the tests' list.append)."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo, self.buffer = echo, ""

    def write(self, text: str) -> None:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self.echo(line)

    def flush(self) -> None:
        pass


def run(lake: Lake, config: DemoConfig, only: list[str] | None = None, force: bool = False,
        echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) the demo. Returns ``{"steps": [...], "evaluation": <evaluate summary dict>}``."""
    from pipelines.ray_runtime import ensure_ray

    lake.init(create_bucket=lake.is_s3)
    if force:
        lake.reset_stage(DEMO_STAGE)
    elif lake.committed_units(DEMO_STAGE) and lake.exists("demo/config.json"):
        # steps are skipped by name: a lake demoed with other settings (e.g. --preset demo, then science) would
        # silently keep the old models and claim the new recipe
        stored = {**config_to_dict(DemoConfig()), **lake.read_json("demo/config.json")["config"]}
        wanted = config_to_dict(config)
        changed = sorted(k for k in wanted if json.dumps(stored.get(k)) != json.dumps(wanted[k]))
        if changed:
            raise UserError(f"the demo in {lake.uri} was run with other {', '.join(changed)}; use a fresh --lake, "
                            "or --force to redo every step")
    lake.write_config("demo", config)
    ensure_ray()
    steps = _steps(config)
    names = [n for n, _ in steps]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise UserError(f"unknown demo step(s) {unknown}; steps are: {', '.join(names)}")
    done = lake.committed_units(DEMO_STAGE)
    records, evaluation = [], None
    t_start = time.time()
    for i, (name, func) in enumerate(steps, 1):
        if only and name not in only:
            continue
        prefix = f"[{i:2d}/{len(steps)}] {name:24s}"
        if name in done and not only:
            echo(f"{prefix} already done (committed), skipped")
            records.append({"step": name, "seconds": 0.0, "skipped": True})
            continue
        t0 = time.time()
        # one line per step: rewritten in place on a terminal (items done / total, elapsed, ETA), plain in a log
        with quiet_stage_logs(), stage_line(prefix, None if echo is print else _EchoStream(echo)) as line:
            summary = func(lake) or {}
            line.note = _brief(summary)
        seconds = time.time() - t0
        lake.commit_unit(DEMO_STAGE, name, {"seconds": seconds})
        scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, type(None)))}
        records.append({"step": name, "seconds": seconds, "skipped": False, "summary": scalars})
        if name == "evaluate":
            evaluation = summary
    if evaluation is None and lake.is_committed(DEMO_STAGE, "evaluate"):
        evaluation = _load_evaluation(lake, config)
    total = sum(r["seconds"] for r in records)
    echo(f"demo finished: {total:.0f} s of stage work this run ({time.time() - t_start:.0f} s in all); "
         f"lake {lake.uri}")
    if evaluation is not None:
        echo(format_summary(evaluation))
    lake.write_json("demo/steps.json", {"steps": records, "config": config_to_dict(config)})
    return {"steps": records, "evaluation": evaluation}


def _load_evaluation(lake: Lake, config: DemoConfig) -> dict:
    """Summary of an already committed evaluation, read back from its tables (no re-evaluation)."""
    def table(name):
        frame = lake.read_named(name).to_pandas()
        return frame[frame["run"] == config.evaluation_run].drop(columns=["run"])
    from cpldm_core.evaluation.report import summarise_recovery

    recovery = table("eval_truth_recovery")
    return {"summary": table("eval_summary"),
            "truth_recovery": summarise_recovery(recovery) if len(recovery) else recovery,
            "verdict": table("eval_verdict"), "report": lake.uri_of(f"eval/{config.evaluation_run}/report.html")}


def format_summary(evaluation: dict) -> str:
    """The demo's result table: data type x task x split, mAP and ROC-AUC (mean +- SD over folds)."""
    import pandas as pd
    lines = []
    summary = evaluation.get("summary")
    if isinstance(summary, pd.DataFrame) and len(summary):
        lines.append("\nMoA / target prediction (subprofile nearest neighbour; mean +- SD over folds):")
        lines.append(summary.to_string(index=False))
    truth = evaluation.get("truth_recovery")
    if isinstance(truth, pd.DataFrame) and len(truth):
        lines.append("\nTruth recovery (per compound: correlation of its profile with the interventional truth "
                     "profile, E over p'(C) of features | do(T); nothing fitted):")
        lines.append(truth.to_string(index=False))
    verdict = evaluation.get("verdict")
    if isinstance(verdict, pd.DataFrame) and len(verdict):
        # the headline comparisons only; every pair is in eval_paired and the report
        keep = verdict[verdict["metric"].isin(["mAP-label", "truth-pearson"]) & (verdict["task"] != "target")]
        if len(keep):
            lines.append("\nVerdicts (arm - versus, paired over folds / compounds, Holm-adjusted; MoA mAP per "
                         "label and truth recovery):")
            cols = ["arm", "versus", "task", "query_split", "metric", "difference", "ci_low", "ci_high", "p_adj",
                    "verdict"]
            lines.append(keep[cols].round(3).to_string(index=False))
    if evaluation.get("report"):
        lines.append(f"\nreport: {evaluation['report']}")
    return "\n".join(lines)


def _cmd_demo(args) -> int:
    from pipelines.cli import config_from_args, lake_from_args
    lake = lake_from_args(args)
    cfg = config_from_args(DemoConfig, DEMO_PRESETS, args)
    run(lake, cfg, only=args.only, force=args.force)
    return 0


def add_parser(sub) -> None:
    from pipelines.cli import add_config_arguments

    p = sub.add_parser("demo", help="run the whole method end to end on the embedded default (resumable)")
    add_config_arguments(p, DEMO_PRESETS, DemoConfig,
                         preset_help="tiny: CI-sized, a few minutes; demo: the embedded default (default); "
                                     "science: demo with a 10x VAE fit and 4x training (<= 60 min on 2 cores)")
    p.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (e.g. evaluate)")
    p.add_argument("--force", action="store_true", help="forget which steps are done and run them all again")
    p.set_defaults(func=_cmd_demo)
