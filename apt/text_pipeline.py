"""Prompts -> the transformer's text inputs exactly as each family's diffusers pipeline computes them.

A pretrained teacher was trained on what its pipeline feeds it: a fixed token count, with or without
a mask, the encoders' pad rows, and for some families a pooled CLIP vector. apt conditions the
teacher, the generator and the discriminator the same way in every stage (latent pre-encoding,
training, sampling, evaluation), so distillation and adversarial training stay on the teacher's
distribution, a prompt's conditioning does not depend on the other prompts of a batch, and the
exported generator runs in the stock pipeline with ``prompt=`` (tests/test_stock_pipeline.py).

``PipelineTextEncoder.load(pipeline_dir)`` reads the pipeline's ``model_index.json``, finds the
family whose adapter names that pipeline class (``DiffusersAdapter.pipeline_class``), loads the text
encoders and tokenizers the adapter declares (``DiffusersAdapter.text``) and encodes with the
family's function below, each a transcription of the pipeline's ``encode_prompt`` (diffusers
``pipelines/<family>/pipeline_<family>.py``):

- wan: ``WanPipeline._get_t5_prompt_embeds``
- sd3: ``StableDiffusion3Pipeline._get_clip_prompt_embeds`` x 2 + ``_get_t5_prompt_embeds``
- flux: ``FluxPipeline._get_clip_prompt_embeds`` (pooled) + ``_get_t5_prompt_embeds``
- cogvideox: ``CogVideoXPipeline._get_t5_prompt_embeds``
- ltx: ``LTXPipeline._get_t5_prompt_embeds``
- hunyuan: ``HunyuanVideoPipeline._get_llama_prompt_embeds`` + ``_get_clip_prompt_embeds``

The TextCond mask is what the transformer attends to: the tokenizer's mask for families whose
transformer takes one (LTX, HunyuanVideo), all True for the others (they attend to every row).

Legend: B prompts, L tokens, D text width, P pooled width.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from apt.models.backbone import TextCond

CACHE_SIZE = 256  # captions kept encoded (fixed-length rows are large: 512 x 4096 floats for Wan)


def pipeline_family(pipeline_dir: str | Path) -> str | None:
    """The adapter family of a diffusers pipeline directory (by model_index.json); None when the
    directory holds no model_index.json."""
    index = Path(pipeline_dir) / "model_index.json"
    if not index.exists():
        return None
    from apt.models.adapters import ADAPTERS

    name = json.loads(index.read_text()).get("_class_name")
    for family, cls in ADAPTERS.items():
        if cls.pipeline_class == name:
            return family
    supported = ", ".join(cls.pipeline_class for cls in ADAPTERS.values())
    raise ValueError(f"{pipeline_dir} holds a {name} pipeline; apt encodes prompts as {supported} do")


def convention_id(family: str, max_length: int) -> str:
    """The name shards and runs record for a family pipeline's text convention at max_length tokens."""
    return f"{family}-pipeline/{max_length}"


# ---------------------------------------------------------------- the pipelines' encode_prompt, per family
# Each takes the loaded components (name -> module/tokenizer), the prompts and max_length, and returns
# (emb_BLD, mask_BL or None for all-attended, pooled_BP or None), as the pipeline computes them.


def _ids(tokenizer, prompts: list[str], length: int, **kw) -> dict:
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt", **kw)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _wan(c: dict, prompts: list[str], L: int):
    # the pipeline's own cleaning (ftfy when installed, html unescaping, whitespace)
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    te = c["text_encoder"]
    inputs = _ids(c["tokenizer"], [prompt_clean(p) for p in prompts], L, add_special_tokens=True, return_attention_mask=True)
    ids, mask = inputs.input_ids.to(_device(te)), inputs.attention_mask.to(_device(te))
    emb = te(ids, mask).last_hidden_state
    # The pipeline keeps each prompt's rows and zero-pads back to L; the transformer attends to all L.
    return emb * mask.gt(0)[..., None].to(emb.dtype), None, None


def _clip(tokenizer, encoder, prompts: list[str], length: int):
    return encoder(_ids(tokenizer, prompts, length).input_ids.to(_device(encoder)), output_hidden_states=True)


def _sd3(c: dict, prompts: list[str], L: int):
    if c.get("text_encoder_3") is None:
        raise ValueError("an SD3 pipeline without text_encoder_3 (T5) is not supported: apt's text width is T5's")
    clip_len = c["tokenizer"].model_max_length  # StableDiffusion3Pipeline.tokenizer_max_length (77), for both CLIPs
    hidden, pooled = [], []
    for i in ("", "_2"):
        out = _clip(c["tokenizer" + i], c["text_encoder" + i], prompts, clip_len)
        pooled.append(out[0])  # CLIPTextModelWithProjection: text_embeds
        hidden.append(out.hidden_states[-2])  # clip_skip=None: penultimate layer
    te3 = c["text_encoder_3"]
    t5 = te3(_ids(c["tokenizer_3"], prompts, L, add_special_tokens=True).input_ids.to(_device(te3)))[0]
    clip = torch.cat(hidden, dim=-1)
    clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5.to(clip.device)], dim=-2), None, torch.cat(pooled, dim=-1)


def _flux(c: dict, prompts: list[str], L: int):
    clip_len = getattr(c["tokenizer"], "model_max_length", 77)  # FluxPipeline.tokenizer_max_length
    te, te2 = c["text_encoder"], c["text_encoder_2"]
    pooled = te(_ids(c["tokenizer"], prompts, clip_len).input_ids.to(_device(te)), output_hidden_states=False).pooler_output
    emb = te2(_ids(c["tokenizer_2"], prompts, L).input_ids.to(_device(te2)), output_hidden_states=False)[0]
    return emb, None, pooled


def _t5_unmasked(c: dict, prompts: list[str], L: int):
    te = c["text_encoder"]
    inputs = _ids(c["tokenizer"], prompts, L, add_special_tokens=True)
    return te(inputs.input_ids.to(_device(te)))[0], inputs.attention_mask.bool()


def _cogvideox(c: dict, prompts: list[str], L: int):
    emb, _ = _t5_unmasked(c, prompts, L)
    return emb, None, None


def _ltx(c: dict, prompts: list[str], L: int):
    emb, mask = _t5_unmasked(c, prompts, L)
    return emb, mask, None


def _hunyuan(c: dict, prompts: list[str], L: int):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    template, crop = DEFAULT_PROMPT_TEMPLATE["template"], DEFAULT_PROMPT_TEMPLATE["crop_start"]
    te = c["text_encoder"]
    inputs = _ids(c["tokenizer"], [template.format(p) for p in prompts], L + crop, return_attention_mask=True)
    ids, mask = inputs.input_ids.to(_device(te)), inputs.attention_mask.to(_device(te))
    emb = te(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-3]  # num_hidden_layers_to_skip=2
    te2 = c["text_encoder_2"]
    pooled = te2(_ids(c["tokenizer_2"], prompts, 77).input_ids.to(_device(te2)), output_hidden_states=False).pooler_output
    return emb[:, crop:], mask[:, crop:].bool(), pooled


ENCODE: dict[str, Callable] = {"wan": _wan, "sd3": _sd3, "flux": _flux, "cogvideox": _cogvideox, "ltx": _ltx, "hunyuan": _hunyuan}


class PipelineTextEncoder(nn.Module):
    """A family pipeline's frozen text encoders, encoding prompts as that pipeline does, with a
    bounded per-caption cache. Same interface as ``apt.text.TextEncoder`` (``encode``, ``dim``)."""

    def __init__(self, family: str, components: dict, *, max_length: int, name: str = ""):
        super().__init__()
        from apt.models.adapters import adapter_class

        spec = adapter_class(family).text
        missing = [k for k in spec.encoders if components.get(k) is None]
        if missing:
            raise ValueError(f"{name or family}: the {family} pipeline needs {', '.join(spec.encoders)}; missing {', '.join(missing)}")
        if max_length < 1:
            raise ValueError(f"text.max_length must be positive, got {max_length}")
        self.family, self.spec, self.max_length, self.name = family, spec, max_length, name or family
        self.encoders = nn.ModuleDict({k: components[k].eval().requires_grad_(False) for k in spec.encoders})
        self.tokenizers = {k: components[k] for k in components if k.startswith("tokenizer")}
        self._cache: OrderedDict[str, TextCond] = OrderedDict()
        self._dim: int | None = None

    @property
    def convention(self) -> str:
        return convention_id(self.family, self.max_length)

    @property
    def dim(self) -> int:
        """Width of the token embeddings (the transformer's text width)."""
        if self._dim is None:
            self._dim = int(self._encode_one("").emb_BLD.shape[-1])
        return self._dim

    @classmethod
    def load(cls, pipeline_dir: str | Path, *, max_length: int | None = None) -> PipelineTextEncoder:
        """The text encoders and tokenizers of a local diffusers pipeline directory (no hub access);
        ``max_length`` None: the pipeline's default ``max_sequence_length``."""
        import transformers

        from apt.models.adapters import adapter_class

        d = Path(pipeline_dir)
        family = pipeline_family(d)
        if family is None:
            raise FileNotFoundError(f"{pipeline_dir} is not a diffusers pipeline directory (no model_index.json)")
        spec = adapter_class(family).text
        index = json.loads((d / "model_index.json").read_text())
        components = {}
        for enc in spec.encoders:
            for key in (enc, "tokenizer" + enc[len("text_encoder"):]):
                entry = index.get(key)
                if not entry or entry[0] is None or not (d / key).is_dir():
                    raise FileNotFoundError(f"{d}: the {index['_class_name']} needs {key}/ for its prompts, and it is missing")
                klass = getattr(transformers, entry[1], None)
                if klass is None:
                    raise ValueError(f"{d / 'model_index.json'}: {key} is a {entry[0]}.{entry[1]}, not a transformers class")
                components[key] = klass.from_pretrained(str(d / key), local_files_only=True)
        return cls(family, components, max_length=max_length or spec.max_length, name=str(pipeline_dir))

    @torch.no_grad()
    def _encode_one(self, caption: str) -> TextCond:
        components = {**self.tokenizers, **dict(self.encoders.items())}
        emb, mask, pooled = ENCODE[self.family](components, [caption], self.max_length)
        emb = emb.float().cpu()  # the cache and encode()'s batch live on the CPU, as apt.text.TextEncoder's
        mask = torch.ones(emb.shape[:2], dtype=torch.bool) if mask is None else mask.cpu()
        return TextCond(emb, mask, None if pooled is None else pooled.float().cpu())

    def encode(self, captions: list[str], *, allow_empty: bool = False, cache: bool = True) -> TextCond:
        """Encode captions to (B, L, D) embeddings, (B, L) mask and (B, P) pooled vectors (families that
        take them). Each caption is encoded alone, at the pipeline's fixed length, so its rows do not depend
        on the rest of the batch. An empty caption (the CFG null/negative prompt, when allowed) goes through
        the encoders as the pipeline encodes its negative prompt."""
        conds = []
        for i, cap in enumerate(captions):
            if not isinstance(cap, str):
                raise TypeError(f"caption {i} is {type(cap).__name__}, expected str")
            if not cap.strip() and not allow_empty:
                raise ValueError(f"caption {i} is empty")
            cond = self._cache.get(cap) if cache else None
            if cond is None:
                cond = self._encode_one(cap)
                if cache:
                    self._cache[cap] = cond
                    if len(self._cache) > CACHE_SIZE:
                        self._cache.popitem(last=False)
            elif cache:
                self._cache.move_to_end(cap)
            conds.append(cond)
        return TextCond.cat(conds)
