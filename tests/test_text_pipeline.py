"""apt.text_pipeline: prompts encoded exactly as each family's stock diffusers pipeline encodes them, the
text convention a run and its shards record, and the errors that keep a teacher on its own convention.

Tiny complete pipelines (apt.models.adapters.tiny_pipeline) are built offline once per module.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from apt.config import ConfigError, load_config, save_config
from apt.models.adapters import ADAPTERS
from apt.models.adapters.tiny_pipeline import write_tiny_pipeline
from apt.text import TextEncoder, text_convention

torch.set_num_threads(1)
FAMILIES = sorted(ADAPTERS)
LENGTH = {"wan": 16, "sd3": 16, "flux": 16, "cogvideox": 32, "ltx": 16, "hunyuan": 16}  # cogvideox: the tiny max_text_seq_length
CAPTIONS = ["a red circle moving left on a black background", "a blue square", ""]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {fam: write_tiny_pipeline(fam, root / fam) for fam in FAMILIES}


def _stock_encode(fam: str, pipe, prompts: list[str], L: int):
    """(emb, mask or None, pooled or None) from the stock pipeline's own encode_prompt."""
    with torch.no_grad():
        if fam == "wan":
            return pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=L)[0], None, None
        if fam == "sd3":
            emb, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=L)
            return emb, None, pooled
        if fam == "flux":
            emb, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=L)
            return emb, None, pooled
        if fam == "cogvideox":
            return pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=L)[0], None, None
        if fam == "ltx":
            emb, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=L)
            return emb, mask, None
        emb, pooled, mask = pipe.encode_prompt(prompts, max_sequence_length=L)
        return emb, mask, pooled


@pytest.mark.parametrize("fam", FAMILIES)
def test_prompts_are_encoded_as_the_stock_pipeline_encodes_them(fam, pipelines):
    import diffusers

    pipe = getattr(diffusers, ADAPTERS[fam].pipeline_class).from_pretrained(pipelines[fam]["pipeline"])
    te = TextEncoder.load(pipelines[fam]["pipeline"], max_length=LENGTH[fam])
    ours = te.encode(CAPTIONS, allow_empty=True)  # "" is how the pipelines encode the CFG negative prompt
    emb, mask, pooled = _stock_encode(fam, pipe, CAPTIONS, LENGTH[fam])
    torch.testing.assert_close(ours.emb_BLD, emb, rtol=0, atol=1e-6)
    spec = ADAPTERS[fam].text
    assert spec.attention_mask == (mask is not None) and spec.pooled == (pooled is not None)
    if mask is None:
        assert ours.mask_BL.all()  # the transformer attends to every row
    else:
        assert torch.equal(ours.mask_BL, mask.bool()) and not ours.mask_BL.all()
    if pooled is not None:
        torch.testing.assert_close(ours.pooled_BP, pooled, rtol=0, atol=1e-6)
    assert te.dim == emb.shape[-1] == ADAPTERS[fam].from_pretrained(pipelines[fam]["transformer"]).config.text_dim


@pytest.mark.parametrize("fam", FAMILIES)
def test_a_prompts_text_does_not_depend_on_the_other_prompts(fam, pipelines):
    te = TextEncoder.load(pipelines[fam]["pipeline"], max_length=LENGTH[fam])
    alone = te.encode(CAPTIONS[1:2], cache=False)
    batch = te.encode(["a large yellow ball moving slowly up on a dark background and more words", CAPTIONS[1]], cache=False)
    assert batch.emb_BLD.shape[1] == alone.emb_BLD.shape[1]  # a fixed length, whatever the batch
    assert torch.equal(batch.emb_BLD[1:], alone.emb_BLD) and torch.equal(batch.mask_BL[1:], alone.mask_BL)
    assert te.convention == f"{fam}-pipeline/{LENGTH[fam]}" == text_convention(pipelines[fam]["pipeline"], LENGTH[fam])


def test_the_tiny_llama_tokenizer_puts_the_prompt_at_hunyuans_crop_start(pipelines):
    """The tiny pipeline's template prefix is the pipeline's crop_start tokens (as with the real tokenizer),
    so the 95 cropped tokens are the template and the kept ones the prompt."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(f"{pipelines['hunyuan']['pipeline']}/tokenizer")
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    assert len(tok(prefix).input_ids) == DEFAULT_PROMPT_TEMPLATE["crop_start"]


def test_text_conventions_of_the_toy_encoder_and_a_plain_encoder_dir(pipelines):
    assert TextEncoder.load("toy-t5").convention == "apt/32" == text_convention("toy-t5", 32)
    assert text_convention(f"{pipelines['wan']['pipeline']}/text_encoder", 512) == "apt/512"  # not a pipeline directory


def _config(fam: str, dirs: dict, *extra: str):
    return load_config(None, [], ["model.source=diffusers", f"model.family={fam}", f"model.path={dirs['transformer']}",
                                  f"model.vae={dirs['vae']}", *extra])


def test_a_diffusers_run_is_conditioned_through_its_pipeline_directory(pipelines):
    from apt.models.factory import build_backbone

    wan = pipelines["wan"]
    with pytest.raises(ConfigError, match=r"text.encoder '.*/text_encoder' is not a diffusers pipeline directory; model.family wan is "
                                          r"conditioned as its WanPipeline encodes prompts .* set text.encoder to the pipeline directory"):
        build_backbone(_config("wan", wan, f"text.encoder={wan['pipeline']}/text_encoder"), text_dim=64)
    with pytest.raises(ConfigError, match="text.encoder .* is a flux pipeline but model.family is wan"):
        build_backbone(_config("wan", wan, f"text.encoder={pipelines['flux']['pipeline']}"), text_dim=64)
    cog = pipelines["cogvideox"]
    with pytest.raises(ConfigError, match="text.max_length=16 but the CogVideoXTransformer3DModel .* takes exactly max_text_seq_length=32"):
        build_backbone(_config("cogvideox", cog, f"text.encoder={cog['pipeline']}", "text.max_length=16"), text_dim=64)
    build_backbone(_config("wan", wan, f"text.encoder={wan['pipeline']}", "text.max_length=16"), text_dim=64)
    build_backbone(_config("wan", wan, "text.encoder=toy-t5"), text_dim=64)  # tiny smoke models: apt's own convention


def _latent_shard(path, convention: str | None, *, text: bool = True) -> None:
    import webdataset as wds

    meta = {"caption": "a red circle"}
    if convention is not None:
        meta["text_convention"] = convention
    sample = {"__key__": "000000", "latent.npy": np.zeros((4, 1, 2, 2), np.float32), "json": meta}
    if text:
        sample["text.npy"], sample["mask.npy"] = np.ones((3, 8), np.float32), np.ones(5, bool)
    with wds.TarWriter(str(path)) as sink:
        sink.write(sample)


def test_shards_of_another_text_convention_are_refused_naming_both(tmp_path):
    from apt.data.latent_shards import UNRECORDED, check_text_convention, shard_text_convention

    for name, conv, text in (("wan", "wan-pipeline/512", True), ("old", None, True), ("captions", None, False)):
        (tmp_path / name).mkdir()
        _latent_shard(tmp_path / name / "latent-000000.tar", conv, text=text)
    assert shard_text_convention(str(tmp_path / "wan")) == "wan-pipeline/512"
    check_text_convention(str(tmp_path / "wan"), "wan-pipeline/512")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'wan'} holds text encoded under the convention 'wan-pipeline/512' but this run encodes text as 'wan-pipeline/226'"):
        check_text_convention(str(tmp_path / "wan"), "wan-pipeline/226")
    assert shard_text_convention(str(tmp_path / "old")) == UNRECORDED  # written before conventions were recorded: apt's own
    check_text_convention(str(tmp_path / "old"), "apt/32")
    with pytest.raises(ValueError, match="convention 'apt \\(unrecorded"):
        check_text_convention(str(tmp_path / "old"), "wan-pipeline/512")
    check_text_convention(str(tmp_path / "captions"), "wan-pipeline/512")  # no text: encoded on the fly
    (tmp_path / "wan" / "manifest.json").write_text(json.dumps({"kind": "latent", "text_encoder": "x", "text_convention": "sd3-pipeline/256"}))
    assert shard_text_convention(str(tmp_path / "wan")) == "sd3-pipeline/256"  # the manifest speaks for the directory


def test_stored_text_is_zero_filled_back_to_its_mask_length():
    """Shards drop trailing all-zero rows (Wan's padding); the collate restores the fixed length exactly."""
    from apt.data.latent_shards import collate_latents

    emb = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    samples = [{"x": np.zeros((4, 1, 2, 2), np.float32), "key": str(i), "caption": "c", "labels": {}, "text": emb[: 3 - i], "mask": np.ones(5, bool)}
               for i in range(2)]
    batch = collate_latents(samples)
    assert batch["text_emb"].shape == (2, 5, 8) and batch["text_mask"].all()
    assert torch.equal(batch["text_emb"][0, :3], torch.from_numpy(emb)) and not batch["text_emb"][0, 3:].any()
    assert torch.equal(batch["text_emb"][1, :2], torch.from_numpy(emb[:2])) and not batch["text_emb"][1, 2:].any()


def test_export_of_a_run_conditioned_on_another_convention_writes_the_transformer_alone(pipelines, tmp_path):
    from safetensors.torch import save_file

    from apt.export import export_diffusers
    from apt.models.adapters import ADAPTERS as A

    wan = pipelines["wan"]
    ckpt = tmp_path / "step-000001"
    config = _config("wan", wan, "text.encoder=toy-t5", "stage=apt", "apt.generator=x", "apt.teacher=x", "data.channels=4")
    save_config(config, ckpt / "config.yaml")
    net = A["wan"].from_pretrained(wan["transformer"])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ckpt / "generator_ema.safetensors"))
    with pytest.raises(ValueError, match="conditioned under the text convention 'apt/32', not as the wan pipeline encodes prompts"):
        export_diffusers(ckpt, tmp_path / "out")
    out = export_diffusers(ckpt, tmp_path / "out", transformer_only=True)
    assert (out / "config.json").exists() and "would not\nreproduce it" in (out / "README.md").read_text()
    assert json.loads((out / "apt_one_step.json").read_text())["text_convention"] == "apt/32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fam", ["sd3", "hunyuan"])
def test_pipeline_encoders_on_the_gpu_give_cpu_text_equal_to_the_cpu_encoders(fam, pipelines):
    """A LightningModule moves its text encoder to the GPU; the token ids must follow it, the TextCond stays on the CPU."""
    cpu = TextEncoder.load(pipelines[fam]["pipeline"], max_length=LENGTH[fam]).encode(CAPTIONS[:2], cache=False)
    gpu = TextEncoder.load(pipelines[fam]["pipeline"], max_length=LENGTH[fam]).cuda().encode(CAPTIONS[:2], cache=False)
    assert gpu.emb_BLD.device.type == "cpu" and gpu.pooled_BP.device.type == "cpu"
    torch.testing.assert_close(gpu.emb_BLD, cpu.emb_BLD, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.pooled_BP, cpu.pooled_BP, atol=1e-4, rtol=1e-4)
