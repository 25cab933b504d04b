"""``cpldm simulate`` end to end on the tiny preset: layout, truth recoverability, determinism, resume."""
from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy.stats import spearmanr

from cpldm_core.simulate import layout
from cpldm_core.simulate.config import simulation_config
from cpldm_core.simulate.world import PHENOTYPES
from pipelines import simulate
from pipelines.storage import Lake, open_uri
from storage_schemas import validate
from storage_schemas.columns import CHANNELS, DMSO_JCP2022

IMAGE_NAME = re.compile(r"r\d{2}c\d{2}f\d{2}p01-ch\d+sk1fk1fl1\.tiff")


def _new_local_lake(tmp_path_factory, name: str) -> Lake:
    lake = Lake(str(tmp_path_factory.mktemp(name) / "lake"))
    lake.init()
    return lake


@pytest.fixture(scope="module")
def tiny_default(tmp_path_factory, ray_cluster):
    lake = _new_local_lake(tmp_path_factory, "tiny_default")
    return lake, simulate.run(lake, simulation_config("tiny"))


@pytest.fixture(scope="module")
def tiny_unconfounded(tmp_path_factory, ray_cluster):
    lake = _new_local_lake(tmp_path_factory, "tiny_unconfounded")
    return lake, simulate.run(lake, simulation_config("tiny", "unconfounded"))


def _read_csv(lake: Lake, rel: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(lake.read_bytes(rel)), compression="gzip" if rel.endswith(".gz") else None)


def _load_data(lake: Lake) -> pd.DataFrame:
    paths = [p for p in lake.ls(layout.RAW, recursive=True) if p.endswith("/load_data.csv")]
    return pd.concat([_read_csv(lake, p) for p in sorted(paths)], ignore_index=True)


def test_layout_on_local_and_s3(lake, ray_cluster):
    # 2 plate maps per source x 4 treatment wells = 16 slots for 12 compounds + 2 shared: 2 spare DMSO wells
    cfg = dataclasses.replace(simulation_config("tiny"), plates_per_batch=2, compounds_per_moa=3)
    summary = simulate.run(lake, cfg)
    assert summary["plates"] == summary["plates_written"] == cfg.n_plates
    assert summary["sites_written"] == summary["sites_total"] == cfg.n_sites
    load_data = _load_data(lake)
    assert list(load_data.columns) == list(layout.LOAD_DATA_COLUMNS)
    assert len(load_data) == cfg.n_sites
    # every URL is a full URI into this lake, exists, and is a uint16 image of the configured size
    urls = load_data[[f"URL_Orig{c}" for c in CHANNELS]].to_numpy().ravel()
    assert all(u.startswith(lake.uri + "/raw/source_") for u in urls)
    assert all(IMAGE_NAME.fullmatch(u.rsplit("/", 1)[1]) for u in urls)
    assert all(lake.fs.exists(u[len("s3://"):] if lake.is_s3 else u) for u in urls)
    with open_uri(urls[0], lake.endpoint_url) as fh:
        img = tifffile.imread(fh)
    assert img.dtype == np.uint16 and img.shape == (cfg.image_size, cfg.image_size)
    # the channel number in each file name follows the source's channel mapping
    mapping = _read_csv(lake, layout.CHANNEL_MAPPING_CSV).set_index("Metadata_Source")
    for row in load_data.itertuples(index=False):
        for ch in CHANNELS:
            n = int(mapping.at[row.Metadata_Source, f"Metadata_Channel_Num_{ch}"])
            assert f"-ch{n}sk1" in getattr(row, f"URL_Orig{ch}")
    # JUMP metadata tables agree with each other and with load_data
    plates = _read_csv(lake, layout.PLATE_CSV)
    wells = _read_csv(lake, layout.WELL_CSV)
    compounds = _read_csv(lake, layout.COMPOUND_CSV)
    assert list(compounds.columns) == ["Metadata_JCP2022", "Metadata_InChIKey", "Metadata_InChI", "Metadata_SMILES"]
    assert set(wells["Metadata_JCP2022"]) == set(compounds["Metadata_JCP2022"])
    assert set(plates["Metadata_Plate"]) == set(load_data["Metadata_Plate"]) == set(wells["Metadata_Plate"])
    site_wells = load_data[["Metadata_Plate", "Metadata_Well"]].drop_duplicates()
    assert len(site_wells.merge(wells)) == len(wells) == len(site_wells)
    dmso_per_plate = wells.groupby("Metadata_Plate")["Metadata_JCP2022"].apply(lambda s: (s == DMSO_JCP2022).sum())
    assert (dmso_per_plate >= cfg.dmso_wells_per_plate).all()
    assert dmso_per_plate.sum() == cfg.n_plates * cfg.dmso_wells_per_plate + 2 * 2   # spare slots x replicates
    for table in ("annotations_moa", "annotations_target", "truth_compounds", "truth_confounders",
                  "simulation_positivity"):
        validate(lake.read_named(table), table)
    assert lake.read_json(layout.SIMULATION_JSON)["config"]["preset"] == "tiny"
    # rerun: every plate is committed, nothing is rewritten
    again = simulate.run(lake, cfg)
    assert again["plates_written"] == 0 and again["plates_skipped"] == cfg.n_plates


def _otsu_nuclear_area(lake: Lake) -> pd.DataFrame:
    """Per compound: mean over wells of the median Otsu nucleus area (px) on the DNA images."""
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    rows = []
    for r in _load_data(lake).itertuples(index=False):
        dna = tifffile.imread(r.URL_OrigDNA).astype(float)
        areas = [p.area for p in regionprops(label(dna > threshold_otsu(dna))) if p.area >= 10]
        rows.append((r.Metadata_Plate, r.Metadata_Well, np.median(areas)))
    measured = pd.DataFrame(rows, columns=["Metadata_Plate", "Metadata_Well", "area"])
    measured = measured.merge(_read_csv(lake, layout.WELL_CSV))
    per_compound = measured.groupby("Metadata_JCP2022")["area"].mean().reset_index()
    return per_compound.merge(lake.read_named("truth_compounds").to_pandas())


def test_nuclear_area_truth_is_recoverable(tiny_default, tiny_unconfounded):
    unconfounded = _otsu_nuclear_area(tiny_unconfounded[0])
    rho, p = spearmanr(unconfounded["area"], unconfounded["Truth_NucleusArea"])
    assert rho > 0.6 and p < 0.01
    # jump world: the pixels follow the effect under the compound's own conditions (C x T, density x T),
    # World.treatment_effect averaged over its wells, far more than its base truth; cell size by source (C->P)
    # still weakens the signal
    confounded = _otsu_nuclear_area(tiny_default[0])
    world = simulate.load_world(tiny_default[0])
    dim = PHENOTYPES.index("NucleusArea")
    effect = {jcp: np.mean([world.treatment_effect(world.compound_index(jcp), w.Metadata_Source, w.Metadata_Batch,
                                                   w.row, w.col)[dim] for w in g.itertuples()])
              for jcp, g in world.wells.groupby("Metadata_JCP2022")}
    rho_effect, _ = spearmanr(confounded["area"], confounded["Metadata_JCP2022"].map(effect))
    rho_base, _ = spearmanr(confounded["area"], confounded["Truth_NucleusArea"])
    assert 0.4 < rho_effect < rho and rho_base < rho_effect - 0.2


def test_lake_plate_maps_positivity_and_world(tiny_default):
    """The lake's plate maps are the world's; its positivity table is a naive pandas count of its JUMP
    metadata; load_world rebuilds the world (the allocation tests run on the pure world in
    test_simulate_jump.py)."""
    lake, summary = tiny_default
    world = simulate.load_world(lake)
    written = _read_csv(lake, layout.WELL_CSV)
    expected = world.wells[list(written.columns)].reset_index(drop=True)
    pd.testing.assert_frame_equal(written, expected, check_dtype=False)
    wells = written.merge(_read_csv(lake, layout.PLATE_CSV)[["Metadata_Plate", "Metadata_Batch"]])
    stats = dict(zip(*lake.read_named("simulation_positivity").to_pandas()[["statistic", "value"]].T.values))
    per_batch_well = wells.groupby(["Metadata_Batch", "Metadata_Well"])["Metadata_JCP2022"].nunique()
    per_source_well = wells.groupby(["Metadata_Source", "Metadata_Well"])["Metadata_JCP2022"].nunique()
    trt = wells[wells["Metadata_JCP2022"] != DMSO_JCP2022]
    multi = (trt.groupby("Metadata_JCP2022")["Metadata_Source"].nunique() > 1).mean()
    assert stats["compounds_per_batch_well_median"] == per_batch_well.median() == 4
    assert stats["compounds_per_batch_well_mean"] == pytest.approx(per_batch_well.mean())
    assert stats["compounds_per_batch_well_max"] == per_batch_well.max()
    assert stats["compounds_per_source_well_median"] == per_source_well.median()
    assert stats["compounds_multi_source_share"] == pytest.approx(multi)
    assert summary["positivity"]["compounds_per_batch_well_median"] == 4
    assert lake.read_json(layout.SIMULATION_JSON)["positivity"]["compounds_multi_source_share"] == pytest.approx(multi)


def test_oracle_renders_the_lakes_tiffs(tiny_default, tmp_path):
    """render_condition on the world rebuilt from the lake, with a site's stream, gives the pixels of its TIFFs."""
    from cpldm_core.errors import UserError
    from cpldm_core.simulate.oracle import render_condition, site_stream

    lake = tiny_default[0]
    world = simulate.load_world(lake)
    load_data = _load_data(lake).merge(_read_csv(lake, layout.WELL_CSV))
    for r in load_data.iloc[::31].itertuples(index=False):
        image = render_condition(world, r.Metadata_JCP2022, r.Metadata_Source, r.Metadata_Batch, r.Metadata_Well,
                                 site_stream(world, r.Metadata_Plate, r.Metadata_Well, r.Metadata_Site))
        for c, ch in enumerate(CHANNELS):
            np.testing.assert_array_equal(image[c], tifffile.imread(getattr(r, f"URL_Orig{ch}")))
    with pytest.raises(UserError, match="not simulated"):
        simulate.load_world(Lake(str(tmp_path / "empty")))


def _relative_files(lake: Lake) -> dict[str, bytes]:
    """Every file under raw/ with the lake's own URI replaced, so two lakes can be compared byte for byte."""
    out = {}
    for rel in lake.ls(layout.RAW, recursive=True):
        data = lake.read_bytes(rel)
        if rel.endswith("load_data.csv"):
            data = data.replace(lake.uri.encode(), b"<lake>")
        out[rel] = data
    return out


def test_same_seed_same_bytes_and_resume_after_kill(tmp_path_factory, tiny_default, ray_cluster):
    reference = _relative_files(tiny_default[0])
    cfg = simulation_config("tiny")
    lake = _new_local_lake(tmp_path_factory, "resumed")
    plates = [p.plate for p in layout.plate_ids(cfg.n_sources, cfg.batches_per_source, cfg.plates_per_batch)]
    # "killed" run: three plates committed, a fourth left half-written without a marker
    simulate.run(lake, cfg, plates=plates[:3])
    victim = plates[3]
    partial = next(r for r in reference if f"/{victim}/Images/" in r)
    lake.write_bytes(partial, b"truncated")
    summary = simulate.run(lake, cfg)
    assert summary["plates_written"] == len(plates) - 3 and summary["plates_skipped"] == 3
    assert _relative_files(lake) == reference
    # a different seed gives different images
    other = _new_local_lake(tmp_path_factory, "other_seed")
    simulate.run(other, dataclasses.replace(cfg, seed=1), plates=plates[:1])
    name = next(r for r in reference if r.endswith(".tiff") and f"/{plates[0]}/" in r)
    assert other.read_bytes(name) != reference[name]


def test_different_simulation_in_same_lake_is_refused(tiny_default):
    from cpldm_core.errors import UserError

    with pytest.raises(UserError, match="different simulation"):
        simulate.run(tiny_default[0], simulation_config("tiny", seed=5))


def test_cli_with_preview(tmp_path, ray_cluster, capsys):
    from pipelines.cli import main

    lake_dir = tmp_path / "cli_lake"
    rc = main(["--lake", str(lake_dir), "simulate", "--preset", "tiny", "--scenario", "unconfounded",
               "--seed", "4", "--set", "plates_per_batch=1", "--set", "compounds_per_moa=2",
               "--set", "shared_fraction=0", "--preview"])
    assert rc == 0
    assert '"compounds_per_batch_well_median": 1.0' in capsys.readouterr().out   # one plate map per batch
    png = (lake_dir / layout.PREVIEW_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    image = np.asarray(Image.open(io.BytesIO(png)))
    assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 10
    record = Lake(str(lake_dir)).read_json(layout.SIMULATION_JSON)
    assert record["seed"] == 4 and record["scenario"] == "unconfounded" and record["config"]["plates_per_batch"] == 1
    assert record["positivity"]["compounds_multi_source_share"] == 0.0
    assert main(["--lake", str(lake_dir), "simulate", "--preset", "tiny", "--set", "bogus=1"]) == 2
