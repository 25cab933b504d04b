"""The g-estimation design (pure): uniform and independent of the compound, stratified, streamed, seeded."""
from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cpldm_core.design import (
    DESIGN_COLUMNS, ConfounderSpace, DesignSpec, GenerateConfig, derive_seed, generate_preset, wells_from_vocab,
)
from cpldm_core.errors import UserError

SOURCES = ("source_1", "source_2", "source_3")
BATCHES = tuple((s, f"{s}_batch{k}") for s in SOURCES for k in range(2))        # 6 batches over 3 sources
WELLS = wells_from_vocab(rows=["A", "B", "C"], columns=[1, 2, 3, 4])           # 12 wells
SPACE = ConfounderSpace(BATCHES, WELLS)
COMPOUNDS = tuple(f"JCP2022_{k:06d}" for k in range(40))


def full(spec: DesignSpec) -> pd.DataFrame:
    return pd.concat(spec.iter_blocks(), ignore_index=True)


def independence_pvalues(frame: pd.DataFrame, factor: str, levels) -> tuple[float, float]:
    """(uniformity p, independence-of-compound p): chi-square goodness of fit of the factor's marginal
    against uniform over ``levels``, and chi-square test of the compound x factor contingency table."""
    table = pd.crosstab(frame["Metadata_JCP2022"], frame[factor]).reindex(columns=list(levels), fill_value=0)
    uniform_p = stats.chisquare(table.sum(axis=0).to_numpy()).pvalue
    observed = table.loc[:, table.sum(axis=0) > 0]   # chi2_contingency needs positive margins
    independence_p = stats.chi2_contingency(observed.to_numpy()).pvalue
    return float(uniform_p), float(independence_p)


def confounded_training_frame(seed: int = 0, images_per_compound: int = 60) -> pd.DataFrame:
    """The training distribution of a confounded lake (C -> T): each compound is screened by one source
    only, and within it lands mostly in one batch and a few fixed plate-map wells."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, compound in enumerate(COMPOUNDS):
        source = SOURCES[k % len(SOURCES)]
        own = [b for s, b in BATCHES if s == source]
        for _ in range(images_per_compound):
            batch = own[0] if rng.random() < 0.7 else own[1]
            well = WELLS[(3 * k + rng.integers(0, 2)) % len(WELLS)]
            rows.append((compound, source, batch, well))
    return pd.DataFrame(rows, columns=["Metadata_JCP2022", "Metadata_Source", "Metadata_Batch", "Metadata_Well"])


@pytest.mark.parametrize("kind", ["uniform", "stratified"])
def test_confounders_uniform_and_independent_of_compound(kind):
    design = full(DesignSpec("scm-N60", COMPOUNDS, 60, SPACE, kind=kind, block_size=50))
    for factor, levels in (("Metadata_Batch", [b for _, b in SPACE.batches]), ("Metadata_Well", SPACE.wells)):
        uniform_p, independence_p = independence_pvalues(design, factor, levels)
        assert uniform_p > 1e-3, (factor, uniform_p)
        assert independence_p > 1e-3, (factor, independence_p)
    # the source is the drawn batch's source
    lookup = dict((b, s) for s, b in BATCHES)
    assert (design["Metadata_Batch"].map(lookup) == design["Metadata_Source"]).all()


def test_same_chi_square_rejects_a_confounded_training_distribution():
    training = confounded_training_frame()
    for factor, levels in (("Metadata_Batch", [b for _, b in SPACE.batches]), ("Metadata_Well", SPACE.wells),
                           ("Metadata_Source", SOURCES)):
        _, independence_p = independence_pvalues(training, factor, levels)
        assert independence_p < 1e-6, (factor, independence_p)


def test_stratified_uses_every_stratum_equally_often_per_compound():
    spec = DesignSpec("strat", COMPOUNDS[:5], 12, SPACE, kind="stratified", block_size=7)
    design = full(spec)
    batch_counts = pd.crosstab(design["Metadata_JCP2022"], design["Metadata_Batch"])
    assert (batch_counts.to_numpy() == 12 // len(BATCHES)).all()
    well_counts = pd.crosstab(design["Metadata_JCP2022"], design["Metadata_Well"])
    assert (well_counts.to_numpy() == 1).all()
    # N not a multiple of the strata: counts differ by at most one
    design = full(DesignSpec("strat", COMPOUNDS[:5], 8, SPACE, kind="stratified"))
    counts = pd.crosstab(design["Metadata_JCP2022"], design["Metadata_Batch"]).to_numpy()
    assert counts.max() - counts.min() <= 1 and counts.sum() == 5 * 8


def test_rows_are_compound_major_and_seeds_follow_the_documented_hash():
    spec = DesignSpec("scm-N3", ("JCP2022_b", "JCP2022_a"), 3, SPACE, block_size=4)
    design = full(spec)
    assert list(design.columns) == list(DESIGN_COLUMNS)
    assert design["Metadata_DesignRow"].tolist() == list(range(6))
    assert design["Metadata_JCP2022"].tolist() == ["JCP2022_a"] * 3 + ["JCP2022_b"] * 3
    assert design["Metadata_Draw"].tolist() == [0, 1, 2, 0, 1, 2]
    assert design["Metadata_Block"].tolist() == [0, 0, 0, 0, 1, 1]
    # reference: BLAKE2b-64 of "namespace<US>compound<US>draw<US>noise", little endian, masked to int63
    for row in design.itertuples():
        key = "\x1f".join(["scm-N3", row.Metadata_JCP2022, str(row.Metadata_Draw), "noise"]).encode()
        ref = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)
        assert row.Metadata_Seed == ref
    assert derive_seed("x", "y", 1) != derive_seed("x", "y", 2)
    assert design["Metadata_Seed"].nunique() == 6 and (design["Metadata_Seed"] >= 0).all()


def test_design_does_not_depend_on_block_size_or_order():
    a = full(DesignSpec("run", COMPOUNDS[:9], 7, SPACE, block_size=5)).drop(columns="Metadata_Block")
    b = full(DesignSpec("run", COMPOUNDS[:9], 7, SPACE, block_size=64)).drop(columns="Metadata_Block")
    pd.testing.assert_frame_equal(a, b)
    spec = DesignSpec("run", COMPOUNDS[:9], 7, SPACE, block_size=5)
    backwards = pd.concat(spec.iter_blocks(reversed(range(spec.n_blocks)))).sort_values("Metadata_DesignRow")
    pd.testing.assert_frame_equal(backwards.reset_index(drop=True).drop(columns="Metadata_Block"), a)
    parts = list(spec.iter_parts(part_rows=12))
    stacked = pd.concat([f for _, f in parts], ignore_index=True)
    assert stacked["Metadata_DesignRow"].tolist() == list(range(spec.n_rows))     # no gaps, no duplicates
    # a different namespace gives different noise and confounders
    other = full(DesignSpec("other", COMPOUNDS[:9], 7, SPACE))
    assert (other["Metadata_Seed"] != a["Metadata_Seed"]).all()


def test_shared_seed_shares_noise_and_confounders_across_compounds():
    design = full(DesignSpec("shared", COMPOUNDS[:6], 5, SPACE, shared_seed=True))
    per_draw = design.groupby("Metadata_Draw")[["Metadata_Seed", "Metadata_Batch", "Metadata_Well"]].nunique()
    assert (per_draw.to_numpy() == 1).all()
    assert design.groupby("Metadata_Draw")["Metadata_Seed"].first().nunique() == 5
    independent = full(DesignSpec("shared", COMPOUNDS[:6], 5, SPACE, shared_seed=False))
    assert independent["Metadata_Seed"].nunique() == 30


def test_streaming_memory_is_bounded_by_the_block():
    # 200,000 compounds x 1,000 draws = 200 million rows; streaming a few blocks must stay small
    compounds = tuple(f"JCP2022_{k:07d}" for k in range(200_000))
    spec = DesignSpec("big", compounds, 1000, SPACE, block_size=256)
    assert spec.n_rows == 200_000_000
    tracemalloc.start()
    for frame, _ in zip(spec.iter_blocks(range(spec.n_blocks - 3, spec.n_blocks)), range(3)):
        assert len(frame) == 256
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 5e6, peak
    assert frame["Metadata_DesignRow"].iloc[-1] == spec.n_rows - 1


def test_bad_inputs_raise_user_errors():
    with pytest.raises(UserError, match="several sources"):
        ConfounderSpace((("source_1", "B1"), ("source_2", "B1")), WELLS)
    with pytest.raises(UserError, match="no training batches"):
        ConfounderSpace((), WELLS)
    with pytest.raises(UserError, match="draws"):
        DesignSpec("r", COMPOUNDS, 0, SPACE)
    with pytest.raises(UserError, match="no compounds"):
        DesignSpec("r", (), 3, SPACE)
    with pytest.raises(UserError, match="unknown generate preset"):
        generate_preset("huge")
    assert generate_preset("demo", draws=30).run_name == "scm-N30"
    assert GenerateConfig(model_run="scm-free", draws=10).namespace == "scm-free-N10"
