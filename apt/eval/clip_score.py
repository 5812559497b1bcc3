"""CLIP score of images against their prompts, from a local transformers CLIP directory.

    CLIPScore(I, c) = 100 * max(cos(E_I(I), E_T(c)), 0), averaged over the set

(Hessel et al. 2021, CLIP-S with w = 100, clamped per pair, as the torchmetrics `CLIPScore`
docstring states it. torchmetrics' code, `functional/multimodal/clip_score.py`, computes
`100 * (img * txt).sum(-1)` on L2-normalised embeddings and clamps the *mean* at 0; the two agree
whenever every cosine is >= 0, which holds for real CLIP models on image-caption pairs. The
result also records the unclamped mean.) The model is `transformers.CLIPModel` + `CLIPProcessor` loaded with
`from_pretrained(local_dir)` (HF_HUB_OFFLINE is respected; nothing is downloaded). The usual
choice, and torchmetrics' default, is `openai/clip-vit-large-patch14`; record which directory you
used (the result does). Images are preprocessed by the directory's own CLIP image processor
(shortest side resize, centre crop, CLIP mean/std); prompts longer than the text encoder's
context (77 tokens for OpenAI CLIP) are truncated.

Prompt sets: `load_prompts` reads a .txt (one prompt per line) or a .json (a list of strings, or
a list of {"caption": ...}); an empty prompt is a ValueError naming its line / item.

Legend: B batch, H height, W width, D embedding dims.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch

CLIP_PUBLIC_SOURCE = "https://huggingface.co/openai/clip-vit-large-patch14"


def load_prompts(path: str) -> list[str]:
    """Prompts from a .txt (one per line) or .json (list of str or of {"caption": str})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path!r}")
    prompts: list[str] = []
    if path.endswith(".json"):
        with open(path) as f:
            items = json.load(f)
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of prompts, got {type(items).__name__}")
        for i, item in enumerate(items):
            if isinstance(item, dict):
                if "caption" not in item:
                    raise ValueError(f"{path}: item {i} has no 'caption' key (keys: {sorted(item)})")
                item = item["caption"]
            if not isinstance(item, str):
                raise ValueError(f"{path}: item {i} is {type(item).__name__}, expected a string")
            if not item.strip():
                raise ValueError(f"{path}: item {i} is an empty prompt")
            prompts.append(item.strip())
    else:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                raise ValueError(f"{path}: line {lineno} is an empty prompt")
            prompts.append(line.strip())
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _check_clip_dir(model_dir: str) -> None:
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(
            f"CLIP model directory {model_dir!r} not found. It cannot be downloaded here; save a "
            f"transformers CLIP model there (e.g. {CLIP_PUBLIC_SOURCE}, with its processor files)."
        )
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{model_dir!r} has no config.json: not a transformers model directory")
    with open(cfg_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "clip":
        raise ValueError(
            f"{model_dir!r} holds a {model_type!r} model, not a CLIP model (config.json model_type "
            "must be 'clip'); CLIP score needs a transformers CLIPModel directory"
        )


class CLIPScorer:
    """A local CLIP model and its processor, scoring (image, prompt) pairs."""

    def __init__(self, model_dir: str, device: str | torch.device = "cpu") -> None:
        _check_clip_dir(model_dir)
        from transformers import CLIPModel, CLIPProcessor

        self.model_dir = model_dir
        self.device = device
        self.model = CLIPModel.from_pretrained(model_dir).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(model_dir)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def score(self, images: Sequence[np.ndarray] | torch.Tensor | np.ndarray, prompts: Sequence[str]) -> torch.Tensor:
        """uint8 images (B, H, W, 3) and B prompts -> float64 (B,) 100 * cos (unclamped)."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        images = [np.asarray(im) for im in images]
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        for i, im in enumerate(images):
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
                raise ValueError(f"image {i} must be uint8 (H, W, 3), got {im.dtype} {im.shape}")
        for i, p in enumerate(prompts):
            if not p or not p.strip():
                raise ValueError(f"prompt {i} is empty")
        inputs = self.processor(text=list(prompts), images=images, return_tensors="pt", padding=True,
                                truncation=True, max_length=self.max_length)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        out = self.model(**inputs)
        img_BD = torch.nn.functional.normalize(out.image_embeds.double(), dim=-1)
        txt_BD = torch.nn.functional.normalize(out.text_embeds.double(), dim=-1)
        return (100.0 * (img_BD * txt_BD).sum(-1)).cpu()


def compute_clip_score(
    images: Sequence[np.ndarray] | torch.Tensor | np.ndarray,
    prompts: Sequence[str],
    *,
    model_dir: str | None = None,
    scorer: CLIPScorer | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> dict:
    """Mean CLIP score of image i against prompt i; returns a report dict."""
    if scorer is None:
        if model_dir is None:
            raise ValueError("pass model_dir (a local CLIP directory) or a CLIPScorer")
        scorer = CLIPScorer(model_dir, device)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if len(images) == 0:
        raise ValueError("no images to score")
    cos100_B = torch.cat([
        scorer.score(images[i : i + batch_size], prompts[i : i + batch_size])
        for i in range(0, len(images), batch_size)
    ])
    return _report(cos100_B, scorer.model_dir)


def _report(cos100_B: torch.Tensor, model_dir: str) -> dict:
    scores_B = cos100_B.clamp(min=0.0)
    return {
        "metric": "clip_score",
        "clip_score": float(scores_B.mean()),
        "clip_score_std": float(scores_B.std()) if len(scores_B) > 1 else 0.0,
        "clip_score_unclamped_mean": float(cos100_B.mean()),
        "N": len(scores_B),
        "convention": "mean over pairs of 100 * max(cos, 0) (Hessel et al. 2021; torchmetrics CLIPScore)",
        "model_dir": os.path.abspath(model_dir),
    }


def clip_score_files(
    paths: Sequence[str], prompts: Sequence[str], *, model_dir: str, batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> dict:
    """CLIP score of PNG files (path i against prompt i), streamed in batches."""
    from apt.eval.video_io import read_png

    if len(paths) != len(prompts):
        raise ValueError(f"{len(paths)} images but {len(prompts)} prompts")
    scorer = CLIPScorer(model_dir, device)
    scores = [
        scorer.score([read_png(p) for p in paths[i : i + batch_size]], prompts[i : i + batch_size])
        for i in range(0, len(paths), batch_size)
    ]
    return _report(torch.cat(scores), model_dir)
