"""The simulated world's causal structure, checked on the pure core (no Ray, no I/O)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2_contingency

from cpldm_core.errors import UserError
from cpldm_core.simulate.config import PRESETS, simulation_config
from cpldm_core.simulate.library import load_library
from cpldm_core.simulate.oracle import render_world_site
from cpldm_core.simulate.render import render_site
from cpldm_core.simulate.world import PHENOTYPES, TRUTH_COLUMNS, build_world, plate_positions
from storage_schemas.columns import DMSO_JCP2022


@pytest.fixture(scope="module")
def demo_world():
    return build_world(simulation_config("demo"))


@pytest.fixture(scope="module")
def demo_world_skewed():
    return build_world(simulation_config("demo", "moa-skewed"))


def test_presets_and_overrides():
    assert PRESETS["benchmark"].n_sites >= 100_000
    tiny = simulation_config("tiny", seed=3, overrides=["image_size=96", "t_to_p=0.5"])
    assert (tiny.seed, tiny.image_size, tiny.t_to_p, tiny.preset) == (3, 96, 0.5, "tiny")
    off = simulation_config("tiny", "unconfounded")
    assert off.c_to_t == off.c_to_o == off.c_to_p == off.c_x_t == off.plate_gradient == off.c_to_p_x_t == 0.0
    assert simulation_config("tiny", "default") == simulation_config("tiny")      # old name of jump
    assert simulation_config("tiny").scenario == "jump" and simulation_config("tiny").c_to_t == 0.0
    with pytest.raises(UserError, match="nope"):
        simulation_config("tiny", overrides=["nope=1"])
    with pytest.raises(UserError, match="scenario"):
        simulation_config("tiny", "sideways")
    with pytest.raises(UserError, match="slots"):  # too many compounds for the plates
        simulation_config("tiny", overrides=["compounds_per_moa=50"])


def test_library_is_packaged_with_dmso():
    lib = load_library()
    assert 1_000 <= len(lib) <= 3_000
    assert lib["Metadata_JCP2022"].is_unique and lib["Metadata_InChIKey"].str.len().eq(27).all()
    dmso = lib[lib["Metadata_JCP2022"] == DMSO_JCP2022].iloc[0]
    assert dmso["Metadata_SMILES"] == "CS(C)=O"


def _tanimoto_reference(smiles_a: str, smiles_b: str) -> float:
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fa, fb = (gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in (smiles_a, smiles_b))
    return DataStructs.TanimotoSimilarity(fa, fb)


def test_moa_follows_structure_and_labels_are_usable(demo_world):
    w = demo_world
    trt = w.compounds[w.compounds["Metadata_pert_type"] == "trt"].reset_index(drop=True)
    counts = trt["Metadata_moa"].value_counts()
    assert len(counts) == 8 and counts.min() >= 6  # evaluation picks 5 reference compounds per MoA
    # structure: compounds of one MoA are more alike than compounds of different MoAs (RDKit reference)
    within, between = [], []
    rng = np.random.default_rng(0)
    for _ in range(300):
        i, j = rng.choice(len(trt), size=2, replace=False)
        sim = _tanimoto_reference(trt.at[i, "Metadata_SMILES"], trt.at[j, "Metadata_SMILES"])
        (within if trt.at[i, "Metadata_moa"] == trt.at[j, "Metadata_moa"] else between).append(sim)
    assert len(within) > 10 and np.mean(within) > np.mean(between) + 0.15
    # targets: multi-label and partly shared across MoAs
    t = w.targets.merge(trt[["Metadata_JCP2022", "Metadata_moa"]])
    assert t.groupby("Metadata_JCP2022").size().max() >= 2
    assert t.groupby("Metadata_target")["Metadata_moa"].nunique().max() >= 2
    assert set(t["Metadata_JCP2022"]) == set(trt["Metadata_JCP2022"])
    # truth: DMSO has no effect; compounds of one MoA share their effect more than across MoAs
    truth = w.truth_compounds().set_index("Metadata_JCP2022")
    assert list(truth.columns[1:]) == list(TRUTH_COLUMNS)
    assert np.allclose(truth.loc[DMSO_JCP2022, list(TRUTH_COLUMNS)].to_numpy(float), 0.0)
    x = truth.loc[trt["Metadata_JCP2022"], list(TRUTH_COLUMNS)].to_numpy(float)
    centroid = pd.DataFrame(x).groupby(trt["Metadata_moa"].to_numpy()).transform("mean").to_numpy()
    assert np.sum((x - centroid) ** 2) < 0.5 * np.sum((x - x.mean(0)) ** 2)


def _moa_by_source(world) -> pd.DataFrame:
    wells = world.wells.merge(world.compounds[["Metadata_JCP2022", "Metadata_moa"]])
    wells = wells[wells["Metadata_JCP2022"] != DMSO_JCP2022]
    return pd.crosstab(wells["Metadata_moa"], wells["Metadata_Source"])


def test_source_assignment_follows_moa_only_with_the_skew_knob(demo_world, demo_world_skewed):
    # jump: cpg0016 assigns compounds to sources independently of their MoA
    assert chi2_contingency(_moa_by_source(demo_world)).pvalue > 0.01
    # c_to_t = 1 (moa-skewed): per-source MoA preferences
    assert chi2_contingency(_moa_by_source(demo_world_skewed)).pvalue < 1e-3


def test_plates_dmso_positions_and_replicates(demo_world):
    w = demo_world
    cfg = w.config
    _, dmso = plate_positions(cfg)
    dmso_wells = {f"{chr(65 + r)}{c + 1:02d}" for r, c in dmso}
    for _, plate in w.wells.groupby("Metadata_Plate"):
        assert len(plate) == cfg.wells_per_plate and plate["Metadata_Well"].is_unique
        assert set(plate.loc[plate["Metadata_JCP2022"] == DMSO_JCP2022, "Metadata_Well"]) == dmso_wells
    reps = w.wells[w.wells["Metadata_JCP2022"] != DMSO_JCP2022].groupby("Metadata_JCP2022").size()
    assert len(reps) == cfg.n_compounds and reps.min() >= cfg.replicates
    # replicates of a compound sit on different plates
    trt = w.wells[w.wells["Metadata_JCP2022"] != DMSO_JCP2022]
    assert not trt.duplicated(["Metadata_Plate", "Metadata_JCP2022"]).any()


def test_edge_strength_zero_means_no_edge():
    cfg = simulation_config("tiny")
    off_world = build_world(dataclasses.replace(cfg, c_to_o=0.0, c_to_p=0.0, plate_gradient=0.0, c_x_t=0.0,
                                                t_to_p=0.0))
    off = off_world.confounders
    gains = off[[c for c in off.columns if c.startswith("Truth_Gain_")]].to_numpy()
    assert np.allclose(gains, 1.0)
    assert np.allclose(off[["Truth_CellDensity", "Truth_CellSize", "Truth_EdgeIntensity"]].to_numpy(), 1.0)
    assert np.allclose(off["Truth_IllumAmplitude"], 0.0)
    gradients = off[[c for c in off.columns if "Grad" in c]].to_numpy()
    assert gradients.shape[1] == 13 and np.all(gradients == 0.0)
    assert np.all(off_world.response == np.eye(len(PHENOTYPES)))
    on = build_world(cfg).confounders
    assert on["Truth_Gain_DNA"].nunique() == len(on) and on["Truth_CellDensity"].std() > 0.05
    assert on["Truth_GradRow_DNA"].std() > 0.02 and on["Truth_DensityGradCol"].abs().max() > 0.02
    no_effect = build_world(dataclasses.replace(cfg, t_to_p=0.0))
    assert np.all(no_effect.phenotype == 0.0)


def _render(z, **kw):
    args = dict(image_size=96, cell_diameter_px=24.0, cells_per_site=10.0, cell_variability=0.1,
                photons_per_unit=400.0, gain=np.ones(5), blur=0.6, background=0.02, read_noise=0.005,
                illum_amplitude=0.0, illum_centre=(0.0, 0.0), cell_density=1.0, cell_size=1.0)
    args.update(kw)
    return render_site(np.random.default_rng(7), z, **args)


def test_render_is_deterministic_16bit_and_phenotype_driven():
    from skimage.filters import threshold_otsu

    z = np.zeros(len(PHENOTYPES))
    a, b = _render(z), _render(z)
    assert a.dtype == np.uint16 and a.shape == (5, 96, 96) and np.array_equal(a, b)
    nuclei = a[0] > threshold_otsu(a[0])
    # compartments: RNA and DNA overlap in nuclei; ER/Mito/AGP live mostly outside them
    assert a[2][nuclei].mean() > a[2][~nuclei].mean()
    # a positive NucleusArea shift gives a larger Otsu nuclear area, same random stream
    big = z.copy()
    big[PHENOTYPES.index("NucleusArea")] = 2.0
    assert (_render(big)[0] > threshold_otsu(_render(big)[0])).sum() > 1.3 * nuclei.sum()
    # gain is a C->O confounder: scales intensity, not the segmentation
    bright = _render(z, gain=np.full(5, 2.0))
    assert 1.7 < bright[0].astype(float).mean() / a[0].astype(float).mean() < 2.3


def test_world_site_rendering_is_order_independent():
    w = build_world(simulation_config("tiny"))
    wells = list(w.wells.itertuples(index=False))
    first = render_world_site(w, wells[3], 1)
    for well in wells[:3]:
        render_world_site(w, well, 1)
    assert np.array_equal(first, render_world_site(w, wells[3], 1))
    assert not np.array_equal(first, render_world_site(w, wells[4], 1))
