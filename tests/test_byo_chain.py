"""Bring-your-own-model chain, end to end on CPU with tiny diffusers models of every family:

media files -> pixel shards -> latent + text pre-encoding (tiny VAE, toy-t5) -> consistency
distillation from the diffusers teacher -> APT -> export to diffusers -> reload with the stock
diffusers class -> one-step sample of the right shape (and decoded to pixels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from apt.checkpoint import latest_checkpoint, list_checkpoints
from apt.cli import main
from apt.codecs import LatentCodec
from apt.data.latent_shards import encode_latent_shards
from apt.data.media_shards import MediaPolicy, write_media_shards
from apt.export import export_diffusers
from apt.models.adapters import ADAPTERS
from apt.models.adapters.tiny import write_tiny_family
from apt.models.backbone import TextCond
from apt.text import TextEncoder
from tests.test_adapters import write_mp4

pytestmark = pytest.mark.integration
torch.set_num_threads(1)

CHAINS = {
    # family: (recipe, pixel policy (frames, height, width), latent (C, T, H, W))
    "wan": ("recipes/video/wan-1280x720-24fps.yaml", (5, 32, 32), (4, 2, 4, 4)),
    "sd3": ("recipes/image/sd3-1024px.yaml", (1, 32, 32), (4, 1, 16, 16)),
    "flux": ("recipes/image/flux-1024px.yaml", (1, 32, 32), (4, 1, 16, 16)),
    "cogvideox": ("recipes/video/cogvideox-1280x720-24fps.yaml", (9, 32, 32), (4, 3, 4, 4)),
    "ltx": ("recipes/video/ltx-1280x704-24fps.yaml", (9, 64, 64), (8, 3, 4, 4)),
    "hunyuan": ("recipes/video/hunyuan-1280x720-24fps.yaml", (5, 32, 32), (4, 2, 4, 4)),
}
CAPTIONS = ["a red circle moving left on a black background", "a blue square moving up on a gray background",
            "a green triangle moving right on a white background", "a red square moving down on a black background"]


def make_media(d: Path, frames: int) -> None:
    d.mkdir()
    for i, cap in enumerate(CAPTIONS):
        if frames == 1:
            Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(d / f"m{i}.png")
        else:
            write_mp4(str(d / f"m{i}.mp4"), frames=12, fps=12)
        (d / f"m{i}.txt").write_text(cap)


@pytest.mark.parametrize("fam", sorted(CHAINS))
def test_media_to_one_step_diffusers_model(fam, tmp_path):
    recipe, (F, H, W), (C, T, h, w) = CHAINS[fam]
    tiny = write_tiny_family(fam, tmp_path / "model")
    # 1. media -> pixel shards -> latents + text embeddings
    make_media(tmp_path / "media", F)
    report = write_media_shards(tmp_path / "media", tmp_path / "px", MediaPolicy(frames=F, fps=12, height=H, width=W), samples_per_shard=2, progress=False)
    assert report["written"] == 4 and report["skipped"] == []
    codec = LatentCodec.load(tiny["vae"])
    summary = encode_latent_shards(str(tmp_path / "px"), str(tmp_path / "lat"), codec, TextEncoder.load("toy-t5"), progress=False)
    assert summary["complete"] and summary["samples_written"] == 4
    common = [
        "tiny", "cpu", f"model.path={tiny['transformer']}", f"model.vae={tiny['vae']}", "model.gradient_checkpointing=false",
        "text.encoder=toy-t5", "text.max_length=32", f"data.shards={tmp_path / 'lat'}", "data.batch_size=2",
        f"data.channels={C}", f"data.frames={T}", f"data.height={h}", f"data.width={w}", "data.num_workers=0",
    ]
    # 2. stage 1: consistency distillation from the diffusers teacher
    distill = tmp_path / "distill"
    assert main(["fit", recipe, *common, "stage=distill", f"run_dir={distill}", f"distill.teacher={tiny['transformer']}", "distill.num_steps=4"]) == 0
    assert [p.name for p in list_checkpoints(distill)][-1] == "step-000002"
    # 3. stage 2: APT, D from the original diffusers weights, G from the distilled EMA
    run = tmp_path / "apt"
    assert main(["fit", recipe, *common, "stage=apt", f"run_dir={run}", f"apt.generator={distill}", f"apt.teacher={tiny['transformer']}", "apt.d_warmup_steps=1"]) == 0
    last = latest_checkpoint(run)
    assert last.name == "step-000002"
    assert (run / "samples").is_dir() and any((run / "samples").glob("*.png"))  # samples decoded through the VAE
    g_ema = load_file(str(last / "generator_ema.safetensors"))
    assert all(k.startswith("model.") for k in g_ema)
    # 4. export -> stock diffusers class -> one-step sample
    out = export_diffusers(run, tmp_path / "export")
    assert (out / "config.json").exists() and (out / "apt_one_step.json").exists() and (out / "README.md").exists()
    import diffusers

    cls = ADAPTERS[fam]
    stock = getattr(diffusers, cls.model_class).from_pretrained(str(out))
    assert all(torch.equal(stock.state_dict()[k[len("model."):]], v) for k, v in g_ema.items())
    net = cls(stock).eval()
    z = torch.randn(1, C, T, h, w, generator=torch.Generator().manual_seed(0))
    text = TextEncoder.load("toy-t5").encode([CAPTIONS[0]])
    with torch.no_grad():
        x0 = z - net(z, torch.ones(1), TextCond(text.emb_BLD, text.mask_BL))
        pixels = codec.decode(x0)
    assert x0.shape == (1, C, T, h, w) and torch.isfinite(x0).all()
    assert pixels.shape == (1, 3, F, H, W)
