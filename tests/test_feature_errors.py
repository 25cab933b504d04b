"""Per-feature and per-group errors of treatment profiles (cpldm_core.evaluation.feature_errors): the CellProfiler
name parsing against the names the feature code writes, every figure against a naive pandas/scipy computation."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cpldm_core.evaluation.feature_errors import (bootstrap_effect_r, feature_errors, feature_group, group_errors,
                                                  group_interval)
from cpldm_core.features.measure import cellprofiler_name, default_features
from storage_schemas.columns import CHANNELS


def test_feature_group_parses_the_names_the_feature_code_writes():
    rng = np.random.default_rng(0)
    image = rng.random((len(CHANNELS), 24, 24)).astype(np.float32)
    cells = np.zeros((24, 24), np.int64)
    cells[2:11, 2:11], cells[13:22, 12:22] = 1, 2
    nuclei = np.where((cells > 0) & (np.add.outer(np.arange(24), np.arange(24)) % 3 == 0), cells, 0)
    names = default_features(image, {"Cells": cells, "Nuclei": nuclei}, CHANNELS, np.array([1, 2]))
    seen = set()
    for name in names:
        compartment, module, channel = feature_group(name)
        parts = name.split("_")
        assert (compartment, module) == (parts[0], parts[1])
        expected = {"AreaShape": lambda: "-", "Intensity": lambda: parts[-1], "Texture": lambda: parts[3],
                    "Correlation": lambda: f"{parts[3]}-{parts[4]}"}   # Correlation_Correlation_<a>_<b>
        if module in expected:
            assert channel == expected[module](), name
        else:   # a feature group added to the default set later: one channel or none
            assert channel in (*CHANNELS, "-"), name
        seen.add(module)
    assert {"AreaShape", "Intensity", "Texture", "Correlation"} <= seen
    # the full (cp_measure) set's names
    assert feature_group(cellprofiler_name("Cells", "RadialDistribution_FracAtD_1of4__ER")) == (
        "Cells", "RadialDistribution", "ER")
    assert feature_group(cellprofiler_name("Nuclei", "Granularity_2__Mito")) == ("Nuclei", "Granularity", "Mito")
    assert feature_group("Image_Count_Cells") == ("Image", "Count", "-")
    with pytest.raises(ValueError, match="Cells_Area"):
        feature_group("Cells_Area")


def _profiles(seed=1, m=15):
    rng = np.random.default_rng(seed)
    names = ["Cells_AreaShape_Area", "Cells_Intensity_MeanIntensity_DNA", "Nuclei_Intensity_MeanIntensity_DNA",
             "Cells_Texture_Contrast_ER_3_00_256", "Cells_Correlation_Correlation_DNA_ER",
             "Nuclei_Texture_Entropy_ER_3_00_256"]
    ref = rng.normal(size=(m, len(names)))
    prof = 0.5 * ref + rng.normal(scale=0.7, size=ref.shape) + 2.0   # shrunk, noisy, shifted
    prof[:, 4] = 3.0                                                  # a constant feature: r undefined
    return prof, ref, names


def test_feature_errors_equal_a_naive_computation():
    prof, ref, names = _profiles()
    out = feature_errors(prof, ref, names)
    for j, name in enumerate(names):
        row = out.set_index("feature").loc[name]
        p, r = pd.Series(prof[:, j]), pd.Series(ref[:, j])
        assert row["mae"] == pytest.approx((p - r).abs().mean())
        assert row["mae_effect"] == pytest.approx(((p - p.mean()) - (r - r.mean())).abs().mean())
        assert row["effect_size"] == pytest.approx((p - p.mean()).abs().mean())
        assert row["reference_effect_size"] == pytest.approx((r - r.mean()).abs().mean())
        if p.nunique() > 1:
            assert row["effect_r"] == pytest.approx(stats.pearsonr(p, r)[0], abs=1e-12)
        else:
            assert np.isnan(row["effect_r"])
    # the shift of 2 is in the whole error, not in the effect error
    assert (out["mae"] > out["mae_effect"]).iloc[:4].all()
    with pytest.raises(ValueError, match="finite"):
        feature_errors(np.where(prof > 3, np.nan, prof), ref, names)


def test_group_errors_equal_a_naive_pandas_computation():
    prof, ref, names = _profiles()
    per = pd.concat([feature_errors(prof, ref, names).assign(data_type="a"),
                     feature_errors(ref + 0.1, ref, names).assign(data_type="b")], ignore_index=True)
    out = group_errors(per, ["data_type", "module"]).set_index(["data_type", "module"])
    for (dt, module), naive in per.groupby(["data_type", "module"]):
        row = out.loc[(dt, module)]
        assert row["n_features"] == len(naive)
        assert row["mae"] == pytest.approx(naive["mae"].mean())
        assert row["effect_r"] == pytest.approx(naive["effect_r"].mean(), nan_ok=True)   # NaN r left out
        total = per.loc[per["data_type"] == dt, "abs_error_effect"].sum()
        assert row["share_error_effect"] == pytest.approx(naive["abs_error_effect"].sum() / total)
        assert row["effect_ratio"] == pytest.approx(naive["effect_size"].mean() / naive["reference_effect_size"].mean())
    assert out.groupby(level="data_type")["share_error"].sum().to_numpy() == pytest.approx([1.0, 1.0])
    whole = group_errors(per[per["data_type"] == "a"], [])
    assert whole["mae"].iloc[0] == pytest.approx(per.loc[per["data_type"] == "a", "mae"].mean())
    assert whole["share_error"].iloc[0] == pytest.approx(1.0)


def test_bootstrap_interval_equals_a_naive_resampling_loop():
    prof, ref, names = _profiles(m=10)
    boot = bootstrap_effect_r(prof, ref, n_boot=30, seed=4)
    rng = np.random.default_rng(4)
    groups = np.array([feature_group(n)[1] for n in names], dtype=object)
    means = []
    for b in range(30):
        idx = rng.integers(0, 10, size=10)
        r = [stats.pearsonr(prof[idx, j], ref[idx, j])[0] if np.ptp(prof[idx, j]) > 0 else np.nan
             for j in range(len(names))]
        np.testing.assert_allclose(boot[b], r, atol=1e-12)
        means.append(pd.Series(r).groupby(groups).mean())   # pandas skips NaN, as the group mean must
    naive = pd.DataFrame(means)
    out = group_interval(boot, groups, level=0.9).set_index("group")
    for g in naive.columns:
        lo, hi = np.percentile(naive[g].dropna(), [5, 95]) if naive[g].notna().any() else (np.nan, np.nan)
        assert out.loc[g, "effect_r_lo"] == pytest.approx(lo, nan_ok=True)
        assert out.loc[g, "effect_r_hi"] == pytest.approx(hi, nan_ok=True)
    assert np.isnan(out.loc["Correlation", "effect_r_lo"])   # its only feature is constant
