"""Text encoders: captions -> token embeddings + mask (``TextCond``), frozen, from a local directory.

``toy-t5`` is the embedded default: a small T5 encoder built from a config with fixed-seed random
weights and a word-level tokenizer built offline with ``tokenizers`` over the toy world's vocabulary.
Random frozen features are enough for the demo: the DiT learns to read them.

``text.encoder`` may also be a local directory, loaded with ``from_pretrained`` and no hub access:

- a diffusers pipeline directory (``model_index.json``): its text encoders, run as that pipeline runs
  them (``apt.text_pipeline``): the convention a diffusers teacher was trained with;
- a transformers tokenizer + encoder (T5/UMT5/CLIP text): apt's own convention below.

apt's own convention (``apt/<max_length>``, the built-in DiT's): the encoder runs with the mask over
the caption's tokens only (no padding), and a batch is zero-padded to its longest caption with the
mask marking the padding. A run records its convention (``text_convention``) and refuses latent
shards encoded under another one.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from apt.models.backbone import TextCond

if TYPE_CHECKING:
    from apt.text_pipeline import PipelineTextEncoder

TOY_ENCODER = "toy-t5"
_SPECIALS = ["[PAD]", "[UNK]", "[EOS]"]


def text_convention(encoder: str, max_length: int) -> str:
    """The convention ``text.encoder`` / ``text.max_length`` encode with, read without loading weights:
    ``<family>-pipeline/<L>`` for a diffusers pipeline directory, ``apt/<L>`` otherwise."""
    from apt.text_pipeline import convention_id, pipeline_family

    family = pipeline_family(encoder) if encoder != TOY_ENCODER and os.path.isdir(encoder) else None
    return f"apt/{max_length}" if family is None else convention_id(family, max_length)


def toy_vocabulary() -> list[str]:
    from apt.toy.world import TOY_WORDS

    return sorted(set(TOY_WORDS))


def build_toy_text_encoder(out_dir: str | None = None, *, dim: int = 64, seed: int = 0):
    """Build the toy tokenizer + T5 encoder deterministically; optionally save_pretrained to out_dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {w: i for i, w in enumerate(_SPECIALS + toy_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    config = T5Config(vocab_size=len(vocab), d_model=dim, d_kv=dim // 4, d_ff=2 * dim, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
        # T5's default init gives near-zero outputs at this size; unit-scale embeddings keep words apart.
        nn.init.normal_(model.shared.weight, std=1.0)
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
        model.save_pretrained(out_dir)
    return tokenizer, model


class TextEncoder(nn.Module):
    """Frozen tokenizer + encoder with a per-caption cache (captions repeat a lot in training)."""

    def __init__(self, tokenizer, model: nn.Module, max_length: int = 32):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def convention(self) -> str:
        return f"apt/{self.max_length}"

    @property
    def dim(self) -> int:
        return self.model.config.d_model if hasattr(self.model.config, "d_model") else self.model.config.hidden_size

    @classmethod
    def load(cls, name_or_dir: str, *, max_length: int = 32) -> TextEncoder | PipelineTextEncoder:
        """``toy-t5``, a diffusers pipeline directory (a ``PipelineTextEncoder``) or an encoder directory."""
        if name_or_dir == TOY_ENCODER:
            return cls(*build_toy_text_encoder(), max_length=max_length)
        if not os.path.isdir(name_or_dir):
            raise FileNotFoundError(f"text.encoder: {name_or_dir!r} is neither {TOY_ENCODER!r} nor a local directory")
        if os.path.exists(os.path.join(name_or_dir, "model_index.json")):
            from apt.text_pipeline import PipelineTextEncoder

            return PipelineTextEncoder.load(name_or_dir, max_length=max_length)
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModel, T5EncoderModel, UMT5EncoderModel

        config = AutoConfig.from_pretrained(name_or_dir)
        model_cls = {"t5": T5EncoderModel, "umt5": UMT5EncoderModel, "clip_text_model": CLIPTextModel, "clip": CLIPTextModel}.get(config.model_type)
        if model_cls is None:
            raise ValueError(f"text.encoder {name_or_dir!r}: unsupported model_type {config.model_type!r} (t5, umt5, clip)")
        # A diffusers pipeline keeps the tokenizer beside the encoder: text_encoder[_2]/ + tokenizer[_2]/.
        tok_dir = name_or_dir
        base = os.path.basename(os.path.normpath(name_or_dir))
        suffix = base[len("text_encoder"):] if base.startswith("text_encoder") else ""
        sibling = os.path.join(os.path.dirname(os.path.normpath(name_or_dir)), "tokenizer" + suffix)
        if not any(os.path.exists(os.path.join(name_or_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json", "spiece.model")) and os.path.isdir(sibling):
            tok_dir = sibling
        return cls(AutoTokenizer.from_pretrained(tok_dir), model_cls.from_pretrained(name_or_dir), max_length=max_length)

    @torch.no_grad()
    def _encode_one(self, caption: str) -> torch.Tensor:
        ids = self.tokenizer(caption, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = next(self.model.parameters()).device  # a LightningModule moves its encoder to the GPU
        out = self.model(input_ids=ids["input_ids"].to(device), attention_mask=ids["attention_mask"].to(device)).last_hidden_state
        return out[0].float().cpu()  # (L, D); the cache and encode()'s batch live on the CPU

    def encode(self, captions: list[str], *, allow_empty: bool = False, cache: bool = True) -> TextCond:
        """Encode captions to (B, L, D) embeddings + (B, L) mask. Empty text is an error unless allowed
        (the CFG null/negative prompt may be empty). ``cache=False`` runs the encoder even for captions
        seen before (and does not store them): what a new prompt costs."""
        embs = []
        for i, cap in enumerate(captions):
            if not isinstance(cap, str):
                raise TypeError(f"caption {i} is {type(cap).__name__}, expected str")
            if not cap.strip() and not allow_empty:
                raise ValueError(f"caption {i} is empty")
            emb = self._cache.get(cap) if cache else None
            if emb is None:
                emb = self._encode_one(cap) if cap.strip() else torch.zeros(0, self.dim)
                if cache:
                    self._cache[cap] = emb
            embs.append(emb)
        L = max(1, max(e.shape[0] for e in embs))
        emb = torch.zeros(len(embs), L, self.dim)
        mask = torch.zeros(len(embs), L, dtype=torch.bool)
        for i, e in enumerate(embs):
            emb[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = True
        return TextCond(emb, mask)
