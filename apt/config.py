"""Typed configuration: dataclasses mirrored 1:1 by recipe YAML, merged strictly with OmegaConf.

Precedence: dataclass defaults < recipe < overlays (in order) < CLI ``key=value`` dotlist.
An unknown key fails with its full name and a "did you mean" suggestion; a wrong type fails with
the key and the expected type. The resolved config is written next to every run and checkpoint.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parent.parent
OVERLAY_DIR = REPO_ROOT / "recipes" / "overlays"
STAGES = ("teacher", "distill", "apt")
MODEL_SOURCES = ("builtin", "diffusers", "python")
TRAINER_STRATEGIES = ("auto", "single", "ddp", "fsdp2")
DEEPSPEED_STAGES = {"deepspeed_stage_1": 1, "deepspeed_stage_2": 2, "deepspeed_stage_3": 3}


class ConfigError(ValueError):
    """A user mistake in a recipe, overlay or override; the message names the key."""


@dataclass
class ModelConfig:
    flavour: str = "demo"
    """Built-in DiT flavour (``apt.models.registry.FLAVOURS``): tiny | demo | apt-8b."""
    gradient_checkpointing: bool = False
    """Recompute block activations in backward (saves memory, same math)."""
    source: str = "builtin"
    """builtin (the DiT named by flavour) | diffusers (a diffusers transformer through ``apt.models.adapters``) |
    python (an in-house network built by ``model.target``, no change to apt: docs/byo_model.md §1)."""
    family: str = ""
    """Diffusers family when source=diffusers: sd3 | flux | wan | cogvideox | ltx | hunyuan."""
    path: str = ""
    """source=diffusers: local diffusers transformer directory (config.json + weights, or a pipeline dir with
    transformer/); its weights are the teacher's, its config the architecture of G and D.
    source=python (optional): the teacher's weights, a .safetensors file, a directory of them, or a torch
    file read with ``weights_only=True``; empty = random init (a teacher stage trains it)."""
    target: str = ""
    """source=python: the callable that builds the network, ``"package.module:function"`` (a class works too),
    imported from sys.path / PYTHONPATH and called as ``function(**model.kwargs)``."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """source=python: keyword arguments of ``model.target``; saved with every checkpoint, so sampling and
    export rebuild the same network."""
    vae: str = ""
    """Local diffusers VAE directory (source=diffusers): decodes latent samples; data/encode_latents.py uses it."""


@dataclass
class LoraConfig:
    """LoRA generator (distill and apt stages, ``apt.lora``): the generator is the frozen base network plus
    low-rank adapters (peft) on the named linear layers; only the adapters train, and the distillation
    teacher is the same module with its adapters off. The discriminator stays a fully trained copy."""

    rank: int = 0
    """Rank r of each adapter; 0 = off (the generator is fine-tuned in full)."""
    alpha: float = 0.0
    """LoRA alpha: the update is (alpha / rank) B A; 0 = alpha equal to the rank (scale 1)."""
    target_modules: list[str] = field(default_factory=list)
    """Names (or dotted suffixes) of the nn.Linear layers that get adapters; empty = the attention projections:
    built-in DiT qkv, proj; diffusers to_q, to_k, to_v, to_out.0 (model.source=python must name them)."""
    base: str = ""
    """The full weights the adapters sit on. Empty = the stage's own: distill.teacher for distillation;
    for APT, apt.generator when it is a full checkpoint, or the base of apt.generator's LoRA run (its adapters
    then continue). Every checkpoint's config.yaml records the resolved value (sampling and export read it)."""


@dataclass
class TextConfig:
    encoder: str = "toy-t5"
    """'toy-t5' (built offline, fixed seed) or a local directory with a transformers tokenizer + encoder."""
    max_length: int = 32
    """Maximum caption length in tokens."""
    dropout: float = 0.1
    """Probability of replacing a caption by the empty prompt in teacher training (enables CFG)."""


@dataclass
class DataConfig:
    shards: str = "runs/data/toy-video"
    """Training shards: a directory of .tar files, a brace pattern or one .tar file."""
    frames: int = 4
    """Frames per clip (1 = images)."""
    height: int = 16
    width: int = 16
    channels: int = 3
    batch_size: int = 64
    """Per-device batch size."""
    num_workers: int = 0
    """DataLoader worker processes."""
    image_shards: str = ""
    """Optional one-frame (image) shards mixed into every step for joint image-video training ('' = off)."""
    image_batch_size: int = 64
    """Per-device batch size of the image shards."""


@dataclass
class FlowConfig:
    timestep_distribution: str = "logit_normal"
    """Training timesteps: uniform | logit_normal (SD3)."""
    train_shift: float = 1.0
    """Shift applied to training timesteps."""
    sample_steps: int = 25
    """Euler steps for the teacher sampler."""
    sample_shift: float = 1.0
    """Shift of the sampling schedule."""
    cfg_scale: float = 2.0
    """Classifier-free guidance scale of the teacher sampler (DESIGN.md §7: 1-2 best on the toy)."""
    negative_prompt: str = ""
    """Negative prompt for CFG (empty = unconditional)."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    """lr after the linear warm-up: constant | cosine (to 0 at train.max_steps)."""
    decay_steps: int = 0
    """cosine only: the half cosine spans the last decay_steps steps, the lr is constant before them
    (warmup-stable-decay); 0, or more steps than follow the warm-up (a shortened run), = every step after it."""
    grad_clip: float = 0.0
    """Global gradient-norm clip of each trained network, in every stage and strategy (0 = off; the paper's APT
    stage clips nothing)."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimisation steps; for APT, generator updates."""
    seed: int = 0
    precision: str = "32-true"
    """Lightning precision: 32-true | bf16-mixed | bf16-true."""
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    """auto | ddp | fsdp2 | deepspeed_stage_2 | deepspeed_stage_3 (docs/distributed.md)."""
    num_nodes: int = 0
    """Nodes of the job (0 = from the launcher: SLURM or torchrun, else 1)."""
    accumulate_grad_batches: int = 1
    """Micro-batches per update, in every stage and strategy; in the APT stage G and D updates stay separate."""
    sequence_parallel: int = 1
    """Ulysses sequence parallelism: ranks per group that split each sample's tokens (1 = off). The P
    consecutive ranks of a group read the same samples, so ``data.batch_size`` is per group; APT stage,
    under ddp, fsdp2 or deepspeed_stage_* (docs/distributed.md)."""
    ema_decay: float = 0.999
    """EMA decay of the trained network (the EMA is what is sampled and exported)."""
    log_every_steps: int = 10
    sample_every_steps: int = 200
    """Write sample grids/clips to the run folder every N steps (0 = off)."""
    ckpt_every_steps: int = 200
    """Save a checkpoint every N steps (and always at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep (the final one is always kept)."""
    num_sample_prompts: int = 8
    """Prompts in the sample grid."""
    progress_bar: bool = True


@dataclass
class DistillConfig:
    teacher: str = ""
    """Teacher checkpoint (a run's checkpoint directory or a directory holding ema.safetensors)."""
    num_steps: int = 32
    """Discrete timesteps of the teacher's trajectory (AAPT: 32)."""
    shift: float = 1.0
    """Shift of the discrete schedule (AAPT: 24 at 720p)."""
    cfg_scale: float = 7.5
    """Guidance baked into the distilled model (paper: 7.5)."""
    negative_prompt: str = ""
    final_step_weight: float = 1.0
    """Extra weight of the t=T (one-step) term."""


@dataclass
class AptConfig:
    generator: str = ""
    """Generator init: the stage-1 (distilled) checkpoint, or the image-stage APT checkpoint (its EMA)."""
    teacher: str = ""
    """The ORIGINAL diffusion weights: the discriminator backbone is initialised from them."""
    lr_g: float = 5e-6
    lr_d: float = 5e-6
    optimizer: str = "rmsprop"
    """rmsprop (alpha 0.9, paper) | adam."""
    rmsprop_alpha: float = 0.9
    adam_betas: list[float] = field(default_factory=lambda: [0.0, 0.9])
    r1_lambda: float = 100.0
    """Weight of approximate R1."""
    r1_sigma: float = 0.01
    """Std of the approximate-R1 perturbation (0.01 images, 0.1 video)."""
    d_timestep_shift: float = 1.0
    """D's timestep ensemble t ~ shift(U(0,1), s): 1 images, 12 for 720p video."""
    readout_fractions: list[float] = field(default_factory=lambda: [16 / 36, 26 / 36, 1.0])
    """Depths (fraction of the backbone) of the cross-attention readout heads."""
    d_steps_per_g_step: int = 1
    """D updates per G update (paper 1:1)."""
    d_warmup_steps: int = 0
    """D-only updates before the first G update (DESIGN.md §7: the toy needs ~60)."""
    train_d_backbone: bool = True
    """Train all D parameters (paper); False freezes the backbone (ablation)."""
    use_r1: bool = True
    """Approximate R1 on (ablation: off collapses)."""
    mismatch_weight: float = 0.0
    """Not in the paper (0 = APT as published). Weight of a matching-aware D term (GAN-INT-CLS, GigaGAN):
    real clips paired with the batch's most similar different text count as fake, so D must judge text
    alignment too. docs/demo_tuning.md: on the toy it taught D the shape word; with the 14000-step teacher it
    kept improving over 350 video updates where the published objective stopped (validation 24.5 vs 25.4)."""
    text_contrast_weight: float = 0.0
    """Not in the paper (0 = off; needs mismatch_weight > 0 so D reads the text). G-step term
    softplus(D(G(z), c') - D(G(z), c)) with c' the nearest other text: G's sample must look more like
    its own prompt than the nearest other one to D, a guidance-like signal for text alignment. docs/demo_tuning.md
    (sixth round): on the toy, weights 3 and 10 lowered the best validation distance from 17.80 to 17.05;
    the attribute accuracy stayed where the stage-1 init put it."""
    ema_decay: float = 0.995
    collapse_patience: int = 50
    """Warn when D wins outright (real>0>fake, D loss < 0.05) this many steps in a row."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """In-training evaluation every N steps (0 = off)."""
    num_samples: int = 256
    classifier: str = "assets/toy_classifier"
    seed: int = 1234


@dataclass
class PerfConfig:
    """Speed switches, applied to a model in one place (``apt.perf.apply_perf``, fixed order). Each has
    an equivalence test against the plain path (tests/test_perf.py); the defaults are the plain path."""

    attention_backend: str = "auto"
    """SDPA kernel: auto (PyTorch picks) | math | flash | efficient | cudnn (``torch.nn.attention.sdpa_kernel``)."""
    compile: bool = False
    """torch.compile each DiT block in place (parameter names unchanged)."""
    compile_backend: str = "inductor"
    """torch.compile backend when ``compile`` is on (inductor; eager / aot_eager to debug)."""
    cuda_graphs: bool = False
    """Capture the fixed-shape inference forward in a CUDA graph (CUDA only; ignored with a warning elsewhere)."""
    fused_qk_norm_rope: bool = False
    """QK RMSNorm + RoPE in one float32 pass (one kernel under ``compile``)."""
    fp8: bool = False
    """FP8 e4m3 matmuls in the blocks' linear layers: torch._scaled_mm on Hopper/Ada, emulated elsewhere."""
    vae_chunk_frames: int = 0
    """Wan-VAE decode in chunks of this many latent frames after the first (0 = the VAE's own decode)."""


@dataclass
class Config:
    stage: str = "teacher"
    """teacher | distill | apt."""
    run_dir: str = "runs/default"
    """Everything a run writes goes here (config, metrics, samples, checkpoints)."""
    resume: str = ""
    """'' = fresh run (refuses a run_dir with checkpoints), 'auto' = latest checkpoint in run_dir, or a path."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    apt: AptConfig = field(default_factory=AptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)


def _keys_at(path: list[str]) -> list[str]:
    cls = Config
    for p in path:
        match = [f for f in fields(cls) if f.name == p]
        if not match or not is_dataclass(match[0].default_factory() if callable(match[0].default_factory) else None):
            return []
        cls = type(match[0].default_factory())
    return [f.name for f in fields(cls)]


def _unknown_key_error(full_key: str, source: str) -> ConfigError:
    parts = full_key.split(".")
    options = _keys_at(parts[:-1])
    close = difflib.get_close_matches(parts[-1], options, n=1)
    hint = f"; did you mean '{'.'.join(parts[:-1] + close)}'?" if close else (f"; valid keys: {', '.join(options)}" if options else "")
    return ConfigError(f"unknown config key '{full_key}' in {source}{hint}")


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        raise _unknown_key_error(e.full_key, source) from None
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise ConfigError(f"bad value for '{getattr(e, 'full_key', '?')}' in {source}: {msg}") from None


def resolve_overlay(name: str) -> Path:
    """An overlay is a name under recipes/overlays/ (``tiny``) or a path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ConfigError(f"overlay file not found: {name}")
        return p
    p = OVERLAY_DIR / f"{name}.yaml"
    if not p.exists():
        known = sorted(q.stem for q in OVERLAY_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown overlay '{name}'; available: {', '.join(known)}")
    return p


def load_yaml(path: str | Path) -> DictConfig:
    if not os.path.exists(path):
        raise ConfigError(f"recipe file not found: {path}")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} must hold a mapping at top level")
    return cfg


def load_config(recipe: str | None, overlays: list[str] = (), overrides: list[str] = ()) -> Config:
    """Merge defaults < recipe < overlays < overrides into a typed ``Config`` and validate it."""
    cfg = OmegaConf.structured(Config)
    if recipe:
        cfg = _merge(cfg, load_yaml(recipe), str(recipe))
    for name in overlays:
        path = resolve_overlay(name)
        cfg = _merge(cfg, load_yaml(path), str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    config: Config = OmegaConf.to_object(cfg)
    check_config(config)
    return config


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: Config, path: str | Path) -> None:
    """Atomic write of the resolved config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(config))
    os.replace(tmp, path)


def config_from_yaml(path: str | Path) -> Config:
    return OmegaConf.to_object(_merge(OmegaConf.structured(Config), load_yaml(path), str(path)))


def check_config(c: Config) -> None:
    """Value checks that need no files, one function per section; each failure names the key.
    File checks (shards, checkpoints) follow in ``apt.train.check_paths``, still before any work."""
    need(c.stage in STAGES, f"stage must be one of {', '.join(STAGES)}, got '{c.stage}'")
    for check in (check_model, check_lora, check_text, check_data, check_flow, check_optim, check_train, check_distill, check_apt, check_eval):
        check(c)
    check_perf(c.perf)


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_model(c: Config) -> None:
    from apt.models.registry import FLAVOURS

    need(c.model.source in MODEL_SOURCES, f"model.source must be one of {', '.join(MODEL_SOURCES)}, got '{c.model.source}'")
    if c.model.source == "python":  # the network's shapes are checked when it is built (apt.models.backbone.check_backbone)
        from apt.models.in_house import resolve_target

        try:
            resolve_target(c.model.target)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return
    if c.model.source == "diffusers":  # shapes are checked against model.path when the model is built
        from apt.models.adapters import ADAPTERS

        need(c.model.family in ADAPTERS, f"model.family '{c.model.family}' unknown for model.source=diffusers; choose from {', '.join(sorted(ADAPTERS))}")
        need(bool(c.model.path), "model.path must name the local diffusers transformer directory (model.source=diffusers)")
        return
    need(c.model.flavour in FLAVOURS, f"model.flavour '{c.model.flavour}' unknown; choose from {', '.join(sorted(FLAVOURS))}")
    flav = FLAVOURS[c.model.flavour]
    pt, ph, pw = flav.patch_size
    need(c.data.channels == flav.in_channels, f"data.channels={c.data.channels} but model '{c.model.flavour}' expects {flav.in_channels}")
    need(c.data.height % ph == 0 and c.data.width % pw == 0,
         f"resolution data.height x data.width = {c.data.height}x{c.data.width} is not divisible by the patch size {ph}x{pw} of model '{c.model.flavour}'")
    need(c.data.frames == 1 or c.data.frames % pt == 0,
         f"data.frames={c.data.frames} is not divisible by the temporal patch size {pt} of model '{c.model.flavour}' (images use frames=1)")


def check_lora(c: Config) -> None:
    """A LoRA generator: distill and apt stages, on one device, DDP or FSDP2 (``apt.lora``)."""
    r = c.lora
    need(r.rank >= 0, f"lora.rank must be >= 0 (0 = off), got {r.rank}")
    need(r.alpha >= 0, f"lora.alpha must be >= 0 (0 = the rank), got {r.alpha}")
    if r.rank == 0:
        return
    key = f"lora.rank={r.rank}"
    need(c.stage in ("distill", "apt"), f"{key}: LoRA trains the generator of the distill and apt stages; stage '{c.stage}' trains "
         "the full network (set lora.rank=0)")
    need(c.train.strategy in TRAINER_STRATEGIES, f"{key} runs under train.strategy {', '.join(TRAINER_STRATEGIES)}; got '{c.train.strategy}'")
    need(c.train.sequence_parallel == 1, f"{key}: a LoRA generator is not wired for sequence parallelism; set train.sequence_parallel=1")
    need(bool(r.target_modules) or c.model.source != "python",
         f"{key}: lora.target_modules must name the linear layers to adapt in model.target {c.model.target} (model.source=python has no default)")


def check_text(c: Config) -> None:
    need(0.0 <= c.text.dropout < 1.0, f"text.dropout must be in [0, 1), got {c.text.dropout}")


def check_data(c: Config) -> None:
    need(c.data.batch_size > 0, f"data.batch_size must be positive, got {c.data.batch_size}")
    need(c.data.image_batch_size > 0, f"data.image_batch_size must be positive, got {c.data.image_batch_size}")
    need(c.data.frames > 0, f"data.frames must be positive, got {c.data.frames}")
    need(not (c.data.image_shards and c.stage == "apt"),
         f"data.image_shards={c.data.image_shards}: the APT stage trains on data.shards only (one modality per stage: "
         "an image stage, then a video stage); set data.image_shards= (empty)")


def check_flow(c: Config) -> None:
    need(c.flow.sample_steps > 0, f"flow.sample_steps must be positive, got {c.flow.sample_steps}")


def check_optim(c: Config) -> None:
    need(c.optim.schedule in ("constant", "cosine"), f"optim.schedule must be constant or cosine, got '{c.optim.schedule}'")
    need(c.optim.decay_steps >= 0, f"optim.decay_steps must be >= 0, got {c.optim.decay_steps}")
    need(c.optim.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 = off), got {c.optim.grad_clip}")


def check_train(c: Config) -> None:
    need(c.train.max_steps > 0, f"train.max_steps must be positive, got {c.train.max_steps}")
    need(c.train.num_nodes >= 0, f"train.num_nodes must be >= 0, got {c.train.num_nodes}")
    need(c.train.accumulate_grad_batches >= 1, f"train.accumulate_grad_batches must be >= 1, got {c.train.accumulate_grad_batches}")
    need(0.0 < c.train.ema_decay < 1.0, f"train.ema_decay must be in (0, 1), got {c.train.ema_decay}")
    for key in ("log_every_steps", "sample_every_steps", "ckpt_every_steps"):
        need(getattr(c.train, key) >= 0, f"train.{key} must be >= 0, got {getattr(c.train, key)}")
    check_strategy(c)
    check_sequence_parallel(c)


def check_strategy(c: Config) -> None:
    """A strategy this stage cannot run fails before any work."""
    s = c.train.strategy
    known = (*TRAINER_STRATEGIES, *DEEPSPEED_STAGES)
    need(s in known, f"train.strategy '{s}' unknown; choose from {', '.join(known)}")
    need(not (s == "fsdp2" and c.stage != "apt"),
         f"train.strategy=fsdp2 shards the APT stage's G and D; stage '{c.stage}' runs with ddp or deepspeed_stage_*")
    need(not (s in DEEPSPEED_STAGES and c.eval.every_steps),
         f"eval.every_steps={c.eval.every_steps}: in-training evaluation runs on the Trainer path, not under train.strategy={s}; "
         "set eval.every_steps=0 and evaluate the checkpoints afterwards")


def check_sequence_parallel(c: Config) -> None:
    """``train.sequence_parallel``: what Ulysses needs, checked before any work (docs/distributed.md)."""
    from apt.models.registry import FLAVOURS

    P = c.train.sequence_parallel
    need(P >= 1, f"train.sequence_parallel must be >= 1, got {P}")
    if P == 1:
        return
    key = f"train.sequence_parallel={P}"
    strategies = ("ddp", "fsdp2", *DEEPSPEED_STAGES)  # one process per rank
    need(c.stage == "apt", f"{key}: only the APT stage runs sequence-parallel; stage '{c.stage}' needs train.sequence_parallel=1")
    need(c.train.strategy in strategies, f"{key} runs under train.strategy {', '.join(strategies)}; got '{c.train.strategy}'")
    need(c.train.devices % P == 0, f"{key} must divide train.devices={c.train.devices}: a sequence-parallel group is {P} consecutive ranks of one node")
    need(c.model.source != "python", f"{key}: model.source=python is not wired for sequence parallelism (built-in DiT and diffusers wan are)")
    if c.model.source == "diffusers":  # the heads of a diffusers model are checked against model.path (apt.train.check_paths)
        need(c.model.family == "wan", f"{key}: of the diffusers families only wan is wired (diffusers' context-parallel hooks); got model.family={c.model.family}")
        return
    heads = FLAVOURS[c.model.flavour].num_heads
    need(heads % P == 0, f"{key}: Ulysses splits attention heads over the group, and the {heads} heads of model '{c.model.flavour}' do not divide {P} ranks")


def check_distill(c: Config) -> None:
    need(c.distill.num_steps >= 1, f"distill.num_steps must be >= 1, got {c.distill.num_steps}")
    if c.stage == "distill":
        need(bool(c.distill.teacher), "distill.teacher must name the teacher checkpoint")


def check_apt(c: Config) -> None:
    a = c.apt
    need(0.0 < a.ema_decay < 1.0, f"apt.ema_decay must be in (0, 1), got {a.ema_decay}")
    need(a.optimizer in ("rmsprop", "adam"), f"apt.optimizer must be rmsprop or adam, got '{a.optimizer}'")
    need(a.d_steps_per_g_step >= 1, f"apt.d_steps_per_g_step must be >= 1, got {a.d_steps_per_g_step}")
    need(len(a.readout_fractions) > 0, "apt.readout_fractions must list at least one depth")
    need(a.mismatch_weight >= 0.0, f"apt.mismatch_weight must be >= 0, got {a.mismatch_weight}")
    need(a.text_contrast_weight >= 0.0, f"apt.text_contrast_weight must be >= 0, got {a.text_contrast_weight}")
    need(a.text_contrast_weight == 0.0 or a.mismatch_weight > 0.0,
         f"apt.text_contrast_weight={a.text_contrast_weight} needs apt.mismatch_weight > 0 (a D that reads the text)")
    if c.stage == "apt":
        need(bool(a.generator), "apt.generator must name the stage-1 (distilled) checkpoint")
        need(bool(a.teacher), "apt.teacher must name the original diffusion checkpoint (D is initialised from it)")


def check_eval(c: Config) -> None:
    need(c.eval.every_steps >= 0, f"eval.every_steps must be >= 0, got {c.eval.every_steps}")


def check_perf(p: PerfConfig) -> None:
    """Also called by ``apt.perf.apply_perf``: a PerfConfig can be built in code, not only from a recipe."""
    from apt.models.attention import ATTENTION_BACKENDS

    need(p.attention_backend in ATTENTION_BACKENDS, f"perf.attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got '{p.attention_backend}'")
    need(p.vae_chunk_frames >= 0, f"perf.vae_chunk_frames must be >= 0, got {p.vae_chunk_frames}")
