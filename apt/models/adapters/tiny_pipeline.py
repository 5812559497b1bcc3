"""Tiny complete diffusers pipelines of every supported family, built offline (tests, smoke runs).

``write_tiny_pipeline(family, root)`` saves a directory the stock pipeline class loads with
``from_pretrained``: the tiny transformer and VAE of ``apt.models.adapters.tiny``, the family's
scheduler, and tiny random text encoders with tokenizers of the pipeline's own classes (T5/UMT5 +
``T5Tokenizer``, CLIP + ``CLIPTokenizer``, Llama + ``LlamaTokenizer``), whose vocabularies are built
here from a word list (whole words, with single characters as the fallback for any other text).

The widths fit the tiny transformers: T5/UMT5/Llama give ``TEXT_DIM``-wide tokens; SD3's two CLIPs
give 32 + 32 (zero-padded to 64 by the pipeline) and 4 + 4 pooled; FLUX's and HunyuanVideo's CLIP
gives ``POOLED_DIM`` pooled.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from apt.models.adapters.tiny import POOLED_DIM, TEXT_DIM, tiny_transformer, tiny_vae

WORDS = (
    "a an the of on in and with to is at by moving move moves left right up down still static slowly quickly fast slow "
    "red green blue yellow white black gray grey orange purple pink brown circle square triangle star ball box cube "
    "background foreground small large big tiny clip video image photo number camera scene light dark bright"
).split()
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-()<>|_/{}\n"


def _template_words() -> list[str]:
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    text = re.sub(r"<\|[a-z_]+\|>", " ", DEFAULT_PROMPT_TEMPLATE["template"])
    return re.findall(r"[A-Za-z]+", text)


def _words() -> list[str]:
    words = WORDS + _template_words()
    return list(dict.fromkeys(words + [w.lower() for w in words]))


def t5_tokenizer():
    """A Unigram T5 tokenizer: whole words preferred, characters as the fallback."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in _words()] + [(c, -5.0) for c in CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _bpe(words: list[str], *, prefix: str = "", suffix: str = "", specials: dict[str, int], bare: tuple[str, ...] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Character vocabulary + the merges that build each word as one token (``bare`` words: without the prefix)."""
    vocab = dict(specials)
    for c in CHARS:
        for piece in (c, c + suffix):
            vocab.setdefault(piece, len(vocab))
    if prefix:
        vocab.setdefault(prefix, len(vocab))
    merges: list[tuple[str, str]] = []
    for w, pre in [(w, prefix) for w in words] + [(w, "") for w in bare]:
        parts = [pre, *w] if pre else list(w)
        if suffix:
            parts[-1] += suffix
        cur = parts[0]
        for p in parts[1:]:
            merges.append((cur, p))
            cur += p
            vocab.setdefault(cur, len(vocab))
    return vocab, list(dict.fromkeys(merges))


def clip_tokenizer(model_max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab, merges = _bpe(_words(), suffix="</w>", specials={"<|startoftext|>": 0, "<|endoftext|>": 1})
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def llama_tokenizer():
    """A SentencePiece-style BPE Llama tokenizer with the Llama-3 header tokens of HunyuanVideo's template."""
    from transformers import LlamaTokenizer

    specials = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    # The template's words right after its header tokens have no leading space; whole tokens for them and
    # for "1" make the template's prefix the pipeline's crop_start (95) tokens, as Llama-3's tokenizer does.
    vocab, merges = _bpe([*_words(), "1"], prefix="▁", specials=specials, bare=("system", "user", "Describe"))
    tok = LlamaTokenizer(vocab=vocab, merges=merges, pad_token="<pad>", padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    return tok


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def t5_encoder(tokenizer, *, umt5: bool = False, seed: int = 0):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=16, d_ff=2 * TEXT_DIM, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return _seeded(seed, lambda: model_cls(config).eval())


def clip_encoder(tokenizer, *, hidden: int, projection: int | None = None, seed: int = 0):
    """CLIPTextModelWithProjection when ``projection`` is given (SD3), else CLIPTextModel (FLUX, HunyuanVideo)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=projection or hidden,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model_cls = CLIPTextModel if projection is None else CLIPTextModelWithProjection
    return _seeded(seed, lambda: model_cls(config).eval())


def llama_encoder(tokenizer, *, seed: int = 0):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return _seeded(seed, lambda: LlamaModel(config).eval())


def _flow_scheduler(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kw)


def tiny_pipeline(family: str, seed: int = 0):
    """The family's stock pipeline object around tiny components (seeded, offline)."""
    import diffusers

    from apt.models.adapters import ADAPTERS

    base = dict(transformer=tiny_transformer(family, seed), vae=tiny_vae(family, seed))
    if family == "wan":  # the released pipelines ship UniPC (flow prediction); apt's export replaces it
        tok = t5_tokenizer()
        sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        parts = dict(tokenizer=tok, text_encoder=t5_encoder(tok, umt5=True, seed=seed + 1), scheduler=sched)
    elif family == "sd3":
        tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
        parts = dict(tokenizer=tok, text_encoder=clip_encoder(tok, hidden=32, projection=POOLED_DIM // 2, seed=seed + 1),
                     tokenizer_2=tok2, text_encoder_2=clip_encoder(tok2, hidden=32, projection=POOLED_DIM // 2, seed=seed + 2),
                     tokenizer_3=tok3, text_encoder_3=t5_encoder(tok3, seed=seed + 3), scheduler=_flow_scheduler(shift=3.0))
    elif family == "flux":
        tok, tok2 = clip_tokenizer(), t5_tokenizer()
        sched = _flow_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        parts = dict(tokenizer=tok, text_encoder=clip_encoder(tok, hidden=POOLED_DIM, seed=seed + 1),
                     tokenizer_2=tok2, text_encoder_2=t5_encoder(tok2, seed=seed + 2), scheduler=sched)
    elif family == "cogvideox":
        from apt.models.adapters.cogvideox import COGVIDEOX_SCHEDULER

        tok = t5_tokenizer()
        parts = dict(tokenizer=tok, text_encoder=t5_encoder(tok, seed=seed + 1), scheduler=diffusers.CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER))
    elif family == "ltx":
        tok = t5_tokenizer()
        sched = _flow_scheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096)
        parts = dict(tokenizer=tok, text_encoder=t5_encoder(tok, seed=seed + 1), scheduler=sched)
    elif family == "hunyuan":
        tok, tok2 = llama_tokenizer(), clip_tokenizer()
        parts = dict(tokenizer=tok, text_encoder=llama_encoder(tok, seed=seed + 1), tokenizer_2=tok2,
                     text_encoder_2=clip_encoder(tok2, hidden=POOLED_DIM, seed=seed + 2), scheduler=_flow_scheduler(shift=7.0))
    else:
        raise ValueError(f"unknown family {family!r}")
    return getattr(diffusers, ADAPTERS[family].pipeline_class)(**base, **parts)


def write_tiny_pipeline(family: str, root: str | Path, *, seed: int = 0) -> dict[str, str]:
    """Save a tiny complete pipeline of ``family`` under root; returns its pipeline/transformer/vae dirs."""
    root = Path(root)
    tiny_pipeline(family, seed).save_pretrained(str(root))
    return {"pipeline": str(root), "transformer": str(root / "transformer"), "vae": str(root / "vae")}
