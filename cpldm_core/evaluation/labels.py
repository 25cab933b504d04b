"""Labels for the evaluation: single-label MoA and multi-label targets, with an exclusion table.

Paper rules (METHOD.md): MoA: compounds with exactly one MoA, MoAs with >= ``min_compounds`` compounds.
Targets: multi-label, targets with >= ``min_compounds`` compounds. Every compound that is profiled or
annotated but left out gets one row in the exclusion table with its reason.
Annotation strings may hold several values separated by ``|`` (Repurposing Hub convention).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from storage_schemas.columns import COMPOUND

#: Repurposing Hub separator of several MoAs / targets in one field.
HUB_SEPARATOR = "|"
EXCLUSION_COLUMNS = [COMPOUND, "task", "reason"]


@dataclass(frozen=True)
class LabelSet:
    """Compounds x labels membership.

    Attributes:
        task: ``moa`` or ``target``.
        compounds: (n,) compound ids (sorted).
        labels: (L,) label names (sorted).
        membership: (n, L) bool; exactly one True per row for single-label tasks.
    """

    task: str
    compounds: np.ndarray
    labels: np.ndarray
    membership: np.ndarray

    def members(self, label_index: int) -> np.ndarray:
        return np.flatnonzero(self.membership[:, label_index])

    def frame(self) -> pd.DataFrame:
        """Long form: one row per (compound, label)."""
        rows, cols = np.nonzero(self.membership)
        return pd.DataFrame({COMPOUND: self.compounds[rows], "label": self.labels[cols]})


def _split(values: pd.Series) -> pd.Series:
    return values.astype(str).str.split(HUB_SEPARATOR).explode().str.strip()


def _long(annotations: pd.DataFrame, column: str) -> pd.DataFrame:
    """(compound, label) pairs, separators exploded, blanks dropped, duplicates removed."""
    frame = annotations[[COMPOUND, column]].dropna()
    frame = frame.assign(**{column: frame[column].astype(str).str.split(HUB_SEPARATOR)}).explode(column)
    frame[column] = frame[column].astype(str).str.strip()
    frame = frame[frame[column].str.len() > 0]
    return frame.drop_duplicates().rename(columns={column: "label"})


def _exclusions(ids, task: str, reason: str) -> pd.DataFrame:
    return pd.DataFrame({COMPOUND: list(ids), "task": task, "reason": reason})


def moa_labels(annotations: pd.DataFrame, profiled: list[str], min_compounds: int,
               column: str = "Metadata_moa") -> tuple[LabelSet, pd.DataFrame]:
    """Single-label MoA set among the profiled compounds.

    Args:
        annotations: rows (Metadata_JCP2022, ``column``), MoA strings may hold ``|``-separated values.
        profiled: compound ids that have a profile (DMSO excluded by the caller).
        min_compounds: keep MoAs with at least this many single-MoA profiled compounds.

    Returns:
        (LabelSet, exclusions DataFrame [Metadata_JCP2022, task, reason]).
    """
    task = "moa"
    profiled_set = set(profiled)
    pairs = _long(annotations, column)
    excluded = [_exclusions(sorted(set(pairs[COMPOUND]) - profiled_set), task, "annotated but not profiled")]
    pairs = pairs[pairs[COMPOUND].isin(profiled_set)]
    excluded.append(_exclusions(sorted(profiled_set - set(pairs[COMPOUND])), task, "no MoA annotation"))
    n_moa = pairs.groupby(COMPOUND)["label"].nunique()
    multi = n_moa[n_moa > 1]
    for compound, n in multi.items():
        excluded.append(_exclusions([compound], task, f"{n} MoAs (single-MoA compounds only)"))
    pairs = pairs[~pairs[COMPOUND].isin(multi.index)]
    sizes = pairs.groupby("label")[COMPOUND].nunique()
    small = sizes[sizes < min_compounds]
    for label, n in small.items():
        ids = pairs.loc[pairs["label"] == label, COMPOUND]
        excluded.append(_exclusions(sorted(ids), task, f"MoA '{label}' has {n} < {min_compounds} compounds"))
    pairs = pairs[~pairs["label"].isin(small.index)]
    return _labelset(task, pairs), _concat(excluded)


def target_labels(annotations: pd.DataFrame, profiled: list[str], min_compounds: int,
                  column: str = "Metadata_target") -> tuple[LabelSet, pd.DataFrame]:
    """Multi-label target set among the profiled compounds (targets with >= ``min_compounds`` compounds).

    Returns:
        (LabelSet, exclusions DataFrame). A compound is excluded when none of its targets is kept.
    """
    task = "target"
    profiled_set = set(profiled)
    pairs = _long(annotations, column)
    excluded = [_exclusions(sorted(set(pairs[COMPOUND]) - profiled_set), task, "annotated but not profiled")]
    pairs = pairs[pairs[COMPOUND].isin(profiled_set)]
    excluded.append(_exclusions(sorted(profiled_set - set(pairs[COMPOUND])), task, "no target annotation"))
    sizes = pairs.groupby("label")[COMPOUND].nunique()
    kept = pairs[pairs["label"].isin(sizes[sizes >= min_compounds].index)]
    dropped = sorted(set(pairs[COMPOUND]) - set(kept[COMPOUND]))
    excluded.append(_exclusions(dropped, task, f"no target with >= {min_compounds} compounds"))
    return _labelset(task, kept), _concat(excluded)


def _labelset(task: str, pairs: pd.DataFrame) -> LabelSet:
    compounds = np.array(sorted(pairs[COMPOUND].unique()), dtype=object)
    labels = np.array(sorted(pairs["label"].unique()), dtype=object)
    membership = np.zeros((len(compounds), len(labels)), dtype=bool)
    if len(pairs):
        membership[np.searchsorted(compounds, pairs[COMPOUND].to_numpy()),
                   np.searchsorted(labels, pairs["label"].to_numpy())] = True
    return LabelSet(task, compounds, labels, membership)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=str) for c in EXCLUSION_COLUMNS})
    return pd.concat(frames, ignore_index=True)[EXCLUSION_COLUMNS]


#: Column spellings accepted in a user's annotation file (Repurposing Hub and its JUMP derivatives).
INCHIKEY_COLUMNS = ("Metadata_InChIKey", "InChIKey", "inchikey", "InChIKey_standardized")
MOA_COLUMNS = ("Metadata_moa", "moa")
TARGET_COLUMNS = ("Metadata_target", "target")


def hub_annotations(table: pd.DataFrame, compounds: pd.DataFrame, source: str = "annotations",
                    prefix14: bool = False) -> pd.DataFrame:
    """Join a Repurposing-Hub style annotation table to the lake's compounds on InChIKey.

    Args:
        table: a table with an InChIKey column and ``moa`` and/or ``target`` columns (any spelling in
            ``INCHIKEY_COLUMNS`` / ``MOA_COLUMNS`` / ``TARGET_COLUMNS``).
        compounds: the lake's compounds (Metadata_JCP2022, Metadata_InChIKey).
        source: name of the file, for error messages.
        prefix14: join on the first 14 characters (the connectivity block: ignores stereo/salt forms).

    Returns:
        DataFrame [Metadata_JCP2022, Metadata_moa, Metadata_target] (``|``-joined strings, NaN when absent).
    """
    key = next((c for c in INCHIKEY_COLUMNS if c in table.columns), None)
    if key is None:
        raise ValueError(f"{source}: no InChIKey column (expected one of {', '.join(INCHIKEY_COLUMNS)}); "
                         f"columns are {list(table.columns)[:12]}")
    moa = next((c for c in MOA_COLUMNS if c in table.columns), None)
    target = next((c for c in TARGET_COLUMNS if c in table.columns), None)
    if moa is None and target is None:
        raise ValueError(f"{source}: neither a moa ({'/'.join(MOA_COLUMNS)}) nor a target "
                         f"({'/'.join(TARGET_COLUMNS)}) column")

    def norm(keys: pd.Series) -> pd.Series:
        keys = keys.astype(str).str.strip()
        return keys.str[:14] if prefix14 else keys

    cmp = compounds[[COMPOUND, "Metadata_InChIKey"]].dropna()
    cmp = cmp.assign(_key=norm(cmp["Metadata_InChIKey"]))
    keys = norm(table[key])
    wanted = keys.isin(set(cmp["_key"]))  # only the lake's compounds: the Hub has ~10^4 rows
    joined = cmp[[COMPOUND, "_key"]]
    for out, col in (("Metadata_moa", moa), ("Metadata_target", target)):
        if col is None:
            joined = joined.assign(**{out: pd.NA})
            continue
        # one value per key: the sorted union of the |-separated values of duplicate rows (salts, vendors)
        pairs = pd.DataFrame({"_key": keys[wanted], "v": table.loc[wanted, col]}).dropna()
        pairs = pairs.assign(v=pairs["v"].astype(str).str.split(HUB_SEPARATOR)).explode("v")
        pairs["v"] = pairs["v"].str.strip()
        pairs = pairs[pairs["v"].str.len() > 0].drop_duplicates().sort_values(["_key", "v"])
        values = pairs.groupby("_key")["v"].agg(HUB_SEPARATOR.join).rename(out)
        joined = joined.merge(values, left_on="_key", right_index=True, how="left")
    joined = joined.dropna(subset=["Metadata_moa", "Metadata_target"], how="all")
    return joined[[COMPOUND, "Metadata_moa", "Metadata_target"]].reset_index(drop=True)


def threshold_report(annotations: pd.DataFrame, profiled: list[str], task: str, min_compounds: int,
                     paper_min: int = 10) -> tuple[str, bool]:
    """One line on how many labels survive the compound-count threshold, and whether to warn.

    Args:
        annotations: rows (Metadata_JCP2022, Metadata_moa | Metadata_target). profiled: usable compounds.
        task: ``moa`` (single-MoA compounds only, as :func:`moa_labels`) or ``target``.
        min_compounds: this run's threshold. paper_min: the paper's (10).

    Returns:
        (message with label and compound counts, warn): warn when fewer than 2 labels are kept or more labels
        are dropped than kept.
    """
    column = "Metadata_moa" if task == "moa" else "Metadata_target"
    pairs = _long(annotations, column) if column in annotations else pd.DataFrame(columns=[COMPOUND, "label"])
    pairs = pairs[pairs[COMPOUND].isin(set(profiled))]
    if task == "moa":
        n_labels = pairs.groupby(COMPOUND)["label"].nunique()
        pairs = pairs[pairs[COMPOUND].isin(n_labels[n_labels == 1].index)]
    sizes = pairs.groupby("label")[COMPOUND].nunique()
    kept = sizes[sizes >= min_compounds]
    dropped = sizes[sizes < min_compounds]
    message = (f"{task}: {len(kept)} of {len(sizes)} labels have >= {min_compounds} compounds "
               f"({int(kept.sum())} compound-label pairs kept, {int(dropped.sum())} in {len(dropped)} smaller labels "
               f"dropped); at the paper's >= {paper_min}: {int((sizes >= paper_min).sum())} labels")
    return message, bool(len(kept) < 2 or len(dropped) > len(kept))
