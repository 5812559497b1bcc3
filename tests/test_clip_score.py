"""CLIP score with a tiny CLIP built offline (CLIPConfig + a hand-made BPE vocabulary)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from apt.eval.clip_score import CLIPScorer, clip_score_files, compute_clip_score, load_prompts
from apt.eval.video_io import write_png


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    d = str(tmp_path_factory.mktemp("tiny_clip"))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(d)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=24, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(d)
    return d


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(n)]


PROMPTS = ["a red cube", "two blue spheres", "a green cone moving left", "x"]


def test_load_prompts_txt_and_json(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n  a dog  \n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    (tmp_path / "p.json").write_text(json.dumps(["a", "b"]))
    assert load_prompts(str(tmp_path / "p.json")) == ["a", "b"]
    (tmp_path / "c.json").write_text(json.dumps([{"caption": "a"}, {"caption": "b", "id": 3}]))
    assert load_prompts(str(tmp_path / "c.json")) == ["a", "b"]


def test_empty_prompt_names_the_line(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    with pytest.raises(ValueError, match="line 2"):
        load_prompts(str(tmp_path / "p.txt"))
    (tmp_path / "p.json").write_text(json.dumps(["a", {"caption": "  "}]))
    with pytest.raises(ValueError, match="item 1"):
        load_prompts(str(tmp_path / "p.json"))
    (tmp_path / "q.json").write_text(json.dumps([{"text": "a"}]))
    with pytest.raises(ValueError, match="caption"):
        load_prompts(str(tmp_path / "q.json"))


def test_score_matches_definition_and_batching(clip_dir):
    scorer = CLIPScorer(clip_dir)
    imgs = images(4)
    res = compute_clip_score(imgs, PROMPTS, scorer=scorer, batch_size=4)
    res1 = compute_clip_score(imgs, PROMPTS, scorer=scorer, batch_size=1)
    assert res["N"] == 4 and 0.0 <= res["clip_score"] <= 100.0
    assert res1["clip_score"] == pytest.approx(res["clip_score"], abs=1e-4)

    # Definition: mean over pairs of 100 * max(cos(image embedding, text embedding), 0).
    inputs = scorer.processor(text=PROMPTS, images=imgs, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1).double()
    assert res["clip_score"] == pytest.approx(float((100 * cos).clamp(min=0).mean()), abs=1e-4)
    assert res["clip_score_unclamped_mean"] == pytest.approx(float(100 * cos.mean()), abs=1e-4)
    assert res["model_dir"] == os.path.abspath(clip_dir)


def test_score_files(clip_dir, tmp_path):
    paths = []
    for i, im in enumerate(images(3, seed=1)):
        paths.append(str(tmp_path / f"{i}.png"))
        write_png(paths[-1], im)
    res = clip_score_files(paths, PROMPTS[:3], model_dir=clip_dir, batch_size=2)
    direct = compute_clip_score(images(3, seed=1), PROMPTS[:3], model_dir=clip_dir)
    assert res["clip_score"] == pytest.approx(direct["clip_score"], abs=1e-5)


def test_bad_inputs(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        CLIPScorer(str(tmp_path / "nope"))
    not_clip = tmp_path / "t5"
    not_clip.mkdir()
    (not_clip / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="not a CLIP model") as e:
        CLIPScorer(str(not_clip))
    assert str(not_clip) in str(e.value)
    scorer = CLIPScorer(clip_dir)
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(images(2), ["one"])
    with pytest.raises(ValueError, match="empty"):
        scorer.score(images(1), [" "])
