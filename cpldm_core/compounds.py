"""Compound encoders: SMILES -> conditioning vectors (Morgan fingerprints) or token embeddings (MolT5).

The diffusion model is conditioned on compound *structure* so that it can generate images for compounds it
never saw (the paper uses a pretrained MolT5 encoder on SMILES). Two encoders share one interface,
``encoder.encode(list_of_smiles) -> dict(pooled, tokens, mask)``:

- :class:`MorganEncoder`: RDKit Morgan (ECFP-like) fingerprints, bits or counts; ``tokens`` is ``None``.
- :class:`MolT5Encoder`: a ``transformers`` ``T5EncoderModel`` + tokenizer from a path or model id; token-level
  embeddings for cross-attention plus a mask-weighted mean ("pooled") vector.

Pure compute: no ray, s3fs, zarr or duckdb here (``pipelines/embed.py`` does the I/O).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from cpldm_core.errors import UserError

#: Encoders this module provides; ``EmbedConfig.encoder`` picks one.
ENCODERS = ("morgan", "molt5")

#: A public MolT5 encoder checkpoint (Edwards et al. 2022, "Translation between Molecules and Natural
#: Language"); users pass it or a local copy as ``molt5_model``. Never downloaded in tests.
MOLT5_DEFAULT_MODEL = "laituan245/molt5-small"

#: SMILES tokenisation regex of Schwaller et al. 2019 ("Molecular Transformer", ACS Cent. Sci. 5:1572):
#: bracket atoms, two-letter halogens, organic-subset atoms, bonds, branches, ring-closure digits.
SMILES_REGEX = (r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>|\*|\$"
                r"|\%[0-9]{2}|[0-9])")

#: DMSO (the JUMP negative control, JCP2022_033924) as a molecule: controls are embedded like any compound.
DMSO_SMILES = "CS(C)=O"

#: Special tokens of the SMILES tokenizer built by :func:`make_smiles_tokenizer` (T5 conventions).
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"


@dataclass(frozen=True)
class EmbedConfig:
    """Configuration of ``cpldm embed``.

    Attributes:
        encoder: ``morgan`` (RDKit fingerprints, the embedded default) or ``molt5`` (T5 encoder).
        encoder_id: name of the cache (``embeddings/encoder=<id>/``); empty = derived, see :func:`encoder_id`.
        morgan_radius: Morgan radius (2 = ECFP4).
        morgan_bits: fingerprint length D.
        morgan_counts: count fingerprint (occurrences per bit) instead of 0/1 bits.
        molt5_model: local directory or model id passed to ``from_pretrained`` (tokenizer and encoder).
        molt5_max_tokens: token axis T; longer SMILES are truncated (the tokens.zarr has fixed T).
        batch_size: molecules per encoder forward pass.
        block_size: molecules per unit of work (one Parquet part, committed once); a multiple of
            ``token_chunk_rows`` so no two units write the same Zarr chunk.
        token_chunk_rows: rows per Zarr chunk of ``tokens.zarr``.
        device: ``auto`` (CUDA when visible), ``cpu`` or ``cuda``.
        num_cpus: CPUs per encoder actor.
        num_gpus: GPUs per encoder actor; ``None`` = 1 for molt5 when the cluster has GPUs, else 0.
        concurrency: encoder actors (Ray Data actor pool size).
        unit_pause_s: seconds to sleep after each unit; 0 in every preset (fault-injection tests use it to
            kill a node while a run is in flight).
    """

    encoder: Literal["morgan", "molt5"] = "morgan"
    encoder_id: str = ""
    morgan_radius: int = 2
    morgan_bits: int = 2048
    morgan_counts: bool = False
    molt5_model: str = MOLT5_DEFAULT_MODEL
    molt5_max_tokens: int = 128
    batch_size: int = 64
    block_size: int = 4096
    token_chunk_rows: int = 256
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_cpus: float = 1.0
    num_gpus: float | None = None
    concurrency: int = 1
    unit_pause_s: float = 0.0

    def __post_init__(self):
        if self.morgan_radius < 0 or self.morgan_bits <= 0 or self.molt5_max_tokens <= 1:
            raise ValueError("morgan_radius >= 0, morgan_bits > 0 and molt5_max_tokens > 1 are required")
        if self.batch_size <= 0 or self.block_size <= 0 or self.token_chunk_rows <= 0 or self.concurrency <= 0:
            raise ValueError("batch_size, block_size, token_chunk_rows and concurrency must be positive")
        if self.block_size % self.token_chunk_rows:
            raise ValueError(f"block_size ({self.block_size}) must be a multiple of token_chunk_rows "
                             f"({self.token_chunk_rows}) so units never share a Zarr chunk")
        if self.encoder_id and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.encoder_id):
            raise ValueError(f"encoder_id {self.encoder_id!r} may hold only letters, digits, '_', '.', '-'")


#: Presets: ``tiny`` for CI (seconds), ``demo`` for the embedded default; ``paper`` = MolT5 as in the paper.
EMBED_PRESETS: dict[str, EmbedConfig] = {
    "tiny": EmbedConfig(morgan_bits=256, batch_size=16, block_size=8, token_chunk_rows=4, molt5_max_tokens=32),
    "demo": EmbedConfig(),
    "paper": EmbedConfig(encoder="molt5", batch_size=128, block_size=4096, molt5_max_tokens=128),
}


def embed_preset(name: str) -> EmbedConfig:
    try:
        return EMBED_PRESETS[name]
    except KeyError:
        raise UserError(f"unknown embed preset {name!r}; choose one of {', '.join(EMBED_PRESETS)}") from None


def encoder_id(cfg: EmbedConfig) -> str:
    """Cache name for ``cfg``: ``morgan-r2-2048`` (``-counts`` appended for counts), ``molt5-<model>``.

    The id encodes everything that changes the vectors, so two configs never share one cache by accident.
    """
    if cfg.encoder_id:
        return cfg.encoder_id
    if cfg.encoder == "morgan":
        return f"morgan-r{cfg.morgan_radius}-{cfg.morgan_bits}" + ("-counts" if cfg.morgan_counts else "")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.molt5_model.rstrip("/")).name) or "model"
    name = name if name.lower().startswith("molt5") else f"molt5-{name}"
    return f"{name}-t{cfg.molt5_max_tokens}"


def encoder_settings(cfg: EmbedConfig) -> dict:
    """The config fields that determine the vectors (compared when a cache is reused)."""
    if cfg.encoder == "morgan":
        return {"encoder": "morgan", "radius": cfg.morgan_radius, "bits": cfg.morgan_bits,
                "counts": cfg.morgan_counts}
    return {"encoder": "molt5", "model": cfg.molt5_model, "max_tokens": cfg.molt5_max_tokens}


# ---------------------------------------------------------------------------------------------- molecules
@dataclass(frozen=True)
class Molecule:
    """A parsed compound: RDKit canonical SMILES and standard InChIKey."""

    smiles: str
    inchikey: str


def parse_smiles(smiles: str):
    """RDKit molecule from ``smiles``; :class:`UserError` carrying RDKit's own message when it is invalid."""
    from rdkit import Chem, rdBase

    if smiles is None or not str(smiles).strip():
        raise UserError("empty SMILES")
    with rdBase.CaptureErrorLog() as capture:
        mol = Chem.MolFromSmiles(str(smiles).strip())
    if mol is None:
        # RDKit logs one line per problem, each prefixed with a time stamp: keep the text only
        messages = capture.messages
        messages = messages.splitlines() if isinstance(messages, str) else [str(m) for m in messages]
        lines = [re.sub(r"^\[\d\d:\d\d:\d\d\]\s*", "", m).strip() for m in messages]
        detail = "; ".join(dict.fromkeys(x for x in lines if x)) or "RDKit could not parse it"
        raise UserError(f"invalid SMILES {smiles!r}: {detail}")
    return mol


def canonicalise(smiles: str) -> str:
    """RDKit canonical (isomeric) SMILES; :class:`UserError` with RDKit's message for invalid input."""
    from rdkit import Chem

    return Chem.MolToSmiles(parse_smiles(smiles))


def molecule(smiles: str) -> Molecule:
    """Canonical SMILES and InChIKey of ``smiles`` (``UserError`` when invalid)."""
    from rdkit import Chem, rdBase

    mol = parse_smiles(smiles)
    with rdBase.BlockLogs():  # InChI warnings (e.g. "Omitted undefined stereo") are not errors
        key = Chem.MolToInchiKey(mol)
    return Molecule(smiles=Chem.MolToSmiles(mol), inchikey=key)


# ---------------------------------------------------------------------------------------------- Morgan
class MorganEncoder:
    """Morgan fingerprints through RDKit's ``rdFingerprintGenerator``.

    ``encode`` returns ``pooled`` (N, morgan_bits) float32: 0/1 bits, or occurrence counts when
    ``morgan_counts``; ``tokens`` and ``mask`` are ``None``.
    """

    def __init__(self, cfg: EmbedConfig | None = None):
        from rdkit.Chem import rdFingerprintGenerator

        self.cfg = cfg or EmbedConfig()
        self.dim = self.cfg.morgan_bits
        self._gen = rdFingerprintGenerator.GetMorganGenerator(radius=self.cfg.morgan_radius,
                                                              fpSize=self.cfg.morgan_bits)

    def encode(self, smiles: Sequence[str]) -> dict:
        out = np.zeros((len(smiles), self.dim), dtype=np.float32)
        for i, s in enumerate(smiles):
            mol = parse_smiles(s)
            fp = (self._gen.GetCountFingerprintAsNumPy(mol) if self.cfg.morgan_counts
                  else self._gen.GetFingerprintAsNumPy(mol))
            out[i] = fp
        return {"pooled": out, "tokens": None, "mask": None}


# ---------------------------------------------------------------------------------------------- MolT5
class MolT5Encoder:
    """A T5 encoder over SMILES (MolT5 or any T5 checkpoint with a tokenizer).

    ``encode`` returns ``pooled`` (N, D) float32 = mean of the last hidden states over non-padding tokens,
    ``tokens`` (N, T, D) float32 = last hidden states padded/truncated to ``max_tokens`` (zeros at padding)
    and ``mask`` (N, T) bool (True = real token). D = ``model.config.d_model``.
    """

    def __init__(self, model, tokenizer, max_tokens: int = 128, batch_size: int = 64, device: str = "auto"):
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_tokens = int(max_tokens)
        self.batch_size = int(batch_size)
        self.dim = int(model.config.d_model)

    @classmethod
    def from_pretrained(cls, path_or_id: str, max_tokens: int = 128, batch_size: int = 64,
                        device: str = "auto", **kwargs) -> "MolT5Encoder":
        """Load tokenizer and ``T5EncoderModel`` from a local directory or a model id (``kwargs`` go to
        ``T5EncoderModel.from_pretrained``). A missing model raises :class:`UserError` naming it."""
        from transformers import AutoTokenizer, T5EncoderModel

        try:
            tokenizer = AutoTokenizer.from_pretrained(path_or_id)
            model = T5EncoderModel.from_pretrained(path_or_id, **kwargs)
        except OSError as exc:
            raise UserError(f"cannot load MolT5 encoder from {path_or_id!r}: {exc}") from None
        return cls(model, tokenizer, max_tokens=max_tokens, batch_size=batch_size, device=device)

    @classmethod
    def from_config(cls, cfg: EmbedConfig) -> "MolT5Encoder":
        return cls.from_pretrained(cfg.molt5_model, max_tokens=cfg.molt5_max_tokens, batch_size=cfg.batch_size,
                                   device=cfg.device)

    def encode(self, smiles: Sequence[str]) -> dict:
        import torch

        n, t = len(smiles), self.max_tokens
        pooled = np.zeros((n, self.dim), dtype=np.float32)
        tokens = np.zeros((n, t, self.dim), dtype=np.float32)
        mask = np.zeros((n, t), dtype=bool)
        for start in range(0, n, self.batch_size):
            chunk = list(smiles[start:start + self.batch_size])
            enc = self.tokenizer(chunk, padding="max_length", truncation=True, max_length=t,
                                 return_tensors="pt")
            ids = enc["input_ids"].to(self.device)
            att = enc["attention_mask"].to(self.device)
            with torch.inference_mode():
                hidden = self.model(input_ids=ids, attention_mask=att).last_hidden_state.float()
            m = att.unsqueeze(-1).float()
            hidden = hidden * m  # zero the padding positions so stored tokens carry no garbage
            mean = hidden.sum(1) / m.sum(1).clamp(min=1.0)
            stop = start + len(chunk)
            pooled[start:stop] = mean.cpu().numpy()
            tokens[start:stop] = hidden.cpu().numpy()
            mask[start:stop] = att.bool().cpu().numpy()
        return {"pooled": pooled, "tokens": tokens, "mask": mask}


def make_encoder(cfg: EmbedConfig):
    """The encoder ``cfg`` names, loaded once (model-holding classes call this in ``__init__``)."""
    if cfg.encoder == "morgan":
        return MorganEncoder(cfg)
    return MolT5Encoder.from_config(cfg)


# ---------------------------------------------------------------------------------------------- offline models
def smiles_vocabulary(smiles: Sequence[str]) -> list[str]:
    """Sorted SMILES tokens (by :data:`SMILES_REGEX`) occurring in ``smiles``."""
    pattern = re.compile(SMILES_REGEX)
    return sorted({tok for s in smiles for tok in pattern.findall(s)})


def make_smiles_tokenizer(smiles: Sequence[str], extra_tokens: Sequence[str] = ()):
    """A T5-style SMILES tokenizer (``PreTrainedTokenizerFast``): regex split, word-level vocabulary from
    ``smiles`` (+ ``extra_tokens``), ``</s>`` appended, ``<pad>`` id 0 as T5 expects. Unknown tokens -> ``<unk>``.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1, UNK_TOKEN: 2}
    for tok in sorted(set(smiles_vocabulary(smiles)) | set(extra_tokens)):
        vocab.setdefault(tok, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(SMILES_REGEX), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single=f"$A {EOS_TOKEN}",
                                                        special_tokens=[(EOS_TOKEN, vocab[EOS_TOKEN])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                   unk_token=UNK_TOKEN, model_max_length=512)


def save_random_molt5(path: str | Path, smiles: Sequence[str], d_model: int = 32, num_layers: int = 2,
                      num_heads: int = 2, d_ff: int = 64, seed: int = 0) -> Path:
    """Save a tiny randomly initialised T5 encoder + SMILES tokenizer at ``path`` in ``from_pretrained``
    format. Used offline (tests, benchmarks, the demo without a model hub); its vectors carry no chemistry
    beyond the token statistics."""
    import torch
    from transformers import T5Config, T5EncoderModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_smiles_tokenizer(smiles)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                      num_layers=num_layers, num_heads=num_heads, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    T5EncoderModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
