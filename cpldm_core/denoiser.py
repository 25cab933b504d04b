"""The confounder-aware denoiser: a diffusers U-Net conditioned, by cross-attention, on a structural causal model.

Conditioning tokens (the paper's SCM-conditioned model, METHOD.md "Model"):

    tokens = [compound tokens (T_c, from MolT5 token embeddings or a projected pooled fingerprint)]
           + [source token, batch token, well-row token, well-column token]       (``kind="scm"`` only)

``kind="scm-free"`` is the same network whose cross-attention sees the compound tokens only: the two models differ
exactly in the four confounder tokens (same U-Net, same compound projection). With ``global_condition`` the same
tokens also enter the timestep embedding (mean compound token, then the confounder tokens), so the first layer of
that projection is W wide in ``scm-free`` and 5 W in ``scm``: again the confounders and nothing else.

Two kinds of "null" token support classifier-free guidance and marginalisation:
- ``drop_mask`` (B,) bool replaces a sample's compound tokens by a learned null compound token (conditioning
  dropout during training; the unconditional branch of guidance at sampling time);
- each confounder vocabulary has one extra index, ``vocab.null_index(k)``, a learned "unknown/any value" token.
  Training drops each confounder to it with a small probability, which lets the model score images from
  held-out batches (validation) without pretending to know their batch.

diffusers is imported lazily (9-12 s, ENVIRONMENT.md): importing this module is cheap.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from cpldm_core.errors import UserError
from cpldm_core.load_data import split_well  # one well-name parser, re-exported for the vocabulary

#: Names of the four confounders, in the column order of ``ConfounderVocab.encode``'s output.
CONFOUNDERS = ("source", "batch", "well_row", "well_col")

#: Latent channels: two SDXL-VAE groups of 4 latent channels each (METHOD.md "Model").
LATENT_CHANNELS = 8

_COMMON = dict(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, flip_sin_to_cos=True, freq_shift=0,
               act_fn="silu", mid_block_type="UNetMidBlock2DCrossAttn")

#: diffusers ``UNet2DConditionModel`` configurations. ``attention_head_dim`` is, in diffusers' (legacy) naming,
#: the number of heads; the paper's author config uses one head per level (num_head_channels 512/768 with
#: 512/768 channels), so 1 head.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # METHOD.md: 3 levels 256/512/768, 2 residual blocks per level, attention in the 2 deepest levels,
    # 8 latent channels at 48x48 (384 px crops / 8).
    "paper": dict(_COMMON, sample_size=48, block_out_channels=(256, 512, 768), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=1, cross_attention_dim=768, norm_num_groups=32),
    # the same shape at ~1/8 of the width: CPU demos at 16x16 latents (128 px crops)
    "small": dict(_COMMON, sample_size=16, block_out_channels=(32, 64, 96), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=2, cross_attention_dim=96, norm_num_groups=16),
    # CI: two levels, one attention level, 8x8 latents; a training step takes milliseconds on a CPU
    "tiny": dict(_COMMON, sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=1, cross_attention_dim=32, norm_num_groups=8),
}


@dataclass(frozen=True)
class ConfounderVocab:
    """Values of each confounder seen in training, saved with the model (``vocab.json``).

    Index ``i < len(values)`` codes the i-th value; index ``len(values)`` (:meth:`null_index`) is the learned
    "unknown / any value" token.
    """

    sources: tuple[str, ...]
    batches: tuple[str, ...]
    well_rows: tuple[str, ...]
    well_cols: tuple[int, ...]
    _lookup: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        lookup = {}
        for name, values in zip(CONFOUNDERS, self.values):
            if len(set(values)) != len(values):
                raise UserError(f"confounder vocabulary '{name}' has duplicate values")
            lookup[name] = {v: i for i, v in enumerate(values)}
        object.__setattr__(self, "_lookup", lookup)

    @property
    def values(self) -> tuple[tuple, ...]:
        return (self.sources, self.batches, self.well_rows, self.well_cols)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of known values per confounder (the embedding tables hold one more: the null token)."""
        return tuple(len(v) for v in self.values)

    def null_index(self, k: int) -> int:
        return len(self.values[k])

    @classmethod
    def fit(cls, sources: Iterable[str], batches: Iterable[str], wells: Iterable[str]) -> "ConfounderVocab":
        """Vocabulary of the (sorted) distinct values seen."""
        parsed = [split_well(w) for w in wells]
        rows, cols = (tuple(x) for x in zip(*parsed)) if parsed else ((), ())
        return cls(sources=tuple(sorted(set(map(str, sources)))), batches=tuple(sorted(set(map(str, batches)))),
                   well_rows=tuple(sorted(set(rows), key=lambda r: (len(r), r))),
                   well_cols=tuple(sorted(set(cols))))

    def encode(self, sources: Sequence[str], batches: Sequence[str], wells: Sequence[str],
               allow_unknown: bool = False) -> torch.Tensor:
        """Confounder codes, (B, 4) int64, columns (source, batch, well row, well column).

        An unknown value raises :class:`UserError` naming it, unless ``allow_unknown`` (validation on held-out
        batches), where it maps to that confounder's null index.
        """
        if not (len(sources) == len(batches) == len(wells)):
            raise ValueError("sources, batches and wells must have the same length")
        out = torch.empty((len(sources), 4), dtype=torch.long)
        for i, (s, b, w) in enumerate(zip(sources, batches, wells)):
            row, col = split_well(w)
            for k, value in enumerate((str(s), str(b), row, col)):
                code = self._lookup[CONFOUNDERS[k]].get(value)
                if code is None:
                    if not allow_unknown:
                        known = self.values[k]
                        shown = ", ".join(map(str, known[:10])) + (" ..." if len(known) > 10 else "")
                        raise UserError(f"unknown {CONFOUNDERS[k]} {value!r} (row {i}): the model was trained on "
                                        f"{len(known)} value(s): {shown}")
                    code = self.null_index(k)
                out[i, k] = code
        return out

    def decode(self, codes: torch.Tensor) -> list[tuple]:
        """(B, 4) codes -> (source, batch, well name) per row; null indices decode to ``None``."""
        out = []
        for row in codes.tolist():
            vals = [self.values[k][c] if c < len(self.values[k]) else None for k, c in enumerate(row)]
            well = f"{vals[2]}{vals[3]:02d}" if vals[2] is not None and vals[3] is not None else None
            out.append((vals[0], vals[1], well))
        return out

    def to_dict(self) -> dict:
        return {"sources": list(self.sources), "batches": list(self.batches), "well_rows": list(self.well_rows),
                "well_cols": list(self.well_cols)}

    @classmethod
    def from_dict(cls, data: dict) -> "ConfounderVocab":
        try:
            return cls(sources=tuple(map(str, data["sources"])), batches=tuple(map(str, data["batches"])),
                       well_rows=tuple(map(str, data["well_rows"])), well_cols=tuple(map(int, data["well_cols"])))
        except KeyError as exc:
            raise UserError(f"confounder vocabulary lacks key {exc}") from None


class ConfounderAwareDenoiser(nn.Module):
    """v-prediction U-Net with SCM conditioning tokens.

    Args:
        unet: a ``UNET_PRESETS`` name or a full ``UNet2DConditionModel`` config dict.
        kind: ``"scm"`` (compound + 4 confounder tokens) or ``"scm-free"`` (compound tokens only).
        vocab: confounder vocabularies (required for ``scm``; kept for bookkeeping in ``scm-free``).
        compound_dim: D of the compound input (pooled fingerprint dim, or MolT5 token dim).
        compound_tokens: tokens a pooled (B, D) compound vector is projected to (ignored for token input).
        compound_input: ``"pooled"`` ((B, D) vectors) or ``"tokens"`` ((B, T, D) token embeddings + mask).
        metadata: free JSON-able dict saved with the model (the training pipeline stores the noise schedule
            and training config here, so generation can rebuild its samplers from the model alone).
        sample_size: latent side the model is trained on; overrides the preset's ``sample_size`` so that the
            saved config says which latents the model knows (the U-Net itself is convolutional and would
            accept any side, but samples drawn at another side than the trained one are out of distribution).
        global_condition: also add the conditioning to the U-Net's timestep embedding (diffusers'
            ``class_embed_type="projection"``), which shifts every ResNet block at every resolution, the
            first level included; cross-attention reaches only the two deepest levels. The global vector is
            the masked mean of the compound tokens, followed (``scm``) by the four confounder tokens: (B, W)
            or (B, 5 W). Saved in the U-Net config, so a loaded model knows it.
    """

    def __init__(self, unet: str | dict = "tiny", kind: str = "scm", vocab: ConfounderVocab | None = None,
                 compound_dim: int = 2048, compound_tokens: int = 1, compound_input: str = "pooled",
                 metadata: dict | None = None, sample_size: int | None = None, global_condition: bool = False):
        super().__init__()
        from diffusers import UNet2DConditionModel

        if kind not in ("scm", "scm-free"):
            raise UserError(f"model kind {kind!r} must be 'scm' or 'scm-free'")
        if compound_input not in ("pooled", "tokens"):
            raise UserError(f"compound_input {compound_input!r} must be 'pooled' or 'tokens'")
        if kind == "scm" and vocab is None:
            raise UserError("an scm model needs a confounder vocabulary")
        if isinstance(unet, str):
            if unet not in UNET_PRESETS:
                raise UserError(f"unknown U-Net preset {unet!r}; choose one of {', '.join(UNET_PRESETS)}")
            unet_config = dict(UNET_PRESETS[unet])
        else:
            unet_config = dict(unet)
        if sample_size is not None:
            unet_config["sample_size"] = int(sample_size)
        if global_condition:
            n_global = 1 + (4 if kind == "scm" else 0)
            unet_config.update(class_embed_type="projection",
                               projection_class_embeddings_input_dim=n_global * int(unet_config["cross_attention_dim"]))
        elif unet_config.get("class_embed_type") not in (None, "projection"):
            raise UserError(f"U-Net class_embed_type {unet_config['class_embed_type']!r} is not supported "
                            "(the denoiser's only class embedding is the global condition, 'projection')")
        self.unet_preset = unet if isinstance(unet, str) else None
        self.unet_config = unet_config
        self.kind = kind
        self.vocab = vocab
        self.compound_dim = int(compound_dim)
        self.compound_tokens = int(compound_tokens)
        self.compound_input = compound_input
        self.global_condition = unet_config.get("class_embed_type") == "projection"
        self.metadata = dict(metadata or {})

        self.unet = UNet2DConditionModel(**unet_config)
        width = int(unet_config["cross_attention_dim"])
        self.token_dim = width
        n_out = width * (self.compound_tokens if compound_input == "pooled" else 1)
        # LayerNorm first: fingerprints are 0/1 vectors, MolT5 tokens have arbitrary scale
        self.compound_proj = nn.Sequential(nn.LayerNorm(self.compound_dim), nn.Linear(self.compound_dim, n_out),
                                           nn.SiLU(), nn.Linear(n_out, n_out))
        self.null_compound = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        if kind == "scm":
            # one table per confounder, each with one extra row: the learned null ("unknown value") token
            self.confounder_embed = nn.ModuleList(nn.Embedding(n + 1, width) for n in vocab.sizes)
            for emb in self.confounder_embed:
                nn.init.normal_(emb.weight, std=0.02)
        else:
            self.confounder_embed = None

    # ------------------------------------------------------------------ conditioning
    @property
    def n_confounder_tokens(self) -> int:
        return 4 if self.kind == "scm" else 0

    def compound_token_states(self, compound: torch.Tensor, compound_mask: torch.Tensor | None = None,
                              drop_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Compound tokens (B, T_c, W) float and their mask (B, T_c) bool.

        ``compound`` is (B, D) for pooled input or (B, T, D) token embeddings with ``compound_mask`` (B, T)
        (1 = real token). ``drop_mask`` (B,) bool replaces a sample's compound tokens by the null token.
        """
        dtype = self.null_compound.dtype
        compound = compound.to(dtype)
        if self.compound_input == "pooled":
            if compound.dim() != 2 or compound.shape[1] != self.compound_dim:
                raise UserError(f"compound input must be (B, {self.compound_dim}), got {tuple(compound.shape)}")
            tokens = self.compound_proj(compound).view(compound.shape[0], self.compound_tokens, self.token_dim)
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        else:
            if compound.dim() != 3 or compound.shape[2] != self.compound_dim:
                raise UserError(f"compound tokens must be (B, T, {self.compound_dim}), got {tuple(compound.shape)}")
            tokens = self.compound_proj(compound)
            mask = (torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if compound_mask is None
                    else compound_mask.to(tokens.device).bool())
        # the null token always takes part in the graph (with zero gradient when nothing is dropped): DDP
        # requires every rank to produce a gradient for the same parameters at every step
        drop = (drop_mask.to(tokens.device).bool() if drop_mask is not None
                else torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device))
        null = self.null_compound.expand(tokens.shape[0], tokens.shape[1], -1)
        tokens = torch.where(drop[:, None, None], null, tokens)
        # a dropped sample attends to exactly one null token (the rest are masked out)
        first = torch.zeros_like(mask)
        first[:, 0] = True
        mask = torch.where(drop[:, None], first, mask)
        return tokens, mask

    def confounder_token_states(self, confounders: torch.Tensor) -> torch.Tensor:
        """(B, 4) long codes -> (B, 4, W) tokens (source, batch, well row, well column)."""
        if confounders is None:
            raise UserError("an scm model needs confounders (B, 4); use vocab.encode(sources, batches, wells)")
        if confounders.dim() != 2 or confounders.shape[1] != 4:
            raise UserError(f"confounders must be (B, 4) codes, got {tuple(confounders.shape)}")
        confounders = confounders.to(self.null_compound.device).long()
        for k, emb in enumerate(self.confounder_embed):
            col = confounders[:, k]
            if bool(((col < 0) | (col >= emb.num_embeddings)).any()):
                raise UserError(f"confounder code out of range for {CONFOUNDERS[k]} (0..{emb.num_embeddings - 1})")
        return torch.stack([emb(confounders[:, k]) for k, emb in enumerate(self.confounder_embed)], dim=1)

    def condition(self, compound: torch.Tensor, compound_mask: torch.Tensor | None = None,
                  confounders: torch.Tensor | None = None,
                  drop_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All cross-attention tokens (B, T_c [+4], W) and mask (B, T_c [+4]) bool."""
        tokens, mask = self.compound_token_states(compound, compound_mask, drop_mask)
        if self.kind == "scm":
            conf = self.confounder_token_states(confounders).to(tokens.dtype)
            tokens = torch.cat([tokens, conf], dim=1)
            mask = torch.cat([mask, torch.ones(conf.shape[:2], dtype=torch.bool, device=mask.device)], dim=1)
        return tokens, mask

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, compound: torch.Tensor,
                compound_mask: torch.Tensor | None = None, confounders: torch.Tensor | None = None,
                drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted v, (B, 8, h, w), same dtype as the U-Net's output.

        Args:
            latents: noisy latents (B, 8, h, w) float.
            timesteps: (B,) or scalar int diffusion steps in [0, 1000).
            compound: (B, D) pooled vectors or (B, T, D) tokens.
            compound_mask: (B, T) 1 = real token (token input only).
            confounders: (B, 4) int64 codes from ``vocab.encode`` (scm; ignored by scm-free).
            drop_mask: (B,) bool, True = drop this sample's compound conditioning (classifier-free guidance).
        """
        tokens, mask = self.condition(compound, compound_mask, confounders, drop_mask)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(latents.shape[0])
        class_labels = self.global_vector(tokens, mask) if self.global_condition else None
        return self.unet(latents, timesteps, encoder_hidden_states=tokens,
                         encoder_attention_mask=mask.to(tokens.dtype), class_labels=class_labels).sample

    def global_vector(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The global condition (B, W) or (B, 5 W) from :meth:`condition`'s tokens (B, T, W) and mask (B, T):
        the masked mean of the compound tokens, then (``scm``) the four confounder tokens in order."""
        n_conf = self.n_confounder_tokens
        n_comp = tokens.shape[1] - n_conf
        weights = mask[:, :n_comp].to(tokens.dtype)[..., None]
        compound = (tokens[:, :n_comp] * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return torch.cat([compound, tokens[:, n_comp:].flatten(1)], dim=1) if n_conf else compound

    # ------------------------------------------------------------------ persistence
    def config_dict(self) -> dict:
        return {"unet": self.unet_config, "unet_preset": self.unet_preset, "kind": self.kind,
                "vocab": self.vocab.to_dict() if self.vocab is not None else None,
                "compound_dim": self.compound_dim, "compound_tokens": self.compound_tokens,
                "compound_input": self.compound_input, "metadata": self.metadata}

    @classmethod
    def from_config_dict(cls, cfg: dict) -> "ConfounderAwareDenoiser":
        vocab = ConfounderVocab.from_dict(cfg["vocab"]) if cfg.get("vocab") else None
        unet = cfg.get("unet") or cfg["unet_preset"]
        return cls(unet=unet, kind=cfg["kind"], vocab=vocab, compound_dim=cfg["compound_dim"],
                   compound_tokens=cfg.get("compound_tokens", 1), compound_input=cfg.get("compound_input", "pooled"),
                   metadata=cfg.get("metadata"))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json``, ``vocab.json`` and ``weights.pt`` (a float32 state dict) to a local directory."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(self.config_dict(), indent=2, default=list))
        (d / "vocab.json").write_text(json.dumps(self.vocab.to_dict() if self.vocab else None, indent=2))
        state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
                 for k, v in self.state_dict().items()}
        torch.save(state, d / "weights.pt")

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu"
                        ) -> "ConfounderAwareDenoiser":
        """Load what :meth:`save_pretrained` wrote (a local directory); returns the model in eval mode."""
        d = Path(directory)
        if not (d / "config.json").exists() or not (d / "weights.pt").exists():
            raise UserError(f"{d} is not a saved denoiser (needs config.json and weights.pt)")
        model = cls.from_config_dict(json.loads((d / "config.json").read_text()))
        state = torch.load(d / "weights.pt", map_location=map_location, weights_only=True)
        model.load_state_dict(state)
        return model.eval()

    def clone(self) -> "ConfounderAwareDenoiser":
        return copy.deepcopy(self)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
