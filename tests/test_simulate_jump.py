"""The ``jump`` world: cpg0016-shaped plate maps, confounding edges that per-plate normalisation cannot remove,
positivity statistics and the oracle renderer (pure core: no Ray, no I/O)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from cpldm_core.configuration import config_to_dict
from cpldm_core.errors import UserError
from cpldm_core.simulate import layout
from cpldm_core.simulate.config import simulation_config
from cpldm_core.simulate.oracle import render_condition, render_world_site, site_stream
from cpldm_core.simulate.world import (DENSITY_EFFECT_ELASTICITY, build_world, positivity_statistics,
                                       world_from_config_dict)
from storage_schemas.columns import CHANNELS, DMSO_JCP2022


@pytest.fixture(scope="module")
def demo_world():
    return build_world(simulation_config("demo"))


@pytest.fixture(scope="module")
def tiny_world():
    return build_world(simulation_config("tiny"))


def _treatments(wells: pd.DataFrame) -> pd.DataFrame:
    return wells[wells["Metadata_JCP2022"] != DMSO_JCP2022]


def test_jump_plate_maps_are_shaped_like_cpg0016(demo_world):
    w, cfg = demo_world, demo_world.config
    trt = _treatments(w.wells)
    # a (batch, well) pair holds a median of >= 6 compounds (cpg0016 compound plates: 8); naive pandas count
    per_batch_well = w.wells.groupby(["Metadata_Source", "Metadata_Batch", "Metadata_Well"])["Metadata_JCP2022"]
    assert per_batch_well.nunique().median() >= 6
    # a shared set of 10-20 % of the compounds is screened in every source, the rest in exactly one
    n_sources = trt.groupby("Metadata_JCP2022")["Metadata_Source"].nunique()
    assert len(n_sources) == cfg.n_compounds
    assert set(n_sources.unique()) == {1, cfg.n_sources}
    shared_share = (n_sources == cfg.n_sources).mean()
    assert 0.1 <= shared_share <= 0.2
    assert set(n_sources[n_sources > 1].index) == set(w.compounds.loc[w.compounds["shared"], "Metadata_JCP2022"])
    # a compound keeps its well on all its replicate plates (in every source, for the shared set)
    assert (trt.groupby("Metadata_JCP2022")["Metadata_Well"].nunique() == 1).all()
    reps = trt.groupby(["Metadata_Source", "Metadata_JCP2022"])
    assert (reps["Metadata_Plate"].nunique() == reps.size()).all() and reps.size().min() >= cfg.replicates
    # replicates of a compound sit in different batches, so held-out batches still show it
    assert (reps["Metadata_Batch"].nunique() == cfg.batches_per_source).all()
    # every plate: the fixed DMSO wells, then distinct compounds
    for _, plate in w.wells.groupby("Metadata_Plate"):
        assert len(plate) == cfg.wells_per_plate and (plate["Metadata_JCP2022"] == DMSO_JCP2022).sum() == 4


def test_spare_slots_hold_dmso_and_sizes_are_checked():
    cfg = simulation_config("tiny", overrides=["compounds_per_moa=5"])      # 20 + 3 shared < 32 slots
    w = build_world(cfg)
    trt = _treatments(w.wells)
    assert trt["Metadata_JCP2022"].nunique() == 20
    assert (w.wells["Metadata_JCP2022"] == DMSO_JCP2022).sum() == cfg.n_plates * 2 + (32 - 23) * 2
    with pytest.raises(UserError, match="slots"):
        simulation_config("tiny", overrides=["shared_fraction=0.9"])


@pytest.mark.parametrize("preset,scenario", [("tiny", "jump"), ("demo", "jump"), ("demo", "moa-skewed")])
def test_positivity_statistics_equal_a_naive_pandas_count(preset, scenario, demo_world):
    w = demo_world if (preset, scenario) == ("demo", "jump") else build_world(simulation_config(preset, scenario))
    stats = positivity_statistics(w.wells)
    for name, keys in (("batch_well", ["Metadata_Source", "Metadata_Batch", "Metadata_Well"]),
                       ("source_well", ["Metadata_Source", "Metadata_Well"])):
        counts = w.wells.groupby(keys)["Metadata_JCP2022"].nunique()
        assert stats[f"compounds_per_{name}_median"] == counts.median()
        assert stats[f"compounds_per_{name}_mean"] == pytest.approx(counts.mean())
        assert stats[f"compounds_per_{name}_max"] == counts.max()
    sources = _treatments(w.wells).groupby("Metadata_JCP2022")["Metadata_Source"].nunique()
    assert stats["compounds_multi_source_share"] == pytest.approx((sources > 1).mean())
    assert stats["n_treatments"] == w.config.n_compounds


# ---------------------------------------------------------------------------------------------- the edges
def _first_batch(w, source: str) -> str:
    return w.confounders.loc[w.confounders["Metadata_Source"] == source, "Metadata_Batch"].iloc[0]


def _effects(w, row: int = 5, col: int = 10) -> np.ndarray:
    """(n_treatments, n_sources, k) true effects of every treatment in the first batch of every source."""
    trt = w.compounds.index[w.compounds["moa_index"] >= 0]
    sources = [layout.source_name(s) for s in range(w.config.n_sources)]
    return np.array([[w.treatment_effect(c, s, _first_batch(w, s), row, col) for s in sources] for c in trt])


def test_c_x_t_changes_the_pattern_of_a_response_not_only_its_scale():
    base = simulation_config("tiny")
    on = _effects(build_world(base))
    off = _effects(build_world(dataclasses.replace(base, c_x_t=0.0)))
    # on: the same compound moves other dimensions in another source (pattern correlation well below 1)
    pattern = np.array([np.corrcoef(e[0], e[1])[0, 1] for e in on])
    assert np.median(pattern) < 0.9 and (pattern < 0.99).all()
    # off: sources differ only by a scalar (the density interaction), so patterns agree exactly
    assert np.allclose([np.corrcoef(e[0], e[1])[0, 1] for e in off], 1.0, atol=1e-12)
    # off, and no density interaction either: the effect is the compound's truth in every source
    both_off = build_world(dataclasses.replace(base, c_x_t=0.0, c_to_p_x_t=0.0))
    trt = both_off.compounds.index[both_off.compounds["moa_index"] >= 0]
    np.testing.assert_array_equal(_effects(both_off), np.repeat(both_off.phenotype[trt][:, None], 2, axis=1))


def test_density_scales_the_treatment_effect_only_with_the_interaction_knob():
    base = dataclasses.replace(simulation_config("tiny"), c_x_t=0.0)
    for strength in (1.0, 0.0):
        w = build_world(dataclasses.replace(base, c_to_p_x_t=strength))
        c = int(w.compounds.index[w.compounds["moa_index"] >= 0][0])
        densities, norms = [], []
        for s, b in zip(w.confounders["Metadata_Source"], w.confounders["Metadata_Batch"]):
            for row, col in ((0, 0), (7, 12), (15, 23)):            # edge, centre, opposite corner
                densities.append(w.cell_density(s, b, row, col))
                norms.append(np.linalg.norm(w.treatment_effect(c, s, b, row, col)))
        densities, norms = np.array(densities), np.array(norms)
        assert densities.std() > 0.1                                  # C->P: density differs by condition
        expected = np.linalg.norm(w.phenotype[c]) * densities ** (-strength * DENSITY_EFFECT_ELASTICITY)
        np.testing.assert_allclose(norms, expected, rtol=1e-12)


def test_plate_gradient_gives_a_row_trend_in_treatment_wells_that_the_knob_controls():
    """Mean intensity per channel along the inner rows of one column (no DMSO there), same cells per well:
    the log-slope over the plate follows Truth_GradRow (+ the density gradient); off, the wells agree."""
    rows = np.arange(1, 15)
    r = 2 * rows / 15 - 1
    for strength in (1.0, 0.0):
        w = build_world(dataclasses.replace(simulation_config("tiny"), plate_gradient=strength))
        conf = w.confounders.iloc[0]
        source, batch = conf["Metadata_Source"], conf["Metadata_Batch"]
        compound = w.compounds.loc[w.compounds["moa_index"] >= 0, "Metadata_JCP2022"].iloc[0]
        means = np.array([[render_condition(w, compound, source, batch, layout.well_name(row, 11),
                                            np.random.default_rng(seed)).mean(axis=(1, 2))
                           for seed in range(3)] for row in rows]).mean(1)      # (rows, 5)
        slope = np.polyfit(r, np.log(means), 1)[0]
        predicted = np.array([conf[f"Truth_GradRow_{ch}"] for ch in CHANNELS]) + conf["Truth_DensityGradRow"]
        if strength:
            assert np.abs(predicted).max() > 0.08
            np.testing.assert_allclose(slope, predicted, atol=0.05)
            assert np.corrcoef(slope, predicted)[0, 1] > 0.9
        else:                              # every inner well of the plate renders the same pixels
            assert np.ptp(means, axis=0).max() == 0.0


# ---------------------------------------------------------------------------------------------- the oracle
def test_render_condition_is_the_simulators_site(tiny_world):
    w = tiny_world
    for well in list(w.wells.itertuples(index=False))[::17]:
        expected = render_world_site(w, well, 1)
        got = render_condition(w, well.Metadata_JCP2022, well.Metadata_Source, well.Metadata_Batch,
                               well.Metadata_Well, site_stream(w, well.Metadata_Plate, well.Metadata_Well, 1))
        assert got.dtype == np.uint16 and got.shape == (5, 64, 64)
        np.testing.assert_array_equal(got, expected)


def test_a_compounds_rendering_does_not_depend_on_where_it_was_plated(tiny_world):
    """Two worlds that differ only in their plate maps render a compound under a condition identically."""
    other = build_world(simulation_config("tiny", "moa-skewed", overrides=["shared_fraction=0.05"]))
    assert not tiny_world.wells["Metadata_JCP2022"].equals(other.wells["Metadata_JCP2022"])
    compound = tiny_world.compounds.loc[tiny_world.compounds["moa_index"] >= 0, "Metadata_JCP2022"].iloc[3]
    batch = _first_batch(tiny_world, "source_2")
    for well in ("B07", "P24"):            # wells neither world uses
        a = render_condition(tiny_world, compound, "source_2", batch, well, np.random.default_rng(11))
        b = render_condition(other, compound, "source_2", batch, well, np.random.default_rng(11))
        np.testing.assert_array_equal(a, b)
    dmso = render_condition(tiny_world, DMSO_JCP2022, "source_2", batch, "B07", np.random.default_rng(11))
    assert not np.array_equal(dmso, a)


def test_render_condition_sizes_and_errors(tiny_world):
    w = tiny_world
    batch = _first_batch(w, "source_1")
    big = render_condition(w, DMSO_JCP2022, "source_1", batch, "C05", np.random.default_rng(0), image_size=128)
    assert big.shape == (5, 128, 128) and big.dtype == np.uint16
    with pytest.raises(UserError, match="source_9"):
        render_condition(w, DMSO_JCP2022, "source_9", batch, "C05", np.random.default_rng(0))
    with pytest.raises(UserError, match="nope_batch"):
        render_condition(w, DMSO_JCP2022, "source_1", "nope_batch", "C05", np.random.default_rng(0))
    with pytest.raises(UserError, match="Q01"):
        render_condition(w, DMSO_JCP2022, "source_1", batch, "Q01", np.random.default_rng(0))
    with pytest.raises(UserError, match="JCP2022_NOPE"):
        render_condition(w, "JCP2022_NOPE", "source_1", batch, "C05", np.random.default_rng(0))


def test_world_from_config_dict_round_trips_and_refuses_old_records(tiny_world):
    again = world_from_config_dict(config_to_dict(tiny_world.config))
    pd.testing.assert_frame_equal(again.wells, tiny_world.wells)
    np.testing.assert_array_equal(again.phenotype, tiny_world.phenotype)
    np.testing.assert_array_equal(again.response, tiny_world.response)
    old = {k: v for k, v in config_to_dict(tiny_world.config).items() if k not in ("c_x_t", "plate_gradient")}
    with pytest.raises(UserError, match="c_x_t, plate_gradient"):
        world_from_config_dict(old)
