"""The g-estimation design: which images to generate, with which confounders and which noise.

The paper's Algorithm (METHOD.md, "Generation") approximates the interventional distribution
``p(O | do(T=t)) = sum_c p(O | T=t, C=c) p'(c)`` by Monte Carlo: for draws ``i = 0..N-1`` it samples a batch
(across sources, which fixes the source) and a well position uniformly over the values seen in training,
*independently of the compound*, plus one noise seed, and generates one image per compound.

A design row is ``(compound, draw)``; rows are numbered compound-major, ``row = compound_index * N + draw``,
so the image for a row always lands at the same place in ``images.zarr`` and a block of rows
``[b * block_size, (b + 1) * block_size)`` is a self-contained unit of work. Every value of a row (confounders
and seed) is a pure function of ``(namespace, compound, draw)`` through BLAKE2b, so

* the design is *streamed*: any block is computed on its own in O(block_size) time and memory, whatever
  ``N x compounds`` is (millions of rows never sit in memory),
* the design does not depend on the block size, the number of actors or the order blocks are processed in,
* the same namespace always gives the same design and the same noise: reruns and resumes are reproducible.

Designs:

* ``uniform``: batch and well drawn independently and uniformly (the paper's p'(C)).
* ``stratified``: per compound, draws cycle through a random permutation of the batches (and, separately, of
  the wells), so every batch (well) is used equally often (+-1 when N is not a multiple of their count).
  Marginals are exactly balanced; the batch x well pairing stays random. Lower Monte Carlo variance for the
  same N.

``shared_seed``: the paper's trick to compare conditions under the same noise: noise seed *and* confounder
draw depend on ``(namespace, draw)`` only, so draw ``i`` uses the same noise, batch and well for every compound.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Iterator, Literal

import numpy as np
import pandas as pd

from cpldm_core.errors import UserError

#: Largest seed value: seeds are non-negative int63 so they fit Arrow int64 and ``torch.Generator``.
SEED_MASK = (1 << 63) - 1

#: Key used in place of the compound id when ``shared_seed`` makes draws common to all compounds.
SHARED_KEY = "*"

#: Separator of hashed key fields (ASCII unit separator: cannot occur in JCP ids or run names).
_SEP = "\x1f"

#: Design table columns, in order (``storage_schemas.generation`` adds the ``run`` partition column).
DESIGN_COLUMNS = ("Metadata_DesignRow", "Metadata_Block", "Metadata_JCP2022", "Metadata_Draw",
                  "Metadata_Source", "Metadata_Batch", "Metadata_Well", "Metadata_Seed")


def _digest(*parts: object, size: int = 8) -> bytes:
    return hashlib.blake2b(_SEP.join(map(str, parts)).encode(), digest_size=size).digest()


def derive_seed(*parts: object) -> int:
    """Deterministic non-negative int63 from ``parts`` (BLAKE2b-64 of their ``str`` joined), e.g.
    ``derive_seed(namespace, compound, draw)``. Stable across processes and machines (unlike ``hash``)."""
    return int.from_bytes(_digest(*parts, "noise"), "little") & SEED_MASK


def _uniform_index(n: int, *parts: object) -> int:
    # 64 random bits modulo n: bias < n / 2**64, far below any test's resolution
    return int.from_bytes(_digest(*parts), "little") % n


@dataclass(frozen=True)
class ConfounderSpace:
    """The confounder values seen in training: p'(C) is uniform over them.

    Attributes:
        batches: ``(source, batch)`` pairs of the training batches, across sources. Drawing a batch fixes the
            source, as in the paper.
        wells: training well positions (``"A01"``...).
    """

    batches: tuple[tuple[str, str], ...]
    wells: tuple[str, ...]

    def __post_init__(self):
        if not self.batches:
            raise UserError("confounder space: no training batches (the model's vocabulary lists none)")
        if not self.wells:
            raise UserError("confounder space: no training wells (the model's vocabulary lists none)")
        batches = tuple(sorted({(str(s), str(b)) for s, b in self.batches}))
        names = [b for _, b in batches]
        dupes = sorted({b for b in names if names.count(b) > 1})
        if dupes:
            raise UserError(f"confounder space: batch name(s) {dupes} occur in several sources")
        # sorted, de-duplicated: the design must not depend on the order a vocabulary happened to list values
        object.__setattr__(self, "batches", batches)
        object.__setattr__(self, "wells", tuple(sorted(set(map(str, self.wells)))))


@dataclass(frozen=True)
class DesignSpec:
    """Everything that determines a design (hashable, tiny: the rows themselves are never stored here).

    Attributes:
        namespace: mixed into every hash; normally the generation run name. Two runs with the same namespace,
            compounds and draws share noise and confounders (e.g. an scm and an scm-free run compared on
            identical noise).
        compounds: JCP2022 ids; sorted and de-duplicated on construction (row order is compound-major).
        draws: N, the Monte Carlo draws per compound.
        space: the training confounder values.
        kind: ``uniform`` or ``stratified``.
        shared_seed: draw i uses the same noise and confounders for every compound.
        block_size: rows per unit of work (a block owns rows ``[b*block_size, (b+1)*block_size)``).
    """

    namespace: str
    compounds: tuple[str, ...]
    draws: int
    space: ConfounderSpace
    kind: Literal["uniform", "stratified"] = "uniform"
    shared_seed: bool = False
    block_size: int = 64

    def __post_init__(self):
        if self.draws < 1:
            raise UserError(f"design: draws must be >= 1, got {self.draws}")
        if self.block_size < 1:
            raise UserError(f"design: block_size must be >= 1, got {self.block_size}")
        if self.kind not in ("uniform", "stratified"):
            raise UserError(f"design: kind must be 'uniform' or 'stratified', got {self.kind!r}")
        compounds = tuple(sorted(set(map(str, self.compounds))))
        if not compounds:
            raise UserError("design: no compounds selected")
        object.__setattr__(self, "compounds", compounds)

    # ------------------------------------------------------------------ sizes
    @property
    def n_rows(self) -> int:
        """Total images: compounds x draws."""
        return len(self.compounds) * self.draws

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_rows / self.block_size)

    def block_rows(self, block: int) -> range:
        """Design rows (= image rows) owned by ``block``."""
        if not 0 <= block < self.n_blocks:
            raise IndexError(f"block {block} outside 0..{self.n_blocks - 1}")
        return range(block * self.block_size, min((block + 1) * self.block_size, self.n_rows))

    def fingerprint(self) -> str:
        """Hex digest identifying the design (namespace, compounds, draws, space, kind, shared_seed, blocks).

        Stored with a run so a resume with different settings is refused instead of mixing two designs."""
        h = hashlib.blake2b(digest_size=16)
        for part in (self.namespace, self.draws, self.kind, self.shared_seed, self.block_size,
                     *self.compounds, "|", *(f"{s}/{b}" for s, b in self.space.batches), "|", *self.space.wells):
            h.update(str(part).encode() + _SEP.encode())
        return h.hexdigest()

    # ------------------------------------------------------------------ one row's values
    def _key(self, compound: str) -> str:
        return SHARED_KEY if self.shared_seed else compound

    def seed(self, compound: str, draw: int) -> int:
        """Noise seed of ``(compound, draw)``: int63 hash of ``(namespace, compound, draw)`` (compound is
        replaced by ``*`` under ``shared_seed``)."""
        return derive_seed(self.namespace, self._key(compound), draw)

    def _stratified_index(self, n: int, key: str, factor: str, draw: int, cache: dict) -> int:
        cycle, pos = divmod(draw, n)
        perm = cache.get((key, factor, cycle))
        if perm is None:
            rng = np.random.default_rng(int.from_bytes(_digest(self.namespace, key, factor, cycle), "little"))
            perm = cache[(key, factor, cycle)] = rng.permutation(n)
        return int(perm[pos])

    def confounders(self, compound: str, draw: int, cache: dict | None = None) -> tuple[str, str, str]:
        """``(source, batch, well)`` of ``(compound, draw)``; never depends on anything else of the compound
        than its hash key, so p'(C) is the same for every compound."""
        key = self._key(compound)
        n_b, n_w = len(self.space.batches), len(self.space.wells)
        if self.kind == "uniform":
            b = _uniform_index(n_b, self.namespace, key, draw, "batch")
            w = _uniform_index(n_w, self.namespace, key, draw, "well")
        else:
            cache = {} if cache is None else cache
            b = self._stratified_index(n_b, key, "batch", draw, cache)
            w = self._stratified_index(n_w, key, "well", draw, cache)
        source, batch = self.space.batches[b]
        return source, batch, self.space.wells[w]

    # ------------------------------------------------------------------ blocks
    def block(self, block: int) -> pd.DataFrame:
        """Rows of one block as a DataFrame with :data:`DESIGN_COLUMNS` (Draw int32, Seed/rows int64)."""
        rows = self.block_rows(block)
        n = self.draws
        cache: dict = {}
        records = []
        for r in rows:
            compound = self.compounds[r // n]
            draw = r % n
            source, batch, well = self.confounders(compound, draw, cache)
            records.append((r, block, compound, draw, source, batch, well, self.seed(compound, draw)))
        frame = pd.DataFrame.from_records(records, columns=list(DESIGN_COLUMNS))
        return frame.astype({"Metadata_DesignRow": "int64", "Metadata_Block": "int64",
                             "Metadata_Draw": "int32", "Metadata_Seed": "int64"})

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


def wells_from_vocab(rows: list[str] | None = None, columns: list[str] | None = None,
                     wells: list[str] | None = None) -> tuple[str, ...]:
    """Training well positions: the explicit well list when a vocabulary has one, else every row x column
    combination (``"A"`` x ``"01"`` -> ``"A01"``; integer columns are zero-padded to two digits as in JUMP)."""
    if wells:
        return tuple(sorted(set(map(str, wells))))
    if not rows or not columns:
        return ()
    cols = [f"{int(c):02d}" if str(c).isdigit() else str(c) for c in columns]
    return tuple(sorted(f"{r}{c}" for r in rows for c in cols))


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
        include_negcon: always add DMSO (profiles are normalised against it).
        design: ``uniform`` (the paper) or ``stratified`` (every batch/well equally often per compound).
        shared_seed: same noise and confounders for draw i across compounds (the paper's comparison trick).
        seed_namespace: hashed with (compound, draw) into seeds and confounders; default: the run name.
            Give scm and scm-free runs the same namespace to generate both from identical noise.
        sampler: ``ddim`` or ``dpm++`` (DPM-Solver++ multistep), built from the training noise schedule.
        steps: sampler steps (DDIM-50 / DPM-Solver++-20 are the usual quality points).
        guidance_scale: classifier-free guidance; 1.0 = conditional only (one U-Net pass per step).
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

    model_run: str = "scm"
    run: str | None = None
    draws: int = 10
    compounds: str = "all"
    include_negcon: bool = True
    design: Literal["uniform", "stratified"] = "uniform"
    shared_seed: bool = False
    seed_namespace: str | None = None
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
                     "max_in_flight_per_actor"):
            if getattr(self, name) < 1:
                raise UserError(f"generate config: {name} must be >= 1, got {getattr(self, name)}")
        if self.guidance_scale < 0:
            raise UserError(f"generate config: guidance_scale must be >= 0, got {self.guidance_scale}")

    @property
    def run_name(self) -> str:
        return self.run or f"{self.model_run}-N{self.draws}"

    @property
    def namespace(self) -> str:
        return self.seed_namespace or self.run_name


#: Presets. ``demo`` is sized for the demo budget (scm + scm-free at N=10 and N=30, ~80 compounds, i.e.
#: ~6,500 images at 32x32 px on 2 CPU cores in ~3-4 min with the tiny U-Net): DPM-Solver++ with 10 steps,
#: no guidance, 2 actors of 1 CPU. ``paper`` follows the paper (N=100 draws, DDIM-50, one GPU per actor).
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
