"""``cpldm gallery``: pictures of cells for an evaluation report (the paper's Figure 3), read from the lake.

Writes under ``eval/<run>/gallery/`` (the report of evaluation run ``<run>`` links what is there):

* ``compounds.png``: real vs c-aware vs scm-free vs oracle for ``n_compounds`` compounds (one per MoA where the
  lake has MoA annotations), composites; ``compound-<k>.png``: the same rows for compound k, composite plus the
  5 channels in grey. Generated images of one compound are the same draw ``i`` of each run: with shared draws
  and one seed namespace (what the demo generates) they share noise seed, batch and well, so the rows differ by
  the generator only. The real image is a real site of the compound, normalised and cropped as ingest does
  (same batch and well as the draw when the catalog has one, else the same batch, else any), stored back to
  grey levels like a decoded image.
* ``conditions.png``: one compound under up to 4 batches x 2 wells. The trained models' rows are generated draws
  that differ in batch/well (each draw has its own noise seed); the oracle row renders every condition from one
  shared seed (:func:`pipelines.generate.oracle_image`: the simulator's cells, same seed, other confounders),
  which shows what a confounder alone does to the same cells.
* ``README.md`` (markdown: the figures with captions) and ``gallery.json`` (what each panel shows).

One contrast per channel per figure (:func:`cpldm_core.evaluation.gallery.channel_limits`), so a batch effect on
a channel's brightness stays visible.
"""
from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cpldm_core.errors import UserError
from cpldm_core.evaluation import gallery as core
from cpldm_core.evaluation.gallery import Panel
from storage_schemas.columns import DMSO_JCP2022

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GalleryConfig:
    """What ``cpldm gallery`` shows.

    Attributes:
        run: evaluation run whose report links the gallery (``eval/<run>/gallery/``).
        c_aware_run / scm_free_run / oracle_run: generation runs of each row ("" = found: an unguided run of that
            kind, the scm-free and oracle runs sharing the c-aware run's seed namespace when one does).
        n_compounds: compounds of ``compounds.png``.
        draw: which draw of each run the compound figures show.
        batches / wells: conditions of ``conditions.png`` (batches x wells per batch).
        oracle_seed: the one noise seed of the oracle row of ``conditions.png``.
    """

    run: str = "default"
    c_aware_run: str = ""
    scm_free_run: str = ""
    oracle_run: str = ""
    n_compounds: int = 4
    draw: int = 0
    batches: int = 4
    wells: int = 2
    oracle_seed: int = 0
    compounds: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------------------------- inputs
def _generation_records(lake) -> dict[str, dict]:
    """``{run: generation record}`` of every run under ``synthetic/`` with a config.json."""
    out = {}
    for path in lake.ls("synthetic"):
        name = posixpath.basename(path.rstrip("/"))
        rel = f"synthetic/{name}/config.json"
        if lake.exists(rel):
            out[name] = lake.read_json(rel).get("generation") or {}
    return out


def find_runs(lake, cfg: GalleryConfig) -> dict[str, str]:
    """``{"c-aware": run, "scm-free": run, "oracle": run}`` (a row without a run is left out)."""
    records = _generation_records(lake)

    def unguided(kind: str, oracle: bool) -> list[str]:
        def fits(g: dict) -> bool:
            # the oracle row shows the simulator's own images, not those passed through the VAE (--oracle-vae)
            return (g.get("oracle") == kind and not g.get("oracle_vae")) if oracle else \
                (g.get("model_kind") == kind and not g.get("oracle"))
        # the truth run is an oracle run too, but from its own namespace: never a gallery row
        return sorted(r for r, g in records.items() if r != "truth" and fits(g)
                      and float(g.get("guidance_scale", 1.0)) == 1.0)

    runs = {"c-aware": cfg.c_aware_run or next(iter(unguided("scm", False)), "")}
    namespace = records.get(runs["c-aware"], {}).get("seed_namespace")

    def pick(explicit: str, candidates: list[str]) -> str:
        same = [r for r in candidates if records[r].get("seed_namespace") == namespace]
        return explicit or next(iter(same or candidates), "")

    runs["scm-free"] = pick(cfg.scm_free_run, unguided("scm-free", False))
    runs["oracle"] = pick(cfg.oracle_run, unguided("c-aware", True))
    for row, name in runs.items():
        if name and name not in records:
            raise UserError(f"gallery: generation run {name!r} ({row}) is not in {lake.uri_of('synthetic')}")
    return {row: name for row, name in runs.items() if name}


def choose_compounds(lake, manifests: dict[str, pd.DataFrame], n: int, explicit=()) -> list[str]:
    """``n`` treated compounds generated in every run: one per MoA (sorted MoAs, first compound of each) when
    the lake has MoA annotations, then the rest in id order."""
    common = set.intersection(*(set(m["Metadata_JCP2022"].astype(str)) for m in manifests.values())) - {DMSO_JCP2022}
    if explicit:
        missing = sorted(set(explicit) - common)
        if missing:
            raise UserError(f"gallery: compound(s) {missing} were not generated in every run ({', '.join(manifests)})")
        return list(explicit)
    ordered = sorted(common)
    try:
        moa = lake.read_named("annotations_moa").to_pandas()
        moa = moa[moa["Metadata_JCP2022"].astype(str).isin(common)].sort_values(["Metadata_moa", "Metadata_JCP2022"])
        first = moa.drop_duplicates("Metadata_moa")["Metadata_JCP2022"].astype(str).tolist()
        ordered = first + [c for c in ordered if c not in first]
    except Exception:   # no annotations (an imported lake): compounds in id order
        pass
    return ordered[:n]


def _draw_row(manifest: pd.DataFrame, compound: str, draw: int) -> pd.Series | None:
    rows = manifest[(manifest["Metadata_JCP2022"].astype(str) == compound) & (manifest["Metadata_Replicate"] == 0)]
    if not len(rows):
        return None
    pick = rows[rows["Metadata_Draw"] == draw]
    return (pick if len(pick) else rows).iloc[0]


class _Images:
    """Generated images by (run, image row), arrays opened once."""

    def __init__(self, lake):
        self.lake, self.arrays = lake, {}

    def __call__(self, run: str, row: int) -> np.ndarray:
        from pipelines import generate
        if run not in self.arrays:
            self.arrays[run] = generate.open_images(self.lake, run)
        return np.asarray(self.arrays[run][int(row)])


def real_image(lake, sites: pd.DataFrame, reader, normalisation: dict, compound: str, source: str, batch: str,
               well: str) -> tuple[np.ndarray | None, str]:
    """A real site of ``compound`` (same source/batch/well, else same batch, else the first) as ``(5, S, S)``
    uint16 grey levels of its first crop (ingest's normalisation and crop, then denormalised), and a caption."""
    from cpldm_core.images import denormalise
    from pipelines.vae_recon import read_crops

    mine = sites[sites["Metadata_JCP2022"].astype(str) == compound]
    if not len(mine):
        return None, "no real site"
    same_batch = mine["Metadata_Batch"] == batch
    same_well = same_batch & (mine["Metadata_Source"] == source) & (mine["Metadata_Well"] == well)
    for mask in (same_well, same_batch, pd.Series(True, index=mine.index)):
        if mask.any():
            site = mine[mask].iloc[[0]].assign(Metadata_Crop=0)
            break
    crop = read_crops(reader, site)[0]
    row = site.iloc[0]
    return denormalise(crop, normalisation["low"], normalisation["high"]), f"{row.Metadata_Batch} {row.Metadata_Well}"


# ---------------------------------------------------------------------------------------------- run
def run(lake, config: GalleryConfig | None = None) -> dict:
    """Write the gallery of evaluation run ``config.run``. Returns ``{"run", "figures", "compounds", "rows",
    "dir"}``."""
    from pipelines import generate
    from pipelines.vae_recon import crop_reader

    cfg = config or GalleryConfig()
    runs = find_runs(lake, cfg)
    if not runs:
        raise UserError(f"gallery: no generation run in {lake.uri_of('synthetic')}; run `cpldm generate` first")
    manifests = {row: generate.read_manifest(lake, name) for row, name in runs.items()}
    empty = [runs[r] for r, m in manifests.items() if not len(m)]
    if empty:
        raise UserError(f"gallery: generation run(s) {empty} have no committed images")
    compounds = choose_compounds(lake, manifests, cfg.n_compounds, cfg.compounds)
    first = next(iter(runs))
    vae_id = _find_vae_id(lake, runs[first])
    cache = lake.read_json(f"latents/{vae_id}/config.json") if lake.exists(f"latents/{vae_id}/config.json") else {}
    from pipelines.ingest import read_normalisation
    norm = read_normalisation(lake, vae_id).to_dict()
    reader = crop_reader(lake, cache.get("config") or {}, norm)
    sites = lake.read_named("sites").to_pandas()
    images = _Images(lake)
    base = f"eval/{cfg.run}/gallery"
    figures, panels_info = [], []

    # --- real vs generators, per compound
    per_compound = {}
    for compound in compounds:
        anchor = _draw_row(manifests[first], compound, cfg.draw)
        rows = []
        real, caption = real_image(lake, sites, reader, norm, compound, anchor.Metadata_Source, anchor.Metadata_Batch,
                                   anchor.Metadata_Well)
        rows.append(("real", Panel(real, f"{compound}\n{caption}")))
        panels_info.append({"figure": "compounds", "compound": compound, "row": "real", "caption": caption})
        for row_name, name in runs.items():
            hit = _draw_row(manifests[row_name], compound, cfg.draw)
            cap = f"draw {hit.Metadata_Draw}\n{hit.Metadata_Batch} {hit.Metadata_Well}"
            rows.append((f"{row_name} ({name})", Panel(images(name, hit.Metadata_ImageRow), cap)))
            panels_info.append({"figure": "compounds", "compound": compound, "row": row_name, "run": name,
                                "image_row": int(hit.Metadata_ImageRow), "draw": int(hit.Metadata_Draw),
                                "batch": hit.Metadata_Batch, "well": hit.Metadata_Well, "seed": int(hit.Metadata_Seed)})
        per_compound[compound] = rows
    labels = [label for label, _ in per_compound[compounds[0]]]
    grid = [(label, [per_compound[c][i][1] for c in compounds]) for i, label in enumerate(labels)]
    limits = core.channel_limits([p.image for _, ps in grid for p in ps if p.image is not None])
    _save(lake, f"{base}/compounds.png", grid, limits=limits,
          title=f"{len(compounds)} compounds: real vs generated (draw {cfg.draw}; composites)")
    figures.append(("Real vs generated images of " + ", ".join(compounds), "gallery/compounds.png"))
    for k, compound in enumerate(compounds):
        rows = [(label, [panel]) for label, panel in per_compound[compound]]
        _save(lake, f"{base}/compound-{k}.png", rows, per_channel=True, limits=limits,
              title=f"{compound}: composite and the 5 channels")
        figures.append((f"{compound}: composite and channels DNA, ER, RNA, AGP, Mito", f"gallery/compound-{k}.png"))

    # --- one compound under several batches x wells
    compound = compounds[0]
    mine = manifests[first]
    mine = mine[(mine["Metadata_JCP2022"].astype(str) == compound) & (mine["Metadata_Replicate"] == 0)]
    conditions = pick_conditions(mine, cfg.batches, cfg.wells)
    rows = []
    for row_name in ("c-aware", "scm-free"):
        if row_name not in runs:
            continue
        man = manifests[row_name]
        panels = []
        for cond in conditions.itertuples(index=False):
            hit = man[(man["Metadata_JCP2022"].astype(str) == compound) & (man["Metadata_Draw"] == cond.Metadata_Draw)
                      & (man["Metadata_Replicate"] == 0)]
            panels.append(Panel(images(runs[row_name], hit.iloc[0].Metadata_ImageRow) if len(hit) else None,
                                f"draw {cond.Metadata_Draw}\n{cond.Metadata_Batch} {cond.Metadata_Well}"))
        rows.append((f"{row_name} (own draws)", panels))
    oracle = oracle_row(lake, cache, norm, compound, conditions, cfg.oracle_seed)
    if oracle is not None:
        rows.append((f"oracle (seed {cfg.oracle_seed})", oracle))
    _save(lake, f"{base}/conditions.png", rows,
          title=f"{compound} under {conditions['Metadata_Batch'].nunique()} batches x wells")
    figures.append((f"{compound} under several batches and wells (model rows: draws; oracle row: one shared seed)",
                    "gallery/conditions.png"))
    panels_info += [{"figure": "conditions", "compound": compound, **{k: (int(v) if isinstance(v, (np.integer,)) else v)
                     for k, v in c.items()}} for c in conditions.to_dict("records")]
    lake.write_json(f"{base}/gallery.json", {"runs": runs, "compounds": compounds, "figures": figures,
                                             "panels": panels_info, "limits": limits.tolist()})
    lake.write_bytes(f"{base}/README.md", markdown(figures, runs).encode())
    log.info("gallery %s: %d figures in %s", cfg.run, len(figures), lake.uri_of(base))
    return {"run": cfg.run, "figures": len(figures), "compounds": len(compounds), "rows": len(runs) + 1,
            "dir": lake.uri_of(base)}


def pick_conditions(draws: pd.DataFrame, n_batches: int, n_wells: int) -> pd.DataFrame:
    """Up to ``n_batches`` batches x ``n_wells`` distinct wells among a compound's draws (first draws first):
    rows [Metadata_Draw, Metadata_Source, Metadata_Batch, Metadata_Well]."""
    draws = draws.sort_values("Metadata_Draw").drop_duplicates(["Metadata_Batch", "Metadata_Well"])
    batches = list(dict.fromkeys(draws["Metadata_Batch"]))[:n_batches]
    keep = draws[draws["Metadata_Batch"].isin(batches)].groupby("Metadata_Batch", sort=False).head(n_wells)
    return keep[["Metadata_Draw", "Metadata_Source", "Metadata_Batch", "Metadata_Well"]].reset_index(drop=True)


def oracle_row(lake, cache: dict, norm: dict, compound: str, conditions: pd.DataFrame, seed: int
               ) -> list[Panel] | None:
    """The simulator's images of ``compound`` under each condition from one seed (None: not a simulated lake)."""
    from pipelines.generate import oracle_image
    from pipelines.simulate import load_world

    if not lake.exists("raw/simulation.json"):
        return None
    world = load_world(lake)
    ing = cache.get("config") or {}
    crop = (str(ing.get("crop_mode", "centre")), int(ing["crop_size"]), int(ing.get("tile_grid", 2)))
    return [Panel(oracle_image(world, compound, c.Metadata_Source, c.Metadata_Batch, c.Metadata_Well, seed, norm, crop),
                  f"seed {seed}\n{c.Metadata_Batch} {c.Metadata_Well}") for c in conditions.itertuples(index=False)]


def _find_vae_id(lake, gen_run: str) -> str:
    from pipelines.generate import _only_latent_cache
    vae_id = (lake.read_json(f"synthetic/{gen_run}/config.json").get("generation") or {}).get("vae_id")
    return str(vae_id) if vae_id else _only_latent_cache(lake)


def _save(lake, rel: str, rows, **kw) -> None:
    import io
    buffer = io.BytesIO()
    core.gallery_figure(rows, buffer, **kw)
    lake.write_bytes(rel, buffer.getvalue())


def markdown(figures: list[tuple[str, str]], runs: dict[str, str]) -> str:
    """The gallery page: one heading and image link per figure (paths relative to ``eval/<run>/``)."""
    lines = ["# Image gallery", "", "Rows: " + ", ".join(f"{k} = run `{v}`" for k, v in runs.items()) +
             "; real = a real site of the compound (ingest's crop). One contrast per channel per figure.", ""]
    for title, rel in figures:
        lines += [f"## {title}", "", f"![{title}]({posixpath.basename(rel)})", ""]
    return "\n".join(lines)


def gallery_figures(lake, run: str) -> list[tuple[str, str]]:
    """(title, path relative to ``eval/<run>/``) of the gallery figures written for evaluation ``run``."""
    rel = f"eval/{run}/gallery/gallery.json"
    if not lake.exists(rel):
        return []
    return [tuple(f) for f in json.loads(lake.read_bytes(rel)).get("figures", [])]


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    from pipelines.cli import lake_name

    p = sub.add_parser("gallery", help="images of cells for the evaluation report: real vs generated (Figure 3)",
                       description=__doc__.split("\n")[0])
    p.add_argument("--run", type=lake_name, default="default", help="evaluation run (eval/<run>/gallery/)")
    p.add_argument("--c-aware-run", default="", help="generation run of the c-aware row (default: found)")
    p.add_argument("--scm-free-run", default="", help="generation run of the scm-free row (default: found)")
    p.add_argument("--oracle-run", default="", help="generation run of the oracle row (default: found)")
    p.add_argument("--compounds", default="", help="comma-separated JCP2022 ids (default: one per MoA)")
    p.add_argument("--draw", type=int, default=0, help="draw shown in the compound figures")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from pipelines.cli import lake_from_args
    cfg = GalleryConfig(run=args.run, c_aware_run=args.c_aware_run, scm_free_run=args.scm_free_run,
                        oracle_run=args.oracle_run, draw=args.draw,
                        compounds=tuple(c for c in args.compounds.split(",") if c))
    if cfg.compounds:
        cfg = GalleryConfig(**{**cfg.__dict__, "n_compounds": len(cfg.compounds)})
    print(" ".join(f"{k}={v}" for k, v in run(lake_from_args(args), cfg).items()))
    return 0
