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
    cfg = dataclasses.replace(simulation_config("tiny"), plates_per_batch=1, compounds_per_moa=3)
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
    assert (wells.groupby("Metadata_Plate")["Metadata_JCP2022"].apply(lambda s: (s == DMSO_JCP2022).sum())
            == cfg.dmso_wells_per_plate).all()
    for table in ("annotations_moa", "annotations_target", "truth_compounds", "truth_confounders"):
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
    # with source-dependent cell size (C->P) the signal is still there, but weaker
    confounded = _otsu_nuclear_area(tiny_default[0])
    rho_c, _ = spearmanr(confounded["area"], confounded["Truth_NucleusArea"])
    assert 0.2 < rho_c < rho


def test_allocation_in_written_lake_follows_scenario(tiny_default, tiny_unconfounded):
    """The lake's plate maps are the world's (the chi-square power test runs on the demo world in
    test_simulate_world.py; tiny has too few wells for significance)."""
    from scipy.stats import chi2_contingency

    from cpldm_core.simulate.world import build_world

    def moa_source_table(lake):
        wells = _read_csv(lake, layout.WELL_CSV).merge(lake.read_named("annotations_moa").to_pandas())
        return pd.crosstab(wells["Metadata_moa"], wells["Metadata_Source"])

    world = build_world(simulation_config("tiny"))
    written = _read_csv(tiny_default[0], layout.WELL_CSV)
    expected = world.wells[list(written.columns)].reset_index(drop=True)
    pd.testing.assert_frame_equal(written, expected, check_dtype=False)
    p_default = chi2_contingency(moa_source_table(tiny_default[0])).pvalue
    p_unconfounded = chi2_contingency(moa_source_table(tiny_unconfounded[0])).pvalue
    assert p_default < p_unconfounded


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


def test_cli_with_preview(tmp_path, ray_cluster):
    from pipelines.cli import main

    lake_dir = tmp_path / "cli_lake"
    rc = main(["--lake", str(lake_dir), "simulate", "--preset", "tiny", "--scenario", "unconfounded",
               "--seed", "4", "--set", "plates_per_batch=1", "--set", "compounds_per_moa=3", "--preview"])
    assert rc == 0
    png = (lake_dir / layout.PREVIEW_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    image = np.asarray(Image.open(io.BytesIO(png)))
    assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 10
    record = Lake(str(lake_dir)).read_json(layout.SIMULATION_JSON)
    assert record["seed"] == 4 and record["scenario"] == "unconfounded" and record["config"]["plates_per_batch"] == 1
    assert main(["--lake", str(lake_dir), "simulate", "--preset", "tiny", "--set", "bogus=1"]) == 2
