"""The g-estimation design: which images to generate, with which confounders and which noise.

The paper's Algorithm (METHOD.md, "Generation") approximates the interventional distribution
``p(O | do(T=t)) = sum_c p(O | T=t, C=c) p'(c)`` by Monte Carlo: for each repetition ``i = 0..N-1`` it samples
one noise, one well and one batch (across sources, which fixes the source) uniformly over the values seen in
training, *independently of the compound*, and generates every compound under that draw.

**Support.** p'(C) is uniform over the *confounder support*: the (source, batch, well) combinations observed
with treatments (not DMSO-only wells) in the training split (:func:`confounder_support`, recorded with the
model by ``cpldm train``). ``joint`` draws a combination uniformly; ``independent`` draws an observed batch and
an observed treatment well independently (the paper's p'(well) p'(batch); it can pair a batch with a well that
batch never held). Never the vocabulary's row x column grid: conditioning on a never-seen well is extrapolation.

**Shared draws** (default): draw ``i`` has one noise seed and one (source, batch, well), shared by every
compound and by DMSO, so draw ``i`` is a synthetic plate (``Metadata_Plate = draw-000i`` downstream) normalised
against its own ``dmso_per_draw`` DMSO images (same confounders, their own seeds; replicate 0 uses the shared
seed). ``shared_draws=False`` keys seeds and confounders by compound instead (the per-compound mode).

Rows: the treatment compounds (sorted) compound-major, ``row = compound_index * N + draw``, then the negative
control's rows ``row = n_treatments * N + draw * dmso_per_draw + replicate``. The image of a row always lands at
the same place in ``images.zarr`` and a block of rows ``[b * block_size, (b + 1) * block_size)`` is a
self-contained unit of work. Every value of a row (confounders and seed) is a pure function of
``(namespace, key, draw, replicate)`` through BLAKE2b, so

* the design is *streamed*: any block is computed on its own in O(block_size) time and memory, whatever
  ``N x compounds`` is (millions of rows never sit in memory),
* the design does not depend on the block size, the number of actors or the order blocks are processed in,
* the same namespace always gives the same design and the same noise: reruns and resumes are reproducible.

Designs:

* ``uniform``: confounders drawn uniformly over the support (the paper's p'(C)).
* ``stratified``: per key, draws cycle through a random permutation of the support's combinations (joint) or
  of the batches and, separately, the wells (independent), so every value is used equally often (+-1 when N
  is not a multiple of their count). Lower Monte Carlo variance for the same N.

``compound_spaces`` gives a compound its own support (the oracle's SCM-free arm draws C from the compound's
observed p(C | T)); such a compound's confounders are keyed by the compound even under shared draws (its seed
stays shared).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Literal

import numpy as np
import pandas as pd

from cpldm_core.configuration import LAKE_NAME
from cpldm_core.errors import UserError

#: Largest seed value: seeds are non-negative int63 so they fit Arrow int64 and ``torch.Generator``.
SEED_MASK = (1 << 63) - 1

#: Key used in place of the compound id when draws are shared by all compounds.
SHARED_KEY = "*"

#: Separator of hashed key fields (ASCII unit separator: cannot occur in JCP ids or run names).
_SEP = "\x1f"

#: JUMP's DMSO id (storage_schemas.columns.DMSO_JCP2022; core does not import the schema package).
NEGCON_JCP2022 = "JCP2022_033924"

#: Columns of a confounder support table (``confounder_support``), one row per observed combination.
SUPPORT_COLUMNS = ("Metadata_Source", "Metadata_Batch", "Metadata_Well")

#: Design table columns, in order (``storage_schemas.generation`` adds the ``run`` partition column).
DESIGN_COLUMNS = ("Metadata_DesignRow", "Metadata_Block", "Metadata_JCP2022", "Metadata_Draw",
                  "Metadata_Replicate", "Metadata_Source", "Metadata_Batch", "Metadata_Well", "Metadata_Seed")


def _digest(*parts: object, size: int = 8) -> bytes:
    return hashlib.blake2b(_SEP.join(map(str, parts)).encode(), digest_size=size).digest()


def derive_seed(*parts: object) -> int:
    """Deterministic non-negative int63 from ``parts`` (BLAKE2b-64 of their ``str`` joined), e.g.
    ``derive_seed(namespace, compound, draw)``. Stable across processes and machines (unlike ``hash``)."""
    return int.from_bytes(_digest(*parts, "noise"), "little") & SEED_MASK


def _uniform_index(n: int, *parts: object) -> int:
    # 64 random bits modulo n: bias < n / 2**64, far below any test's resolution
    return int.from_bytes(_digest(*parts), "little") % n


def draw_plate(draw: int) -> str:
    """``Metadata_Plate`` of a synthetic image of draw ``draw``: each draw is one synthetic plate."""
    return f"draw-{int(draw):04d}"


# ---------------------------------------------------------------------------------------------- support
def confounder_support(frame: pd.DataFrame, train_batches: Iterable[str] | None = None,
                       compounds: Iterable[str] | None = None, negcon: str = NEGCON_JCP2022) -> pd.DataFrame:
    """The confounder support: (source, batch, well) combinations observed with treatments in training.

    Args:
        frame: one row per site or latent (``sites``, ``latent_index``) with ``Metadata_Source``,
            ``Metadata_Batch``, ``Metadata_Well``, ``Metadata_JCP2022`` (and optionally ``Metadata_pert_type``).
        train_batches: keep rows of these batches only (``None``: every row is training data already).
        compounds: keep rows of these compounds only (the training compounds; ``None``: all).
        negcon: the negative control; its rows (and rows typed ``negcon``) never add a combination, so wells
            that only ever held DMSO are not in the support.
    Returns:
        DataFrame with :data:`SUPPORT_COLUMNS` (str), unique rows sorted by source, batch, well.
    """
    missing = [c for c in (*SUPPORT_COLUMNS, "Metadata_JCP2022") if c not in frame.columns]
    if missing:
        raise UserError(f"confounder support: the table lacks column(s) {missing}")
    keep = frame["Metadata_JCP2022"].astype(str) != negcon
    if "Metadata_pert_type" in frame.columns:
        keep &= frame["Metadata_pert_type"].astype(str) != "negcon"
    if train_batches is not None:
        keep &= frame["Metadata_Batch"].astype(str).isin({str(b) for b in train_batches})
    if compounds is not None:
        keep &= frame["Metadata_JCP2022"].astype(str).isin({str(c) for c in compounds})
    out = frame.loc[keep, list(SUPPORT_COLUMNS)].astype(str).drop_duplicates()
    return out.sort_values(list(SUPPORT_COLUMNS)).reset_index(drop=True)


def compound_supports(frame: pd.DataFrame, train_batches: Iterable[str], seen: Iterable[str],
                      compounds: Iterable[str]) -> dict[str, pd.DataFrame]:
    """Each compound's observed p(C | T) support (what a compound-only model learns): the (source, batch, well)
    where it was plated, in training batches for a seen compound (what training showed), in any batch for an
    unseen one (training never showed it; its own plates are all it has). Same columns as
    :func:`confounder_support`. Raises :class:`UserError` for a compound that was never plated."""
    cols = list(SUPPORT_COLUMNS)
    frame = frame.assign(Metadata_JCP2022=frame["Metadata_JCP2022"].astype(str),
                         Metadata_Batch=frame["Metadata_Batch"].astype(str))
    train, seen = {str(b) for b in train_batches}, {str(c) for c in seen}
    groups = {c: g for c, g in frame.groupby("Metadata_JCP2022", sort=False)}
    out = {}
    for compound in compounds:
        rows = groups.get(str(compound))
        if rows is None:
            raise UserError(f"compound {compound} was never plated: it has no observed confounders")
        if compound in seen or compound == NEGCON_JCP2022:
            in_train = rows[rows["Metadata_Batch"].isin(train)]
            rows = in_train if len(in_train) else rows
        out[str(compound)] = (rows[cols].astype(str).drop_duplicates().sort_values(cols).reset_index(drop=True))
    return out


def support_combinations(support: pd.DataFrame) -> tuple[tuple[str, str, str], ...]:
    """A support table as sorted ``(source, batch, well)`` tuples (what :class:`ConfounderSpace` takes)."""
    return tuple(sorted(set(map(tuple, support[list(SUPPORT_COLUMNS)].astype(str).itertuples(index=False)))))


@dataclass(frozen=True)
class ConfounderSpace:
    """p'(C): uniform over the observed confounder support.

    Attributes:
        combinations: observed ``(source, batch, well)`` triples (sorted and de-duplicated on construction).
        kind: ``joint`` (uniform over the combinations) or ``independent`` (uniform over the observed batches
            x the observed wells: p'(batch) p'(well), as in the paper).
    """

    combinations: tuple[tuple[str, str, str], ...]
    kind: Literal["joint", "independent"] = "joint"

    def __post_init__(self):
        if self.kind not in ("joint", "independent"):
            raise UserError(f"confounder support: kind must be 'joint' or 'independent', got {self.kind!r}")
        combos = tuple(sorted({(str(s), str(b), str(w)) for s, b, w in self.combinations}))
        if not combos:
            raise UserError("confounder support is empty: no (source, batch, well) was observed with a treatment "
                            "in the training batches")
        source_of: dict[str, set] = {}
        for s, b, _ in combos:
            source_of.setdefault(b, set()).add(s)
        dupes = sorted(b for b, s in source_of.items() if len(s) > 1)
        if dupes:
            raise UserError(f"confounder support: batch name(s) {dupes} occur in several sources")
        # sorted, de-duplicated: the design must not depend on the order a table happened to list values
        object.__setattr__(self, "combinations", combos)
        object.__setattr__(self, "_batches", tuple(sorted({(s, b) for s, b, _ in combos})))
        object.__setattr__(self, "_wells", tuple(sorted({w for _, _, w in combos})))

    @classmethod
    def from_table(cls, support: pd.DataFrame, kind: str = "joint") -> "ConfounderSpace":
        return cls(support_combinations(support), kind)

    @property
    def batches(self) -> tuple[tuple[str, str], ...]:
        """Observed ``(source, batch)`` pairs."""
        return self._batches

    @property
    def wells(self) -> tuple[str, ...]:
        """Observed treatment wells."""
        return self._wells

    @property
    def values(self) -> tuple[tuple[str, str, str], ...]:
        """Every (source, batch, well) p'(C) puts mass on, each with mass ``1 / len(values)``."""
        if self.kind == "joint":
            return self.combinations
        return tuple((s, b, w) for s, b in self.batches for w in self.wells)

    def fingerprint_parts(self) -> tuple[str, ...]:
        return (self.kind, *("/".join(c) for c in self.combinations))


@dataclass(frozen=True)
class DesignSpec:
    """Everything that determines a design (tiny: the rows themselves are never stored here).

    Attributes:
        namespace: mixed into every hash; normally the generation run name. Two runs with the same namespace,
            compounds and draws share noise and confounders (e.g. an scm and an scm-free run compared on
            identical noise).
        compounds: JCP2022 ids; sorted and de-duplicated on construction. ``negcon`` among them is the
            negative control (its rows come last, ``dmso_per_draw`` per draw).
        draws: N, the Monte Carlo draws (repetitions).
        space: p'(C), the training confounder support.
        kind: ``uniform`` or ``stratified``.
        shared_draws: draw i uses the same noise and confounders for every compound (the paper's Algorithm);
            ``False``: per-compound draws.
        block_size: rows per unit of work (a block owns rows ``[b*block_size, (b+1)*block_size)``).
        dmso_per_draw: negative-control images per draw (>= 1; each draw's plate is normalised against them).
        negcon: the negative control's id.
        compound_spaces: ``((compound, space), ...)``: compounds drawing C from their own support instead.
    """

    namespace: str
    compounds: tuple[str, ...]
    draws: int
    space: ConfounderSpace
    kind: Literal["uniform", "stratified"] = "uniform"
    shared_draws: bool = True
    block_size: int = 64
    dmso_per_draw: int = 8
    negcon: str = NEGCON_JCP2022
    compound_spaces: tuple[tuple[str, ConfounderSpace], ...] = field(default=(), repr=False)

    def __post_init__(self):
        if self.draws < 1:
            raise UserError(f"design: draws must be >= 1, got {self.draws}")
        if self.block_size < 1:
            raise UserError(f"design: block_size must be >= 1, got {self.block_size}")
        if self.dmso_per_draw < 1:
            raise UserError(f"design: dmso_per_draw must be >= 1, got {self.dmso_per_draw}")
        if self.kind not in ("uniform", "stratified"):
            raise UserError(f"design: kind must be 'uniform' or 'stratified', got {self.kind!r}")
        compounds = tuple(sorted(set(map(str, self.compounds))))
        if not compounds:
            raise UserError("design: no compounds selected")
        object.__setattr__(self, "compounds", compounds)
        object.__setattr__(self, "compound_spaces", tuple(sorted(self.compound_spaces, key=lambda kv: kv[0])))
        object.__setattr__(self, "_treatments", tuple(c for c in compounds if c != self.negcon))
        object.__setattr__(self, "_has_negcon", self.negcon in compounds)
        object.__setattr__(self, "_spaces", dict(self.compound_spaces))
        unknown = sorted(set(self._spaces) - set(compounds))
        if unknown:
            raise UserError(f"design: compound_spaces name compound(s) not in the design: {unknown[:5]}")

    # ------------------------------------------------------------------ sizes
    @property
    def treatments(self) -> tuple[str, ...]:
        """The compounds other than the negative control, sorted (row order)."""
        return self._treatments

    @property
    def n_negcon_rows(self) -> int:
        return self.draws * self.dmso_per_draw if self._has_negcon else 0

    @property
    def n_rows(self) -> int:
        """Total images: treatments x draws + draws x dmso_per_draw (when the negative control is included)."""
        return len(self._treatments) * self.draws + self.n_negcon_rows

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_rows / self.block_size)

    def block_rows(self, block: int) -> range:
        """Design rows (= image rows) owned by ``block``."""
        if not 0 <= block < self.n_blocks:
            raise IndexError(f"block {block} outside 0..{self.n_blocks - 1}")
        return range(block * self.block_size, min((block + 1) * self.block_size, self.n_rows))

    def row_key(self, row: int) -> tuple[str, int, int]:
        """``(compound, draw, replicate)`` of design row ``row`` (replicate > 0 only for the negative control)."""
        n_trt = len(self._treatments) * self.draws
        if row < n_trt:
            return self._treatments[row // self.draws], row % self.draws, 0
        draw, replicate = divmod(row - n_trt, self.dmso_per_draw)
        return self.negcon, draw, replicate

    def fingerprint(self) -> str:
        """Hex digest identifying the design (namespace, compounds, draws, support, kind, pairing, blocks).

        Stored with a run so a resume with different settings is refused instead of mixing two designs."""
        h = hashlib.blake2b(digest_size=16)
        parts = [self.namespace, self.draws, self.kind, self.shared_draws, self.block_size, self.dmso_per_draw,
                 self.negcon, *self.compounds, "|", *self.space.fingerprint_parts()]
        for compound, space in self.compound_spaces:
            parts += ["|", compound, *space.fingerprint_parts()]
        for part in parts:
            h.update(str(part).encode() + _SEP.encode())
        return h.hexdigest()

    # ------------------------------------------------------------------ one row's values
    def _key(self, compound: str) -> str:
        return SHARED_KEY if self.shared_draws else compound

    def seed(self, compound: str, draw: int, replicate: int = 0) -> int:
        """Noise seed of ``(compound, draw, replicate)``: int63 hash of ``(namespace, key, draw)`` with key =
        the compound (``*`` under shared draws); negative-control replicates > 0 add the replicate."""
        key = self._key(compound)
        if replicate:
            return derive_seed(self.namespace, key, draw, "negcon", replicate)
        return derive_seed(self.namespace, key, draw)

    def _stratified_index(self, n: int, key: str, factor: str, draw: int, cache: dict) -> int:
        cycle, pos = divmod(draw, n)
        perm = cache.get((key, factor, cycle))
        if perm is None:
            rng = np.random.default_rng(int.from_bytes(_digest(self.namespace, key, factor, cycle), "little"))
            perm = cache[(key, factor, cycle)] = rng.permutation(n)
        return int(perm[pos])

    def _index(self, n: int, key: str, factor: str, draw: int, cache: dict) -> int:
        if self.kind == "uniform":
            return _uniform_index(n, self.namespace, key, draw, factor)
        return self._stratified_index(n, key, factor, draw, cache)

    def confounders(self, compound: str, draw: int, cache: dict | None = None) -> tuple[str, str, str]:
        """``(source, batch, well)`` of ``(compound, draw)``; depends on nothing of the compound but its hash
        key (and its own support, when ``compound_spaces`` gives one), so p'(C) is the same for every compound."""
        cache = {} if cache is None else cache
        space = self._spaces.get(compound)
        key = compound if space is not None else self._key(compound)
        space = space if space is not None else self.space
        if space.kind == "joint":
            return space.combinations[self._index(len(space.combinations), key, "combination", draw, cache)]
        b = self._index(len(space.batches), key, "batch", draw, cache)
        w = self._index(len(space.wells), key, "well", draw, cache)
        source, batch = space.batches[b]
        return source, batch, space.wells[w]

    # ------------------------------------------------------------------ blocks
    def block(self, block: int) -> pd.DataFrame:
        """Rows of one block as a DataFrame with :data:`DESIGN_COLUMNS` (Draw/Replicate int32, Seed/rows int64)."""
        cache: dict = {}
        records = []
        for r in self.block_rows(block):
            compound, draw, replicate = self.row_key(r)
            source, batch, well = self.confounders(compound, draw, cache)
            records.append((r, block, compound, draw, replicate, source, batch, well,
                            self.seed(compound, draw, replicate)))
        frame = pd.DataFrame.from_records(records, columns=list(DESIGN_COLUMNS))
        return frame.astype({"Metadata_DesignRow": "int64", "Metadata_Block": "int64", "Metadata_Draw": "int32",
                             "Metadata_Replicate": "int32", "Metadata_Seed": "int64"})

    def iter_blocks(self, blocks: Iterator[int] | None = None) -> Iterator[pd.DataFrame]:
        """Stream the design block by block (all blocks by default); memory O(block_size)."""
        for b in (range(self.n_blocks) if blocks is None else blocks):
            yield self.block(b)

    def iter_parts(self, part_rows: int) -> Iterator[tuple[int, pd.DataFrame]]:
        """Stream the design in parts of ~``part_rows`` rows (whole blocks) for writing the design table:
        yields ``(part_index, frame)``; memory O(part_rows)."""
        per_part = max(1, part_rows // self.block_size)
        for p in range(math.ceil(self.n_blocks / per_part)):
            blocks = range(p * per_part, min((p + 1) * per_part, self.n_blocks))
            yield p, pd.concat(list(self.iter_blocks(blocks)), ignore_index=True)


# ---------------------------------------------------------------------------------------------- stage config
@dataclass(frozen=True)
class GenerateConfig:
    """Configuration of ``cpldm generate`` (presets: :data:`GENERATE_PRESETS`).

    Attributes:
        model_run: trained model under ``models/<model_run>/final/`` (``scm`` or ``scm-free``...).
        run: generation run name; default ``<model_run>-N<draws>`` (``scm-N10``).
        draws: N, Monte Carlo draws per compound (the paper: 10 and 100).
        compounds: ``seen``, ``unseen``, ``all`` (from ``split_compounds``) or a path to a file of JCP2022 ids
            (one per line, or a CSV/Parquet with a ``Metadata_JCP2022`` column).
        include_negcon: always add DMSO (profiles are normalised against it, per draw).
        dmso_per_draw: DMSO images per draw (each draw is a synthetic plate normalised against its own DMSO
            images; >= 8 for a stable MAD).
        design: ``uniform`` (the paper) or ``stratified`` (every support value equally often per key).
        support: ``joint`` (uniform over the observed (source, batch, well) combinations) or ``independent``
            (uniform over observed batches x observed treatment wells, the paper's p'(batch) p'(well)).
        shared_draws: one noise seed and one (source, batch, well) per draw, shared by every compound and DMSO
            (the paper's Algorithm); ``False``: per-compound draws.
        seed_namespace: hashed with (compound, draw) into seeds and confounders; default: the run name.
            Give scm and scm-free runs the same namespace to generate both from identical noise.
        oracle: ``c-aware`` or ``scm-free``: render with the simulator as a perfect p(O | T, C) instead of a
            model (``model_run`` is then unused): c-aware draws C from p'(C) like the scm model,
            scm-free from each compound's observed p(C | T).
        oracle_vae: oracle only: pass every rendered crop through the latent cache's VAE (encode to the posterior
            mode, float16 as the cache stores it, decode), i.e. a perfect generator *of latents*: the ceiling of
            any diffusion model trained on that cache (run ``oracle-<kind>-vae-N<draws>``).
        sampler: ``ddim`` or ``dpm++`` (DPM-Solver++ multistep), built from the training noise schedule.
        steps: sampler steps (DDIM-50 / DPM-Solver++-20 are the usual quality points).
        guidance_scale: classifier-free guidance on the compound (null compound token as the unconditional
            branch); 1.0 = conditional only (one U-Net pass per step), > 1 = guided (two passes).
        vae: VAE path/id; default the one the model was trained on (``vae/<vae_id>/``).
        block_size: rows per committed unit of work; also the zarr shard (rows) so no two blocks share one.
        batch_size: images per U-Net call inside a block (memory knob).
        design_part_rows: rows per design-table Parquet part (streamed).
        actors: model-holding Ray actors; each loads U-Net and VAE once.
        cpus_per_actor / gpus_per_actor: Ray resources per actor (gpus > 0 puts the models on CUDA).
        max_in_flight_per_actor: queued blocks per actor (bounds driver and object-store memory).
        export_tiff: also write uint16 TIFFs in the JUMP layout under ``synthetic/<run>/tiff/``.
        device: ``auto`` (cuda when the actor got a GPU), ``cpu`` or ``cuda``.
    """

    model_run: str = field(default="scm", metadata=LAKE_NAME)
    run: str | None = field(default=None, metadata=LAKE_NAME)
    draws: int = 10
    compounds: str = "all"
    include_negcon: bool = True
    dmso_per_draw: int = 8
    design: Literal["uniform", "stratified"] = "uniform"
    support: Literal["joint", "independent"] = "joint"
    shared_draws: bool = True
    seed_namespace: str | None = None
    oracle: Literal["", "c-aware", "scm-free"] = ""
    oracle_vae: bool = False
    sampler: Literal["ddim", "dpm++"] = "dpm++"
    steps: int = 20
    guidance_scale: float = 1.0
    vae: str | None = None
    block_size: int = 64
    batch_size: int = 16
    design_part_rows: int = 65536
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    max_in_flight_per_actor: int = 2
    export_tiff: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self):
        for name in ("draws", "steps", "block_size", "batch_size", "design_part_rows", "actors",
                     "max_in_flight_per_actor", "dmso_per_draw"):
            if getattr(self, name) < 1:
                raise UserError(f"generate config: {name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(float(self.guidance_scale)) and self.guidance_scale >= 0):
            raise UserError(f"generate config: guidance_scale must be a finite number >= 0, got {self.guidance_scale}")
        if self.support not in ("joint", "independent"):
            raise UserError(f"generate config: support must be 'joint' or 'independent', got {self.support!r}")
        if self.oracle not in ("", "c-aware", "scm-free"):
            raise UserError(f"generate config: oracle must be 'c-aware' or 'scm-free', got {self.oracle!r}")
        if self.oracle_vae and not self.oracle:
            raise UserError("generate config: oracle_vae passes an oracle's images through the VAE; it needs "
                            "oracle = c-aware or scm-free")

    @property
    def run_name(self) -> str:
        """``--run``, else ``<model_run>-N<draws>`` (``oracle-<kind>[-vae]-N<draws>`` for an oracle), with
        ``-g<scale>`` when guided."""
        if self.run:
            return self.run
        base = f"oracle-{self.oracle}{'-vae' if self.oracle_vae else ''}" if self.oracle else self.model_run
        guided = f"-g{self.guidance_scale:g}" if self.guidance_scale != 1.0 and not self.oracle else ""
        return f"{base}-N{self.draws}{guided}"

    @property
    def namespace(self) -> str:
        return self.seed_namespace or self.run_name


#: Presets. ``demo`` is sized for the demo budget: DPM-Solver++ with 10 steps, no guidance, 2 actors of 1 CPU. ``paper`` follows the paper (N=100 draws, DDIM-50, one GPU per actor).
GENERATE_PRESETS: dict[str, GenerateConfig] = {
    "tiny": GenerateConfig(draws=2, sampler="dpm++", steps=4, block_size=8, batch_size=8, actors=1,
                           design_part_rows=64),
    "demo": GenerateConfig(draws=10, sampler="dpm++", steps=10, block_size=64, batch_size=32, actors=2),
    "paper": GenerateConfig(draws=100, sampler="ddim", steps=50, block_size=256, batch_size=64, actors=4,
                            cpus_per_actor=4, gpus_per_actor=1, guidance_scale=1.0),
}


def generate_preset(name: str, **overrides) -> GenerateConfig:
    """A preset, optionally with fields replaced (``generate_preset("demo", draws=30)``)."""
    if name not in GENERATE_PRESETS:
        raise UserError(f"unknown generate preset {name!r}; choose one of {', '.join(GENERATE_PRESETS)}")
    return replace(GENERATE_PRESETS[name], **overrides)
