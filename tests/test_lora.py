"""LoRA generators (``lora.rank > 0``, apt.lora): adapters on the frozen base, one backbone in memory, checkpoints
with the adapters only, exact resume, the distill -> APT chain continuing one set of adapters, and exports that
stock diffusers loads (``load_lora_adapter`` / ``load_lora_weights``) giving apt's one-step output.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from apt import lora
from apt.checkpoint import latest_checkpoint, save_weights
from apt.cli import main
from apt.config import ConfigError, LoraConfig, config_from_yaml, load_config, save_config
from apt.export_lora import export_lora
from apt.inference import load_generator
from apt.models import TextCond, build_dit
from apt.models.adapters import ADAPTERS
from apt.models.adapters.tiny import TEXT_DIM, write_tiny_family
from apt.models.factory import build_backbone
from apt.text import TextEncoder
from tests.conftest import fit_args

pytest.importorskip("peft")  # the `lora` extra (setup.cfg)
torch.set_num_threads(1)
PROMPT = "a red circle moving left on a black background"


def perturbed_dit():
    torch.manual_seed(0)
    net = build_dit("tiny", text_dim=TEXT_DIM)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # adaLN-Zero starts every block as the identity
    return net


def inputs(B: int = 2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 3, 4, 16, 16, generator=g), torch.tensor([1.0, 0.4])[:B], TextCond(torch.randn(B, 5, TEXT_DIM, generator=g), torch.ones(B, 5, dtype=torch.bool))


def randomise(params, scale: float = 0.1, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- the LoRA network


def test_adapters_start_at_the_base_and_only_they_train():
    net = perturbed_dit()
    x, t, text = inputs()
    base_out = net(x, t, text)
    base_numel = sum(p.numel() for p in net.parameters())
    lora.add_adapters(net, LoraConfig(rank=4, alpha=8), "builtin")
    assert torch.equal(net(x, t, text), base_out)  # B = 0 at init
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"qkv", "proj"}  # the default targets
    # per adapted layer: A (r x in) + B (out x r); qkv 32 -> 96, proj 32 -> 32, 3 blocks
    assert sum(p.numel() for p in lora.adapter_parameters(net)) == 3 * (4 * 32 + 96 * 4 + 4 * 32 + 32 * 4)
    assert sum(p.numel() for p in net.parameters()) == base_numel + 2 * 3 * (4 * 32 + 96 * 4 + 4 * 32 + 32 * 4)  # + the EMA adapters


def test_teacher_view_ema_adapters_and_merge():
    net = lora.add_adapters(perturbed_dit(), LoraConfig(rank=4), "builtin")
    x, t, text = inputs()
    base_out = lora.WithoutAdapters(net)(x, t, text)
    randomise(lora.adapter_parameters(net, lora.TRAINED))
    trained_out = net(x, t, text)
    assert (trained_out - base_out).abs().max() > 1e-3
    assert torch.equal(lora.WithoutAdapters(net)(x, t, text), base_out)  # the frozen teacher: the same module, adapters off
    assert torch.equal(net(x, t, text), trained_out)  # and back on, still trainable
    assert all(p.requires_grad for p in lora.adapter_parameters(net, lora.TRAINED))
    assert not any(p.requires_grad for p in lora.adapter_parameters(net, lora.EMA))
    lora.ema_update_adapters(net, 0.75)
    with lora.ema_adapters(net) as ema_net:
        ema_out = ema_net(x, t, text)
        assert not ema_net.training
    assert net.training and torch.equal(net(x, t, text), trained_out)
    merged = lora.merge(copy.deepcopy(net), lora.EMA)
    assert not lora.tuner_layers(merged) and set(merged.state_dict()) == set(perturbed_dit().state_dict())
    torch.testing.assert_close(merged(x, t, text), ema_out, rtol=0, atol=1e-5)


def test_ema_update_lerps_only_the_adapters():
    net = lora.add_adapters(perturbed_dit(), LoraConfig(rank=2), "builtin")
    randomise(lora.adapter_parameters(net, lora.TRAINED))
    base = {n: p.clone() for n, p in net.named_parameters() if ".lora_" not in n}
    ema0 = [p.clone() for p in lora.adapter_parameters(net, lora.EMA)]
    lora.ema_update_adapters(net, 0.9)
    for e, e0, p in zip(lora.adapter_parameters(net, lora.EMA), ema0, lora.adapter_parameters(net, lora.TRAINED)):
        torch.testing.assert_close(e, 0.9 * e0 + 0.1 * p)
    assert all(torch.equal(p, base[n]) for n, p in net.named_parameters() if ".lora_" not in n)


def test_distillation_holds_one_backbone(tiny_teacher):
    """Full fine-tune: teacher, student and EMA are three copies. LoRA: one base, shared by the student, its EMA and
    the frozen teacher (the same module with adapters off), plus two adapter sets."""
    from apt.lit.distill import DistillModule

    def elements(module):
        nets = [n for n in (module.net, getattr(module, "net_ema", None), getattr(module.teacher, "net", module.teacher)) if n is not None]
        params = {id(p): p for n in nets for p in n.parameters()}
        return sum(p.numel() for p in params.values())

    overrides = ["stage=distill", f"distill.teacher={tiny_teacher}"]
    full = DistillModule(load_config("recipes/demo/distill.yaml", ["tiny"], overrides))
    low = DistillModule(load_config("recipes/demo/distill.yaml", ["tiny"], [*overrides, "lora.rank=4"]))
    base = sum(p.numel() for p in full.teacher.parameters())
    adapters = sum(p.numel() for p in lora.adapter_parameters(low.net))
    assert elements(full) == 3 * base
    assert elements(low) == base + 2 * adapters and low.teacher.net is low.net and not hasattr(low, "net_ema")
    assert sum(p.numel() for p in low.configure_optimizers()["optimizer"].param_groups[0]["params"]) == adapters
    assert low.config.lora.base == str(tiny_teacher)


@pytest.mark.parametrize("overrides, message", [
    (["stage=teacher", "lora.rank=4"], "lora.rank=4: LoRA trains the generator of the distill and apt stages; stage 'teacher'"),
    (["lora.rank=4", "train.strategy=deepspeed_stage_2"], "lora.rank=4 runs under train.strategy auto, single, ddp, fsdp2; got 'deepspeed_stage_2'"),
    (["lora.rank=-1"], "lora.rank must be >= 0 (0 = off), got -1"),
    (["lora.rank=4", "train.strategy=ddp", "train.devices=2", "train.sequence_parallel=2"], "a LoRA generator is not wired for sequence parallelism"),
])
def test_lora_config_errors_name_the_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("recipes/demo/apt_video.yaml", ["tiny"], overrides)


def test_unknown_target_modules_fail_naming_the_key():
    with pytest.raises(ConfigError, match=r"lora.target_modules \['to_q'\]: Target modules \{'to_q'\} not found"):
        lora.add_adapters(perturbed_dit(), LoraConfig(rank=4, target_modules=["to_q"]), "builtin")


def test_lora_and_its_exports_import_no_training_stack():
    import os
    import subprocess
    import sys

    code = ("import sys; import apt.lora, apt.export_lora, apt.export_python, apt.models.in_house; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'deepspeed'}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "LOCAL_RANK", "MASTER_"))} | {"HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


# ---------------------------------------------------------------- the chain, resume, export (built-in DiT)


def adapters_only(path) -> dict:
    sd = load_file(str(path))
    assert sd and all(lora.is_adapter_key(k) for k in sd), [k for k in sd if not lora.is_adapter_key(k)][:3]
    return sd


@pytest.mark.integration
def test_lora_distill_then_apt_resume_exactly_and_continue_one_set_of_adapters(tiny_teacher, toy_shards, tmp_path):
    v, i = toy_shards["video"], toy_shards["image"]
    # a constant lr: the recipe's cosine spans train.max_steps, which differs between the 3-step and the 2-step run
    distill = lambda run, *extra: fit_args("recipes/demo/distill.yaml", run, v, f"data.image_shards={i}", f"distill.teacher={tiny_teacher}",  # noqa: E731
                                           "optim.schedule=constant", "lora.rank=4", *extra)
    d_full, d_part = tmp_path / "distill", tmp_path / "distill-part"
    assert main(distill(d_full, "train.max_steps=3")) == 0
    assert main(distill(d_part, "train.max_steps=2")) == 0
    assert main(distill(d_part, "train.max_steps=3", "resume=auto")) == 0
    last = latest_checkpoint(d_full)
    assert sorted(p.name for p in last.glob("*.safetensors")) == ["net.safetensors"]  # no teacher, no EMA copy: adapters only
    a, b = adapters_only(last / "net.safetensors"), adapters_only(latest_checkpoint(d_part) / "net.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume is exact
    assert config_from_yaml(last / "config.yaml").lora.base == str(tiny_teacher)

    apt = lambda run, *extra: fit_args("recipes/demo/apt_video.yaml", run, v, f"apt.generator={d_full}", f"apt.teacher={tiny_teacher}",  # noqa: E731
                                       "apt.d_warmup_steps=1", "lora.rank=4", *extra)
    g_full, g_part = tmp_path / "apt", tmp_path / "apt-part"
    assert main(apt(g_full, "train.max_steps=3")) == 0
    assert main(apt(g_part, "train.max_steps=2")) == 0
    assert main(apt(g_part, "train.max_steps=3", "resume=auto")) == 0
    last = latest_checkpoint(g_full)
    assert sorted(p.name for p in last.glob("*.safetensors")) == ["discriminator.safetensors", "generator.safetensors"]
    for name in ("generator", "discriminator"):
        a, b = load_file(str(last / f"{name}.safetensors")), load_file(str(latest_checkpoint(g_part) / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    adapters_only(last / "generator.safetensors")
    teacher = load_file(str(latest_checkpoint(tiny_teacher) / "net_ema.safetensors"))
    assert set(load_file(str(last / "discriminator.safetensors"))) > {f"backbone.{k}" for k in teacher}  # D: a full copy
    # the APT adapters sit on the teacher and start from the distillation's EMA adapters
    config = config_from_yaml(last / "config.yaml")
    assert config.lora.base == str(tiny_teacher)
    from apt.lit.apt import AptModule

    start = AptModule(load_config("recipes/demo/apt_video.yaml", ["tiny"], [f"data.shards={v}", f"apt.generator={d_full}", f"apt.teacher={tiny_teacher}", "lora.rank=4"]))
    distill_ema = lora.adapter_state(load_file(str(latest_checkpoint(d_full) / "net.safetensors")), lora.EMA)
    for adapter in (lora.TRAINED, lora.EMA):
        mine = lora.adapter_state(start.generator.state_dict(), adapter)
        assert mine.keys() == distill_ema.keys() and all(torch.equal(mine[k], distill_ema[k]) for k in mine)
    x, t, text = inputs(1)
    with lora.adapters_off(start.generator) as base:
        assert torch.equal(base(x, t, text), load_generator(tiny_teacher).net(x, t, text))

    # sampling: base + EMA adapters, merged; the same as the unmerged network with its EMA adapters on
    gen = load_generator(g_full)
    assert not lora.tuner_layers(gen.net)
    text = gen.text_encoder.encode([PROMPT])
    z = torch.randn(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ema_state = lora.adapter_state(load_file(str(last / "generator.safetensors")), lora.EMA)
    unmerged = lora.add_adapters(load_generator(tiny_teacher).net, config.lora, "builtin", adapters=(lora.TRAINED,))
    lora.load_adapter(unmerged, ema_state, lora.TRAINED, source="test")
    with torch.no_grad():
        torch.testing.assert_close(gen.net(z, torch.ones(1), text), unmerged.eval()(z, torch.ones(1), text), rtol=0, atol=1e-5)
    x = gen.generate_tensor([PROMPT], [0])

    # exports: peft adapters, and a merged checkpoint that `apt sample` reads and that samples the same
    out = export_lora(g_full, tmp_path / "lora")
    assert json.loads((out / "apt_lora.json").read_text())["base"] == str(tiny_teacher)
    assert load_file(str(out / "adapter_model.safetensors")).keys() == ema_state.keys()
    assert main(["export", str(g_full), "--merge", "--out", str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(load_generator(tmp_path / "merged").generate_tensor([PROMPT], [0]), x, rtol=0, atol=1e-5)
    assert main(["export", str(g_full), "--out", str(tmp_path / "nope")]) == 2  # a LoRA run needs --lora or --merge


@pytest.mark.integration
def test_lora_apt_from_a_full_distillation_starts_at_its_product(tiny_teacher, toy_shards, tmp_path):
    from apt.lit.apt import AptModule

    distill = tmp_path / "distill"
    assert main(fit_args("recipes/demo/distill.yaml", distill, toy_shards["video"], f"data.image_shards={toy_shards['image']}",
                         f"distill.teacher={tiny_teacher}", "train.max_steps=1")) == 0
    m = AptModule(load_config("recipes/demo/apt_video.yaml", ["tiny"], [f"data.shards={toy_shards['video']}", f"apt.generator={distill}",
                                                                          f"apt.teacher={tiny_teacher}", "lora.rank=2"]))
    assert m.config.lora.base == str(distill) and m.generator_ema is None
    product = load_generator(distill).net
    x, t, text = inputs(1)
    with m.gathered_sampling_network() as net:
        assert torch.equal(net(x, t, text), product(x, t, text))  # B = 0: G starts as the distilled product


# ---------------------------------------------------------------- diffusers: export, stock reload, same one-step output

LATENTS = {"sd3": (4, 1, 8, 8), "flux": (4, 1, 8, 8), "wan": (4, 2, 8, 8), "cogvideox": (4, 3, 8, 8), "ltx": (8, 3, 4, 4), "hunyuan": (4, 3, 8, 8)}


def fake_lora_run(fam: str, root, *, rank: int = 4):
    """An APT checkpoint of a LoRA run on a tiny diffusers model, its adapters set to random values (as if trained)."""
    tiny = write_tiny_family(fam, root / "model")["transformer"]
    C, T, H, W = LATENTS[fam]
    c = load_config(None, [], ["stage=apt", "model.source=diffusers", f"model.family={fam}", f"model.path={tiny}", f"apt.generator={tiny}",
                               f"apt.teacher={tiny}", f"lora.rank={rank}", "lora.alpha=8", f"lora.base={tiny}", f"data.channels={C}",
                               f"data.frames={T}", f"data.height={H}", f"data.width={W}"])
    net = lora.add_adapters(build_backbone(c, text_dim=TEXT_DIM), c.lora, "diffusers")
    randomise(lora.adapter_parameters(net, lora.TRAINED), seed=3)
    randomise(lora.adapter_parameters(net, lora.EMA), seed=4)
    ckpt = root / "run" / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    save_weights({k: v for k, v in net.state_dict().items() if lora.is_adapter_key(k)}, ckpt / "generator.safetensors")
    save_config(c, ckpt / "config.yaml")
    torch.save({}, ckpt / "trainer_state.pt")
    return tiny, ckpt, net


def one_step(net, z, text):
    with torch.no_grad():
        return z - net(z, torch.ones(z.shape[0]), text)


@pytest.mark.parametrize("fam", sorted(ADAPTERS))
def test_exported_lora_loads_into_the_stock_diffusers_model_with_the_same_one_step_output(fam, tmp_path):
    import diffusers

    tiny, ckpt, net = fake_lora_run(fam, tmp_path)
    text = TextEncoder.load("toy-t5").encode([PROMPT])
    z = torch.randn(1, *LATENTS[fam], generator=torch.Generator().manual_seed(0))
    with lora.ema_adapters(net) as ema:
        expected = one_step(ema, z, text)
    apt_out = one_step(load_generator(ckpt).net, z, text)  # apt's product: base + EMA adapters, merged
    torch.testing.assert_close(apt_out, expected, rtol=0, atol=1e-5)
    assert (apt_out - one_step(ADAPTERS[fam].from_pretrained(tiny).eval(), z, text)).abs().max() > 1e-4  # the LoRA matters

    cls = getattr(diffusers, ADAPTERS[fam].model_class)
    out = export_lora(ckpt, tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").exists()
    stock = cls.from_pretrained(tiny)
    stock.load_lora_adapter(str(out), prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
    family = ADAPTERS[fam].pipeline_kwargs(ADAPTERS[fam].check_dir(tiny))  # what the family's pipeline reads beside it (LTX: its VAE)
    torch.testing.assert_close(one_step(ADAPTERS[fam](stock, **family).eval(), z, text), expected, rtol=0, atol=1e-5)

    merged = export_lora(ckpt, tmp_path / "merged", merge=True)
    torch.testing.assert_close(one_step(ADAPTERS[fam](cls.from_pretrained(str(merged)), **family).eval(), z, text), expected, rtol=0, atol=1e-5)


def test_exported_lora_loads_through_the_wan_pipeline(tmp_path):
    """The pipeline's own loader (``WanPipeline.load_lora_weights``), as a user would call it."""
    import diffusers

    tiny, ckpt, net = fake_lora_run("wan", tmp_path)
    out = export_lora(ckpt, tmp_path / "lora")
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                 transformer=diffusers.WanTransformer3DModel.from_pretrained(tiny))
    pipe.load_lora_weights(str(out))
    text = TextEncoder.load("toy-t5").encode([PROMPT])
    z = torch.randn(1, *LATENTS["wan"], generator=torch.Generator().manual_seed(0))
    with lora.ema_adapters(net) as ema:
        expected = one_step(ema, z, text)
    torch.testing.assert_close(one_step(ADAPTERS["wan"](pipe.transformer).eval(), z, text), expected, rtol=0, atol=1e-5)


@pytest.mark.integration
def test_wan_lora_chain_exports_a_lora_the_stock_pipeline_loads(tmp_path):
    """Tiny Wan, trained for real: latent shards -> LoRA distillation from the diffusers teacher (gradient
    checkpointing on) -> LoRA APT continuing its adapters -> ``apt export --lora`` -> ``WanPipeline.load_lora_weights``
    on the stock base transformer gives apt's one-step output."""
    import diffusers

    from apt.codecs import LatentCodec
    from apt.data.latent_shards import encode_latent_shards
    from apt.data.media_shards import MediaPolicy, write_media_shards
    from tests.test_byo_chain import make_media

    tiny = write_tiny_family("wan", tmp_path / "model")
    make_media(tmp_path / "media", 5)
    write_media_shards(tmp_path / "media", tmp_path / "px", MediaPolicy(frames=5, fps=12, height=32, width=32), samples_per_shard=2, progress=False)
    encode_latent_shards(str(tmp_path / "px"), str(tmp_path / "lat"), LatentCodec.load(tiny["vae"]), TextEncoder.load("toy-t5"), progress=False)
    recipe = "recipes/video/wan-1280x720-24fps.yaml"
    common = ["tiny", "cpu", f"model.path={tiny['transformer']}", f"model.vae={tiny['vae']}", "text.encoder=toy-t5", "text.max_length=32",
              f"data.shards={tmp_path / 'lat'}", "data.batch_size=2", "data.channels=4", "data.frames=2", "data.height=4", "data.width=4",
              "lora.rank=4", "lora.alpha=8", "model.gradient_checkpointing=true"]
    distill, run = tmp_path / "distill", tmp_path / "apt"
    assert main(["fit", recipe, *common, "stage=distill", f"run_dir={distill}", f"distill.teacher={tiny['transformer']}", "distill.num_steps=4",
                 "optim.lr=1e-2"]) == 0
    assert main(["fit", recipe, *common, "stage=apt", f"run_dir={run}", f"apt.generator={distill}", f"apt.teacher={tiny['transformer']}",
                 "apt.d_warmup_steps=1", "apt.lr_g=1e-2"]) == 0
    last = latest_checkpoint(run)
    assert all(k.startswith("model.") and lora.is_adapter_key(k) for k in adapters_only(last / "generator.safetensors"))
    assert config_from_yaml(last / "config.yaml").lora.base == tiny["transformer"]  # a LoRA over the stock model

    gen = load_generator(run)
    text = gen.text_encoder.encode([PROMPT])
    z = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = one_step(gen.net, z, text)
    assert (expected - one_step(ADAPTERS["wan"].from_pretrained(tiny["transformer"]).eval(), z, text)).abs().max() > 1e-5  # trained away from the base
    assert main(["export", str(run), "--lora", "--out", str(tmp_path / "lora")]) == 0
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                 transformer=diffusers.WanTransformer3DModel.from_pretrained(tiny["transformer"]))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(one_step(ADAPTERS["wan"](pipe.transformer).eval(), z, text), expected, rtol=0, atol=1e-5)
    # the stock call beside the adapters, as `apt export` writes it for a full model: a one-step scheduler at t = 1000
    info = json.loads((tmp_path / "lora" / "apt_lora.json").read_text())
    assert info["call"]["num_inference_steps"] == 1 and info["call"]["guidance_scale"] == 1.0 and "prompt=" in (tmp_path / "lora" / "README.md").read_text()
    scheduler = getattr(diffusers, info["scheduler"]).from_pretrained(str(tmp_path / "lora"), subfolder="scheduler")
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [1000.0]
