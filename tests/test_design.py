"""The g-estimation design (pure): the observed confounder support, uniform and independent of the compound,
shared draws with per-draw DMSO plates, stratified, streamed, seeded."""
from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cpldm_core.design import (
    DESIGN_COLUMNS, NEGCON_JCP2022, ConfounderSpace, DesignSpec, GenerateConfig, compound_supports,
    confounder_support, derive_seed, generate_preset,
)
from cpldm_core.errors import UserError

SOURCES = ("source_1", "source_2", "source_3")
BATCHES = tuple((s, f"{s}_batch{k}") for s in SOURCES for k in range(2))        # 6 batches over 3 sources
WELLS = tuple(f"{r}{c:02d}" for r in "ABC" for c in range(1, 5))                # 12 wells
GRID = tuple((s, b, w) for s, b in BATCHES for w in WELLS)                       # 72 combinations
SPACE = ConfounderSpace(GRID)
COMPOUNDS = tuple(f"JCP2022_{k:06d}" for k in range(40))


def full(spec: DesignSpec) -> pd.DataFrame:
    return pd.concat(spec.iter_blocks(), ignore_index=True)


def independence_pvalues(frame: pd.DataFrame, factor, levels) -> tuple[float, float]:
    """(uniformity p, independence-of-compound p): chi-square goodness of fit of the factor's marginal
    against uniform over ``levels``, and chi-square test of the compound x factor contingency table."""
    values = frame[factor].astype(str).agg("/".join, axis=1) if isinstance(factor, list) else frame[factor]
    table = pd.crosstab(frame["Metadata_JCP2022"], values).reindex(columns=list(levels), fill_value=0)
    uniform_p = stats.chisquare(table.sum(axis=0).to_numpy()).pvalue
    observed = table.loc[:, table.sum(axis=0) > 0]   # chi2_contingency needs positive margins
    independence_p = stats.chi2_contingency(observed.to_numpy()).pvalue
    return float(uniform_p), float(independence_p)


def confounded_sites(seed: int = 0) -> pd.DataFrame:
    """A JUMP-like catalog: each compound in one source, a few fixed wells, two batches per source (one held
    out), DMSO in its own wells (some of them DMSO-only), repeated sites per well."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, compound in enumerate(COMPOUNDS):
        source = SOURCES[k % len(SOURCES)]
        for _, batch in (b for b in BATCHES if b[0] == source):
            for _ in range(rng.integers(1, 4)):
                well = WELLS[(3 * k + rng.integers(0, 2)) % 10]              # wells A01..C02 hold treatments
                rows += [(source, batch, well, compound, "trt")] * 2       # 2 sites per well
    for source, batch in BATCHES:
        for well in ("C03", "C04", "A01"):                                 # C03, C04: DMSO-only wells
            rows.append((source, batch, well, NEGCON_JCP2022, "negcon"))
    return pd.DataFrame(rows, columns=["Metadata_Source", "Metadata_Batch", "Metadata_Well", "Metadata_JCP2022",
                                       "Metadata_pert_type"])


def test_support_equals_the_naive_set_of_observed_treatment_combinations():
    sites = confounded_sites()
    train = {b for _, b in BATCHES if b.endswith("0")}
    seen = set(COMPOUNDS[::2])
    got = confounder_support(sites, train, compounds=seen)
    naive = {(r.Metadata_Source, r.Metadata_Batch, r.Metadata_Well) for r in sites.itertuples()
             if r.Metadata_Batch in train and r.Metadata_JCP2022 in seen and r.Metadata_JCP2022 != NEGCON_JCP2022}
    assert set(map(tuple, got.itertuples(index=False))) == naive and len(got) == len(naive)
    assert list(got.columns) == ["Metadata_Source", "Metadata_Batch", "Metadata_Well"]
    assert not got["Metadata_Well"].isin(["C03", "C04"]).any()         # DMSO-only wells are not in the support
    # the vocabulary grid (every batch x every well) is far larger than what was observed
    assert len(got) < len(train) * len(WELLS)


def test_joint_and_independent_supports():
    support = confounder_support(confounded_sites(), {b for _, b in BATCHES})
    joint, independent = ConfounderSpace.from_table(support), ConfounderSpace.from_table(support, "independent")
    observed = set(map(tuple, support.itertuples(index=False)))
    assert set(joint.values) == observed
    batches = {(s, b) for s, b, _ in observed}
    wells = {w for _, _, w in observed}
    assert set(independent.values) == {(s, b, w) for s, b in batches for w in wells}
    assert len(independent.values) > len(joint.values)               # pairs no batch ever held are possible
    for kind, space in (("joint", joint), ("independent", independent)):
        design = full(DesignSpec(f"sup-{kind}", COMPOUNDS[:20], 200, space, shared_draws=False, block_size=97))
        drawn = set(zip(design["Metadata_Source"], design["Metadata_Batch"], design["Metadata_Well"]))
        assert drawn <= set(space.values)


@pytest.mark.parametrize("support", ["joint", "independent"])
@pytest.mark.parametrize("kind", ["uniform", "stratified"])
def test_design_is_uniform_over_the_support_and_independent_of_compound(kind, support):
    space = ConfounderSpace.from_table(confounder_support(confounded_sites(), {b for _, b in BATCHES}), support)
    design = full(DesignSpec("scm-N60", COMPOUNDS, 60, space, kind=kind, shared_draws=False, block_size=50))
    design = design[design["Metadata_JCP2022"] != NEGCON_JCP2022]
    cols = ["Metadata_Source", "Metadata_Batch", "Metadata_Well"]
    levels = ["/".join(v) for v in space.values]
    if support == "joint":
        uniform_p, independence_p = independence_pvalues(design, cols, levels)
        assert uniform_p > 1e-3 and independence_p > 1e-3, (uniform_p, independence_p)
    for factor, lv in (("Metadata_Batch", [b for _, b in space.batches]), ("Metadata_Well", space.wells)):
        if support == "joint":
            # marginals of a joint draw follow the support's counts, not uniform: test independence only
            _, independence_p = independence_pvalues(design, factor, lv)
        else:
            uniform_p, independence_p = independence_pvalues(design, factor, lv)
            assert uniform_p > 1e-3, (factor, uniform_p)
        assert independence_p > 1e-3, (factor, independence_p)
    lookup = {b: s for s, b in space.batches}
    assert (design["Metadata_Batch"].map(lookup) == design["Metadata_Source"]).all()


def test_same_chi_square_rejects_a_confounded_training_distribution():
    training = confounded_sites()
    training = training[training["Metadata_JCP2022"] != NEGCON_JCP2022]
    for factor, levels in (("Metadata_Batch", [b for _, b in BATCHES]), ("Metadata_Well", WELLS),
                           ("Metadata_Source", SOURCES)):
        _, independence_p = independence_pvalues(training, factor, levels)
        assert independence_p < 1e-6, (factor, independence_p)


def test_shared_draws_one_seed_batch_well_per_draw_and_dmso_plates():
    compounds = COMPOUNDS[:6] + (NEGCON_JCP2022,)
    spec = DesignSpec("shared", compounds, 5, SPACE, dmso_per_draw=8, block_size=7)
    design = full(spec)
    assert spec.n_rows == 6 * 5 + 5 * 8 == len(design)
    # every compound and DMSO replicate 0 of draw i: the same seed, batch and well
    first = design[design["Metadata_Replicate"] == 0]
    per_draw = first.groupby("Metadata_Draw")[["Metadata_Seed", "Metadata_Source", "Metadata_Batch",
                                               "Metadata_Well"]].nunique()
    assert (per_draw.to_numpy() == 1).all()
    assert set(first.groupby("Metadata_Draw")["Metadata_JCP2022"].nunique()) == {7}
    assert first.groupby("Metadata_Draw")["Metadata_Seed"].first().nunique() == 5
    # dmso_per_draw DMSO images per draw: same confounders as the draw, each its own seed
    dmso = design[design["Metadata_JCP2022"] == NEGCON_JCP2022]
    assert dmso.groupby("Metadata_Draw").size().tolist() == [8] * 5
    assert (dmso.groupby("Metadata_Draw")[["Metadata_Batch", "Metadata_Well"]].nunique().to_numpy() == 1).all()
    assert dmso["Metadata_Seed"].nunique() == 40
    merged = dmso.merge(first[first["Metadata_JCP2022"] == COMPOUNDS[0]], on="Metadata_Draw")
    assert (merged["Metadata_Well_x"] == merged["Metadata_Well_y"]).all()
    # DMSO rows come last: draw-major, replicate-minor
    assert dmso["Metadata_DesignRow"].tolist() == list(range(30, 70))
    assert dmso["Metadata_Replicate"].tolist() == list(range(8)) * 5
    # the per-compound mode keys everything by compound
    per_compound = full(DesignSpec("shared", compounds, 5, SPACE, shared_draws=False))
    assert per_compound["Metadata_Seed"].nunique() == 6 * 5 + 5 * 8


def test_rows_are_compound_major_and_seeds_follow_the_documented_hash():
    spec = DesignSpec("scm-N3", ("JCP2022_b", "JCP2022_a"), 3, SPACE, shared_draws=False, block_size=4)
    design = full(spec)
    assert list(design.columns) == list(DESIGN_COLUMNS)
    assert design["Metadata_DesignRow"].tolist() == list(range(6))
    assert design["Metadata_JCP2022"].tolist() == ["JCP2022_a"] * 3 + ["JCP2022_b"] * 3
    assert design["Metadata_Draw"].tolist() == [0, 1, 2, 0, 1, 2]
    assert design["Metadata_Block"].tolist() == [0, 0, 0, 0, 1, 1]
    # reference: BLAKE2b-64 of "namespace<US>key<US>draw<US>noise", little endian, masked to int63
    for row in design.itertuples():
        key = "\x1f".join(["scm-N3", row.Metadata_JCP2022, str(row.Metadata_Draw), "noise"]).encode()
        ref = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)
        assert row.Metadata_Seed == ref
    shared = full(DesignSpec("scm-N3", ("JCP2022_b", "JCP2022_a"), 3, SPACE))
    assert (shared["Metadata_Seed"] == [derive_seed("scm-N3", "*", d) for d in shared["Metadata_Draw"]]).all()
    assert derive_seed("x", "y", 1) != derive_seed("x", "y", 2)


def test_stratified_uses_every_support_value_equally_often_per_compound():
    space = ConfounderSpace(GRID[:12])
    design = full(DesignSpec("strat", COMPOUNDS[:5], 24, space, kind="stratified", shared_draws=False,
                             block_size=7))
    counts = pd.crosstab(design["Metadata_JCP2022"], design["Metadata_Well"] + design["Metadata_Batch"])
    assert (counts.to_numpy() == 2).all()
    design = full(DesignSpec("strat", COMPOUNDS[:5], 8, SPACE.__class__(GRID, "independent"), kind="stratified",
                             shared_draws=False))
    counts = pd.crosstab(design["Metadata_JCP2022"], design["Metadata_Batch"]).to_numpy()
    assert counts.max() - counts.min() <= 1 and counts.sum() == 5 * 8


def test_scm_free_oracle_draws_only_each_compounds_observed_confounders():
    sites = confounded_sites()
    train = {b for _, b in BATCHES if b.endswith("0")}
    seen = set(COMPOUNDS[::2])
    compounds = COMPOUNDS[:10] + (NEGCON_JCP2022,)
    observed = compound_supports(sites, train, seen, compounds)
    spaces = tuple((c, ConfounderSpace.from_table(observed[c])) for c in compounds)
    space = ConfounderSpace.from_table(confounder_support(sites, train, compounds=seen))
    design = full(DesignSpec("free", compounds, 30, space, compound_spaces=spaces, dmso_per_draw=2))
    for compound, rows in design.groupby("Metadata_JCP2022"):
        plated = sites[sites["Metadata_JCP2022"] == compound]
        if compound in seen or compound == NEGCON_JCP2022:
            plated = plated[plated["Metadata_Batch"].isin(train)]
        naive = set(zip(plated["Metadata_Source"], plated["Metadata_Batch"], plated["Metadata_Well"]))
        drawn = set(zip(rows["Metadata_Source"], rows["Metadata_Batch"], rows["Metadata_Well"]))
        assert drawn <= naive, compound
        assert len(drawn) > 1 or len(naive) == 1
    # seeds stay shared across compounds within a draw
    first = design[design["Metadata_Replicate"] == 0]
    assert (first.groupby("Metadata_Draw")["Metadata_Seed"].nunique() == 1).all()


def test_design_does_not_depend_on_block_size_or_order():
    compounds = COMPOUNDS[:9] + (NEGCON_JCP2022,)
    a = full(DesignSpec("run", compounds, 7, SPACE, block_size=5)).drop(columns="Metadata_Block")
    b = full(DesignSpec("run", compounds, 7, SPACE, block_size=64)).drop(columns="Metadata_Block")
    pd.testing.assert_frame_equal(a, b)
    spec = DesignSpec("run", compounds, 7, SPACE, block_size=5)
    backwards = pd.concat(spec.iter_blocks(reversed(range(spec.n_blocks)))).sort_values("Metadata_DesignRow")
    pd.testing.assert_frame_equal(backwards.reset_index(drop=True).drop(columns="Metadata_Block"), a)
    stacked = pd.concat([f for _, f in spec.iter_parts(part_rows=12)], ignore_index=True)
    assert stacked["Metadata_DesignRow"].tolist() == list(range(spec.n_rows))     # no gaps, no duplicates
    other = full(DesignSpec("other", compounds, 7, SPACE))
    assert (other["Metadata_Seed"] != a["Metadata_Seed"]).all()
    assert spec.fingerprint() != DesignSpec("run", compounds, 7, SPACE, block_size=5, dmso_per_draw=9).fingerprint()


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
        ConfounderSpace((("source_1", "B1", "A01"), ("source_2", "B1", "A01")))
    with pytest.raises(UserError, match="empty"):
        ConfounderSpace(())
    with pytest.raises(UserError, match="draws"):
        DesignSpec("r", COMPOUNDS, 0, SPACE)
    with pytest.raises(UserError, match="dmso_per_draw"):
        DesignSpec("r", COMPOUNDS, 2, SPACE, dmso_per_draw=0)
    with pytest.raises(UserError, match="no compounds"):
        DesignSpec("r", (), 3, SPACE)
    with pytest.raises(UserError, match="unknown generate preset"):
        generate_preset("huge")
    with pytest.raises(UserError, match="lacks column"):
        confounder_support(pd.DataFrame({"Metadata_Well": ["A01"]}))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(UserError, match="guidance_scale"):
            GenerateConfig(guidance_scale=bad)
    assert generate_preset("demo", draws=30).run_name == "scm-N30"
    assert GenerateConfig(draws=10, guidance_scale=2.0).run_name == "scm-N10-g2"
    assert GenerateConfig(oracle="c-aware", draws=10).run_name == "oracle-c-aware-N10"
    assert GenerateConfig(model_run="scm-free", draws=10).namespace == "scm-free-N10"
