"""Bring-your-own-model chain, end to end on CPU with a tiny complete diffusers pipeline of every family:

media files -> pixel shards -> latent + text pre-encoding (the pipeline's VAE; its text encoders run as
the pipeline runs them) -> consistency distillation from the diffusers teacher -> APT -> ``python -m apt
export`` (a complete pipeline) -> the STOCK pipeline class, called with ``prompt=`` and the README's
settings, gives apt's own one-step (and, where the pipeline can express it, two-step) output.

One chain per family (module-scoped fixture, ~10 s each); the tests below share it.
"""

from __future__ import annotations

import json
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
from apt.export import from_pipeline_latents, to_pipeline_latents
from apt.inference import load_generator, sample, seeded_noise
from apt.models.adapters import ADAPTERS
from apt.models.adapters.tiny_pipeline import write_tiny_pipeline
from apt.text import TextEncoder
from tests.test_adapters import write_mp4

pytestmark = pytest.mark.integration
torch.set_num_threads(1)

CHAINS = {
    # family: (recipe, pixel policy (frames, height, width), latent (C, T, H, W), text.max_length)
    "wan": ("recipes/video/wan-1280x720-24fps.yaml", (5, 32, 32), (4, 2, 4, 4), 16),
    "sd3": ("recipes/image/sd3-1024px.yaml", (1, 32, 32), (4, 1, 16, 16), 16),
    "flux": ("recipes/image/flux-1024px.yaml", (1, 32, 32), (4, 1, 16, 16), 16),
    "cogvideox": ("recipes/video/cogvideox-1280x720-24fps.yaml", (9, 32, 32), (4, 3, 4, 4), 32),  # = the tiny max_text_seq_length
    "ltx": ("recipes/video/ltx-1280x704-24fps.yaml", (9, 64, 64), (8, 3, 4, 4), 16),
    "hunyuan": ("recipes/video/hunyuan-1280x720-24fps.yaml", (5, 32, 32), (4, 2, 4, 4), 16),
}
CAPTIONS = ["a red circle moving left on a black background", "a blue square moving up on a gray background",
            "a green triangle moving right on a white background", "a red square moving down on a black background"]
PROMPTS = ["a red circle moving left on a black background", "a small blue star"]


def make_media(d: Path, frames: int) -> None:
    d.mkdir()
    for i, cap in enumerate(CAPTIONS):
        if frames == 1:
            Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(d / f"m{i}.png")
        else:
            write_mp4(str(d / f"m{i}.mp4"), frames=12, fps=12)
        (d / f"m{i}.txt").write_text(cap)


@pytest.fixture(scope="module", params=sorted(CHAINS))
def chain(request, tmp_path_factory):
    """The whole chain for one family; returns its paths and the exported pipeline directory."""
    fam = request.param
    tmp = tmp_path_factory.mktemp(f"chain_{fam}")
    recipe, (F, H, W), (C, T, h, w), L = CHAINS[fam]
    tiny = write_tiny_pipeline(fam, tmp / "model")
    # 1. media -> pixel shards -> latents + text, encoded as the pipeline encodes prompts
    make_media(tmp / "media", F)
    report = write_media_shards(tmp / "media", tmp / "px", MediaPolicy(frames=F, fps=12, height=H, width=W), samples_per_shard=2, progress=False)
    assert report["written"] == 4 and report["skipped"] == []
    codec = LatentCodec.load(tiny["vae"])
    summary = encode_latent_shards(str(tmp / "px"), str(tmp / "lat"), codec, TextEncoder.load(tiny["pipeline"], max_length=L), progress=False)
    assert summary["complete"] and summary["samples_written"] == 4
    common = [
        "tiny", "cpu", f"model.path={tiny['transformer']}", f"model.vae={tiny['vae']}", "model.gradient_checkpointing=false",
        f"text.encoder={tiny['pipeline']}", f"text.max_length={L}", f"data.shards={tmp / 'lat'}", "data.batch_size=2",
        f"data.channels={C}", f"data.frames={T}", f"data.height={h}", f"data.width={w}", "data.num_workers=0",
    ]
    # 2. stage 1: consistency distillation from the diffusers teacher
    distill = tmp / "distill"
    assert main(["fit", recipe, *common, "stage=distill", f"run_dir={distill}", f"distill.teacher={tiny['transformer']}", "distill.num_steps=4"]) == 0
    assert [p.name for p in list_checkpoints(distill)][-1] == "step-000002"
    # 3. stage 2: APT, D from the original diffusers weights, G from the distilled EMA
    run = tmp / "apt"
    assert main(["fit", recipe, *common, "stage=apt", f"run_dir={run}", f"apt.generator={distill}", f"apt.teacher={tiny['transformer']}", "apt.d_warmup_steps=1"]) == 0
    # 4. export a complete pipeline with the CLI
    assert main(["export", str(run), "--out", str(tmp / "export")]) == 0
    return {"family": fam, "tmp": tmp, "tiny": tiny, "run": run, "export": tmp / "export", "codec": codec, "common": common, "recipe": recipe}


def test_chain_writes_checkpoints_samples_and_a_complete_pipeline(chain):
    fam, run, out = chain["family"], chain["run"], chain["export"]
    last = latest_checkpoint(run)
    assert last.name == "step-000002"
    assert (run / "samples").is_dir() and any((run / "samples").glob("*.png"))  # samples decoded through the VAE
    g_ema = load_file(str(last / "generator_ema.safetensors"))
    assert all(k.startswith("model.") for k in g_ema)
    # the shards hold the text the pipeline convention gives (Wan's zero rows dropped on disk, restored at load)
    from apt.data.latent_shards import latent_train_loader

    batch = next(iter(latent_train_loader(str(chain["tmp"] / "lat"), batch_size=2, seed=0, shuffle_buffer=4)))
    want = TextEncoder.load(chain["tiny"]["pipeline"], max_length=CHAINS[fam][3]).encode(batch["caption"])
    assert torch.equal(batch["text_emb"], want.emb_BLD) and torch.equal(batch["text_mask"], want.mask_BL)
    assert (want.pooled_BP is None) == ("text_pooled" not in batch)
    if want.pooled_BP is not None:
        assert torch.equal(batch["text_pooled"], want.pooled_BP)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ADAPTERS[fam].pipeline_class
    assert all((out / k).is_dir() for k, v in index.items() if isinstance(v, list) and v[0] is not None)
    assert (out / "apt_one_step.json").exists() and "prompt=" in (out / "README.md").read_text()
    import diffusers

    stock = getattr(diffusers, ADAPTERS[fam].model_class).from_pretrained(str(out / "transformer"))
    assert all(torch.equal(stock.state_dict()[k[len("model."):]], v) for k, v in g_ema.items())


def _stock_vs_apt(chain, steps: int, prompts: list[str] = PROMPTS) -> float | None:
    """max |stock pipeline(prompt=prompts) - apt's own sample for PROMPTS| for the README's call at 1 or 2 steps
    (None: not expressible)."""
    import diffusers

    fam, out = chain["family"], chain["export"]
    settings = json.loads((out / "apt_one_step.json").read_text())
    call = settings["call"]
    if steps == 2:
        if settings["two_step"] is None:
            return None
        call = settings["two_step"]["call"]
    gen = load_generator(chain["run"])
    c = gen.config
    seeds = [3, 4]
    z = seeded_noise((c.data.channels, c.data.frames, c.data.height, c.data.width), seeds)
    with torch.no_grad():
        ours = sample(gen.net, gen.text_encoder, c, PROMPTS, seeds, steps=steps, cfg_scale=1.0)
    pipe = getattr(diffusers, settings["pipeline"]).from_pretrained(str(out))
    if steps == 2 and settings["two_step"]["scheduler_overrides"]:
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, **settings["two_step"]["scheduler_overrides"])
    patch = gen.net.config.patch_size
    result = pipe(prompt=prompts, latents=to_pipeline_latents(fam, z, patch), output_type="latent", **call)
    theirs = from_pipeline_latents(fam, result[0], tuple(z.shape), patch)
    assert theirs.shape == ours.shape
    err = float((theirs.float() - ours).abs().max())
    label = "" if prompts == PROMPTS else " (control: the prompts swapped)"
    print(f"{fam} {steps}-step{label}: max |stock pipeline - apt| = {err:.3g} (outputs up to {float(ours.abs().max()):.3g})")  # docs/byo_model.md
    return err


def test_stock_pipeline_with_prompt_gives_apts_one_step_output(chain):
    """Pipeline.from_pretrained(export)(prompt=..., num_inference_steps=1, latents=apt's noise) == apt's G(z, c)."""
    err = _stock_vs_apt(chain, steps=1)
    assert err <= 1e-5, f"{chain['family']}: stock pipeline differs from apt by {err:.3g}"
    # the comparison sees the text: the same noise under the other prompt is far from apt's sample
    assert _stock_vs_apt(chain, steps=1, prompts=PROMPTS[::-1]) > 1e-2


def test_stock_pipeline_gives_apts_two_step_output_where_it_can_express_it(chain):
    err = _stock_vs_apt(chain, steps=2)
    if chain["family"] == "cogvideox":
        assert err is None  # integer DDIM timesteps: the README says so
        assert "cannot express" in (chain["export"] / "README.md").read_text()
        return
    assert err <= 1e-5, f"{chain['family']}: two-step stock pipeline differs from apt by {err:.3g}"


def test_apts_one_step_output_does_not_depend_on_the_other_prompts(chain):
    gen = load_generator(chain["run"])
    with torch.no_grad():
        alone = sample(gen.net, gen.text_encoder, gen.config, PROMPTS[:1], [3], steps=1, cfg_scale=1.0)
        batched = sample(gen.net, gen.text_encoder, gen.config, [PROMPTS[0], "a large yellow ball moving slowly up on a dark background", PROMPTS[1]],
                         [3, 5, 6], steps=1, cfg_scale=1.0)
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=1e-5)


def test_a_run_refuses_shards_encoded_under_another_text_convention(chain):
    """The chain's shards carry the pipeline convention at text.max_length; another length is refused before training."""
    from apt.config import ConfigError, load_config
    from apt.train import check_paths

    fam = chain["family"]
    L = CHAINS[fam][3]
    overrides = [a for a in chain["common"] if "=" in a] + ["stage=distill", f"distill.teacher={chain['tiny']['transformer']}", f"text.max_length={L + 1}"]
    c = load_config(chain["recipe"], ["tiny", "cpu"], overrides)
    with pytest.raises(ConfigError, match=rf"data.shards: .*lat holds text encoded under the convention '{fam}-pipeline/{L}' but this run encodes text as '{fam}-pipeline/{L + 1}'"):
        check_paths(c)
