"""Shared machinery of the diffusers adapters: one class per family wraps a diffusers transformer
and speaks apt's backbone protocol (``apt.models.backbone``).

What every adapter does, whatever the family:

- ``forward(x_BCTHW, t_B, text)`` takes latents in (B, C, T, H, W) (images: T = 1), apt's time
  t in [0, 1] (t = 1 pure noise) and a ``TextCond``; it converts them to the family's layout,
  timestep scale and text inputs, and returns the rectified-flow velocity ``v = eps - x0`` in
  (B, C, T, H, W). Flow-matching families already predict this: diffusers'
  ``FlowMatchEulerDiscreteScheduler.step`` computes ``x_next = x + (sigma_next - sigma) * out``,
  which is apt's Euler step ``x + (t_next - t) * v``. CogVideoX predicts DDPM v and is converted
  (``cogvideox.py``).
- ``blocks`` is a ModuleList *view* (built on each access, never registered, so the state dict
  has no duplicates) of the transformer blocks in execution order.
- ``visual_tokens(block_output)`` picks the (B, N, D) visual tokens from a block's output, whose
  form differs per family (tensor, (hidden, encoder), (encoder, hidden), a joint sequence).
- ``hidden_dim`` is the width of those tokens (the transformer's inner dim).
- ``config`` is a small ``AdapterConfig`` (num_heads, prediction, in_channels, patch, text
  dims), the fields apt's stage modules read from a backbone's ``config``.

State dicts: the wrapped diffusers module is ``self.model``, so an adapter's keys are the
diffusers keys prefixed by ``model.``; ``load_adapter_state`` accepts both forms.

Legend: B batch, C latent channels, T/H/W latent frames/height/width, N visual tokens, L text
tokens, D width, P pooled text width.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from apt.models.backbone import TextCond


@dataclass
class AdapterConfig:
    """What apt's code needs to know about a wrapped transformer."""

    family: str
    num_heads: int
    in_channels: int
    """Latent channels of the (B, C, T, H, W) input (FLUX: the packed channels / 4)."""
    patch_size: tuple[int, int, int]
    """(pt, ph, pw) in latent units."""
    text_dim: int
    """Width of the text token embeddings the transformer takes."""
    pooled_dim: int = 0
    """Width of the pooled text vector (0 = the family takes none)."""
    max_text_length: int = 0
    """Fixed text length the family needs (CogVideoX), 0 = any."""
    video: bool = True
    """False for image-only families (T must be 1)."""
    prediction: str = "velocity"


@dataclass(frozen=True)
class PipelineText:
    """How the family's diffusers pipeline turns a prompt into the transformer's text inputs.

    The teacher was trained on what its pipeline feeds it, so apt conditions every stage (latent
    pre-encoding, training, sampling, evaluation) the same way: ``apt.text_pipeline`` runs these
    encoders as the pipeline's ``encode_prompt`` does. A pipeline encodes each prompt to a fixed
    token count, so a prompt's conditioning never depends on the other prompts of a batch.
    """

    encoders: tuple[str, ...]
    """The pipeline's text-encoder components (its subfolders), in the order its ``encode_prompt`` runs them."""
    max_length: int
    """The pipeline's default ``max_sequence_length`` (tokens of the main encoder; ``text.max_length`` sets it)."""
    attention_mask: bool
    """True when the transformer takes a mask over the text tokens; False when it attends to every token."""
    pooled: bool
    """True when the transformer takes a pooled text vector (``pooled_projections``) from a CLIP encoder."""
    summary: str
    """One line for docs and error messages: encoders, lengths, masking, pooled vector."""


def read_model_config(local_dir: str | Path) -> tuple[Path, dict]:
    """(directory holding config.json, the config) for a diffusers model dir or a pipeline dir.

    A pipeline directory (``model_index.json`` + ``transformer/``) is accepted and its
    ``transformer`` subfolder used.
    """
    d = Path(local_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"diffusers model directory not found: {d}")
    if not (d / "config.json").exists() and (d / "transformer" / "config.json").exists():
        d = d / "transformer"
    if not (d / "config.json").exists():
        raise ValueError(f"{local_dir} is not a diffusers model directory (no config.json)")
    try:
        config = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / 'config.json'} is not valid JSON: {e}") from None
    return d, config


def is_diffusers_dir(path: str | Path) -> bool:
    """True for a directory with a diffusers ``config.json`` (``_class_name``), or a pipeline dir."""
    try:
        _, config = read_model_config(path)
    except (FileNotFoundError, ValueError):
        return False
    return "_class_name" in config


class DiffusersAdapter(nn.Module):
    """Base class: subclasses set ``family``, ``model_class`` and implement the per-family parts."""

    family: str = ""
    model_class: str = ""  # the diffusers class name, as written in config.json's _class_name
    pipeline_class: str = ""  # the family's text-to-image/video pipeline (model_index.json's _class_name)
    text: PipelineText | None = None  # how that pipeline encodes prompts (apt.text_pipeline runs it)
    visual_index: int | None = None  # position of the visual tokens in a tuple block output

    def __init__(self, model: nn.Module):
        super().__init__()
        if type(model).__name__ != self.model_class:
            raise TypeError(f"{type(self).__name__} wraps {self.model_class}, got {type(model).__name__}")
        self.model = model
        self.config = self.describe(model.config)
        self.hidden_dim = self.inner_dim(model.config)
        self._num_text_tokens = 0  # set per forward; lets visual_tokens() slice joint sequences
        self._num_visual_tokens = 0
        self._warned_pooled = False

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def diffusers_class(cls):
        import diffusers

        return getattr(diffusers, cls.model_class)

    @classmethod
    def check_dir(cls, local_dir: str | Path) -> Path:
        d, config = read_model_config(local_dir)
        name = config.get("_class_name")
        if name != cls.model_class:
            raise ValueError(f"{local_dir} holds a {name or 'non-diffusers'} model, not a {cls.model_class} (model.family '{cls.family}')")
        return d

    @classmethod
    def pipeline_kwargs(cls, model_dir: Path) -> dict:
        """Constructor settings a family reads from the pipeline around ``model_dir`` (its sibling
        ``scheduler/`` or ``vae/``), so the adapter computes what that pipeline computes; {} by default."""
        return {}

    @classmethod
    def from_pretrained(cls, local_dir: str | Path, **kwargs) -> "DiffusersAdapter":
        """Load weights from a local diffusers model dir (or a pipeline dir's ``transformer/``)."""
        d = cls.check_dir(local_dir)
        return cls(cls.diffusers_class().from_pretrained(str(d), local_files_only=True), **{**cls.pipeline_kwargs(d), **kwargs})

    @classmethod
    def from_config_dir(cls, local_dir: str | Path, **kwargs) -> "DiffusersAdapter":
        """The architecture of a local diffusers model, randomly initialised (no weights read)."""
        d = cls.check_dir(local_dir)
        klass = cls.diffusers_class()
        return cls(klass.from_config(klass.load_config(str(d))), **{**cls.pipeline_kwargs(d), **kwargs})

    @classmethod
    def from_config(cls, config: dict, **kwargs) -> "DiffusersAdapter":
        return cls(cls.diffusers_class().from_config(config), **kwargs)

    def save_pretrained(self, out_dir: str | Path, **kwargs) -> None:
        self.model.save_pretrained(str(out_dir), **kwargs)

    # -- per-family hooks ------------------------------------------------------------------------
    @classmethod
    def describe(cls, mc) -> AdapterConfig:
        raise NotImplementedError

    @staticmethod
    def inner_dim(mc) -> int:
        return mc.num_attention_heads * mc.attention_head_dim

    def block_lists(self) -> list[nn.ModuleList]:
        return [self.model.transformer_blocks]

    def _forward(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond) -> torch.Tensor:
        raise NotImplementedError

    # -- backbone protocol -----------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        lists = self.block_lists()
        if len(lists) == 1:
            return lists[0]
        return nn.ModuleList([b for blocks in lists for b in blocks])

    def visual_tokens(self, block_output) -> torch.Tensor:
        """(B, N, D) visual tokens of one block's output (tuple element, or slice of a joint sequence)."""
        out = block_output[self.visual_index] if isinstance(block_output, (tuple, list)) else block_output
        N, L = self._num_visual_tokens, self._num_text_tokens
        if N and out.shape[1] == L + N and L:  # one joint [text, visual] sequence (e.g. older FLUX single blocks)
            return out[:, L:]
        return out

    def forward(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond) -> torch.Tensor:
        """Rectified-flow velocity v = eps - x0 for latents x at time t (t = 1: pure noise)."""
        self.check_input_shape(tuple(x_BCTHW.shape))
        self.check_text(text)
        t_B = t_B.to(x_BCTHW.device).float().expand(x_BCTHW.shape[0])
        return self._forward(x_BCTHW, t_B, text)

    # -- shapes and text ---------------------------------------------------------------------------
    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ValueError naming the mismatch if (B, C, T, H, W) does not fit the transformer."""
        c = self.config
        if len(shape) != 5:
            raise ValueError(f"expected latents (B, C, T, H, W), got shape {tuple(shape)}")
        _, C, T, H, W = shape
        pt, ph, pw = c.patch_size
        if C != c.in_channels:
            raise ValueError(f"latents have {C} channels but the {self.model_class} expects {c.in_channels}")
        if H % ph or W % pw:
            raise ValueError(f"latent resolution {H}x{W} is not divisible by the {self.model_class} patch size {ph}x{pw}")
        if not c.video and T != 1:
            raise ValueError(f"{self.model_class} is an image model: latents must have T=1 frame, got {T}")
        if T % pt:
            raise ValueError(f"{T} latent frames is not divisible by the {self.model_class} temporal patch size {pt}")

    def check_text(self, text: TextCond) -> None:
        c = self.config
        D = text.emb_BLD.shape[-1]
        if D != c.text_dim:
            raise ValueError(f"text embeddings have width {D} but the {self.model_class} expects {c.text_dim} (check text.encoder)")
        if text.pooled_BP is not None and c.pooled_dim and text.pooled_BP.shape[-1] != c.pooled_dim:
            raise ValueError(f"pooled text has width {text.pooled_BP.shape[-1]} but the {self.model_class} expects {c.pooled_dim}")
        if c.max_text_length and text.emb_BLD.shape[1] > c.max_text_length:
            raise ValueError(f"text has {text.emb_BLD.shape[1]} tokens but the {self.model_class} takes at most {c.max_text_length} (text.max_length)")

    def masked_text(self, text: TextCond, dtype: torch.dtype) -> torch.Tensor:
        """Token embeddings with padding zeroed (families that take no mask, as the Wan pipeline pads)."""
        return (text.emb_BLD * text.mask_BL[..., None].to(text.emb_BLD.dtype)).to(dtype)

    def pooled(self, text: TextCond, dtype: torch.dtype) -> torch.Tensor:
        """The pooled text vector, or zeros when the TextCond carries none (documented per family)."""
        B = text.emb_BLD.shape[0]
        if text.pooled_BP is not None:
            return text.pooled_BP.to(dtype)
        if not self._warned_pooled:
            warnings.warn(f"{self.family}: no pooled text (TextCond.pooled_BP) given; using zeros for pooled_projections", stacklevel=3)
            self._warned_pooled = True
        return text.emb_BLD.new_zeros(B, self.config.pooled_dim, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def enable_gradient_checkpointing(self) -> None:
        self.model.enable_gradient_checkpointing()


def load_adapter_state(adapter: DiffusersAdapter, state_dict: dict[str, torch.Tensor], *, source: str = "") -> None:
    """Load an adapter state dict (``model.``-prefixed keys) or a bare diffusers state dict."""
    if state_dict and not all(k.startswith("model.") for k in state_dict):
        state_dict = {f"model.{k}": v for k, v in state_dict.items()}
    try:
        adapter.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ValueError(f"weights {source} do not fit the {adapter.model_class} of model.path: {str(e).splitlines()[0]}") from None
