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

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parent.parent
OVERLAY_DIR = REPO_ROOT / "recipes" / "overlays"
STAGES = ("teacher", "distill", "apt", "stream_teacher", "stream_distill", "stream_apt")
STREAM_STAGES = ("stream_teacher", "stream_distill", "stream_apt")
"""AAPT's stages for a causal (streaming) model: causal adaptation, distillation, adversarial with student forcing."""
ADVERSARIAL_STAGES = ("apt", "stream_apt")
MANY_STEP_STAGES = ("teacher", "stream_teacher")
"""Stages whose product samples in flow.sample_steps Euler steps with CFG; the others make one-step generators."""
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
    checkpoint_policy: str = "full"
    """With gradient_checkpointing, what the built-in DiT's blocks recompute: full (everything) | attention
    (keep SDPA outputs) | attention_and_matmul (keep SDPA and matmul outputs) (``apt.models.checkpointing``)."""
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
    init: str = ""
    """Stage teacher only: a checkpoint or run dir whose net_ema the network and its EMA start from, to fine-tune a
    trained teacher (e.g. on another world's or longer clips); empty = the model's own init (random for the built-in
    DiT). On resume the run's own checkpoint wins."""
    causal_chunk_frames: int = 0
    """Built-in DiT only. 0 = bidirectional (full attention); > 0 = causal streaming mode over chunks of this many
    frames (a multiple of the flavour's temporal patch): block-causal attention, the previous chunk recycled as
    input, a rolling key/value cache (AAPT §3.1; docs/streaming.md)."""
    sink_chunks: int = 1
    """Causal mode: the first chunks every later chunk attends to (the attention sink)."""
    window_chunks: int = 2
    """Causal mode: past chunks each chunk attends to besides the sink (the rolling window)."""
    clean_context: bool = False
    """Causal mode: earlier chunks are seen as their clean frames encoded at t = 0 (a clean key/value cache, as in
    CausVid and Self Forcing), not through the forward that made them; a stream runs one more forward per chunk."""


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
    max_consecutive_skipped: int = 10000
    """Stop when this many samples in a row were corrupt (no valid sample arrives; ``apt.data.faults``)."""
    max_skipped_fraction: float = 0.1
    """Stop when more than this share of the samples read were corrupt (checked after 1000 samples per loader worker)."""


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
    """Classifier-free guidance scale of the teacher sampler (docs/design.md §5: moderate CFG is best on the toy)."""
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
    """How many recent checkpoints to keep (0 = keep all)."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts of the sample media (a PNG grid, and a GIF for clips) written to ``run_dir/samples`` every
    ``sample_every_steps`` and at the end; prompt i uses noise seed i. With neither this nor
    ``sample_prompts_file`` set the run writes no sample media (a warning says so once)."""
    sample_prompts_file: str = ""
    """A text file of sample prompts, one per line (blank lines skipped), instead of ``sample_prompts``
    (set one of the two); a missing or empty file fails before training starts."""
    num_sample_prompts: int = 0
    """At most this many of the sample prompts go into the media (0 = all of them; the tiny overlay: 2)."""
    progress_bar: bool = True
    progress_every_seconds: float = 60.0
    """One progress line (step/total, s/step, ETA, losses) every N seconds when stdout is not a terminal (a log
    file) or the progress bar is off (0 = never)."""


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
    """D-only updates before the first G update (docs/design.md §5: the toy needs ~60)."""
    train_d_backbone: bool = True
    """Train all D parameters (paper); False freezes the backbone (ablation)."""
    use_r1: bool = True
    """Approximate R1 on (ablation: off collapses)."""
    mismatch_weight: float = 0.0
    """Not in the paper (0 = APT as published). Weight of a matching-aware D term (GAN-INT-CLS, GigaGAN):
    real clips paired with the batch's most similar different text count as fake, so D must judge text
    alignment too. docs/log/demo_tuning.md: on the toy it taught D the shape word; with the 14000-step teacher it
    kept improving over 350 video updates where the published objective stopped (validation 24.5 vs 25.4)."""
    text_contrast_weight: float = 0.0
    """Not in the paper (0 = off; needs mismatch_weight > 0 so D reads the text). G-step term
    softplus(D(G(z), c') - D(G(z), c)) with c' the nearest other text: G's sample must look more like
    its own prompt than the nearest other one to D, a guidance-like signal for text alignment. docs/log/demo_tuning.md
    (sixth round): on the toy, weights 3 and 10 lowered the best validation distance from 17.80 to 17.05;
    the attribute accuracy stayed where the stage-1 init put it."""
    gan_loss: str = "nonsaturating"
    """nonsaturating (APT §3.3) | relativistic: softplus(-(D(x) - D(G(z)))) on (real, fake) pairs, AAPT's loss (§3.3)."""
    r2_lambda: float = 0.0
    """Weight of approximate R2 on the fakes, lambda || D(G(z)) - D(G(z) + sigma n) ||^2 with sigma = r1_sigma
    (AAPT pairs it with aR1 and the relativistic loss); 0 = off (APT)."""
    ema_decay: float = 0.995
    collapse_patience: int = 50
    """Warn when D wins outright (real>0>fake, D loss < 0.05) this many steps in a row."""


@dataclass
class StreamConfig:
    """The streaming stages (AAPT, arXiv 2506.09350; docs/streaming.md): the causal model itself is ``model.causal_chunk_frames``."""

    init: str = ""
    """stream_teacher: the bidirectional teacher (a checkpoint or run dir with net_ema) the causal model starts from;
    its weights load unchanged, the recycling layer starts at zero. A causal checkpoint continues its adaptation."""
    window_frames: int = 0
    """stream_apt: D judges every clip (real and rolled out) in windows of this many frames, the training length of the
    earlier stages (AAPT: long rollouts judged on segments); 0 = data.frames (one window)."""
    forcing: str = "student"
    """stream_apt: how G makes its fakes. "student": rolled out as at inference, its own chunks as context (AAPT);
    "teacher": every chunk from the real clip's past (the ablation that shows what student forcing buys;
    ``apt.methods.streaming.TeacherForcing``)."""
    grad_chunks: int = 0
    """stream_apt: only the last this many chunks of a rollout carry gradient (0 = every chunk; Self Forcing keeps the last 21 frames)."""
    detach_context: bool = True
    """stream_apt: each chunk's gradient stops at its own forward (the cache and the recycled chunk detached);
    False lets it flow back through them into the earlier chunks that carry gradient."""
    d_context: str = "windows"
    """stream_apt: how D sees a rollout longer than the training length. "windows": cut into ``window_frames`` windows
    judged separately; "stream": the whole rollout as D's own stream would see it (the sink and rolling window G streams
    with, in one forward), so every chunk is judged with the stream's first chunk in view
    (``apt.methods.streaming.ChunkDiscriminator``)."""
    dmd_weight: float = 0.0
    """stream_apt: weight of distribution matching on the rollouts (DMD, as Self Forcing trains; ``apt.methods.dmd``)
    added to G's adversarial loss; 0 = off (AAPT). On one device, DDP, FSDP2 or ZeRO."""
    dmd_teacher: str = ""
    """stream_apt with DMD: the teacher of both scores. Empty = the causal teacher (``apt.teacher``), teacher-forced on
    the rollout; a bidirectional checkpoint of the run's flavour (built-in DiT) = read in windows of ``window_frames``
    overlapping by half a window, so a clip that changes midway lies inside a window that sees both sides (Self
    Forcing's real score is its bidirectional base model; ``apt.methods.dmd.WholeClipWindows``). The fake score starts
    as a copy of it."""
    dmd_cfg_scale: float = 3.0
    """stream_apt with DMD: the classifier-free guidance scale of the teacher's (real) score."""
    fake_score_steps: int = 2
    """stream_apt with DMD: updates of the fake score (a copy of the causal teacher trained on G's rollouts) per iteration."""
    lr_fake_score: float = 1.0e-4
    """stream_apt with DMD: the fake score's learning rate (its optimiser is ``apt.optimizer``, as G's and D's)."""


@dataclass
class EvalConfig:
    """In-training evaluation on the toy world (``apt.toy.eval_callback``): the demo recipes' validation
    distance and attribute accuracy. Other models are evaluated after training (eval/fid.py, eval/fvd.py)."""

    every_steps: int = 0
    """Toy evaluation every N stage steps (0 = off); needs ``classifier`` and a built-in (toy) model."""
    num_samples: int = 256
    """Validation prompts (and real clips) per evaluation."""
    classifier: str = ""
    """Toy classifier directory (the demo recipes: assets/toy_classifier)."""
    seed: int = 1234
    """Read by nothing: sample prompts come from ``train.sample_prompts`` now (this seeded the toy prompts
    the sample grids used to draw); kept so that configs saved with earlier runs load."""


@dataclass
class PerfConfig:
    """Speed switches, applied to a model in one place (``apt.perf.apply_perf``, fixed order). Each has
    an equivalence test against the plain path (tests/test_perf.py); the defaults are the plain path."""

    attention_backend: str = "auto"
    """SDPA kernel: auto (PyTorch picks) | math | flash | efficient | cudnn (``torch.nn.attention.sdpa_kernel``); or an
    optional forward-only kernel, emulated on CPU: fa3 (FlashAttention-3 bf16) | fa3_fp8 (FlashAttention-3 FP8) | sage
    (SageAttention INT8 QK) (``apt.models.attention_kernels``; these need text_padding trim or varlen)."""
    text_padding: str = "mask"
    """Padded text tokens in the built-in DiT's attention: mask (a dense key mask, always) | trim (no mask when no token
    is padding; columns padded in every sample dropped, so batch 1 runs unmasked) | varlen (as trim; mixed lengths
    grouped into runs of one length, no dense mask) (``apt.models.attention.text_key_layout``)."""
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
    fp8_scaling: str = "tensor"
    """With fp8: tensor (one scale per activation and per weight) | row (one per token and per output channel)."""
    fp8_fast_accum: bool = False
    """With fp8: torch._scaled_mm(use_fast_accum=True), Hopper's faster, lower-precision FP8 accumulation
    (emulated on CPU by a model of it: ``apt.perf.fp8``)."""
    vae_chunk_frames: int = 0
    """Wan-VAE decode in chunks of this many latent frames after the first (0 = the VAE's own decode)."""
    vae_fold_padding: bool = False
    """Wan-VAE causal convs: spatial zero padding done by the convolution itself and the fp32 round trip of the
    nearest upsampling removed (fewer full-size copies; ``apt.perf.vae``)."""
    vae_channels_last: bool = False
    """Wan-VAE weights and activations in channels-last 3D layout (NDHWC convolution kernels)."""
    vae_compile: bool = False
    """torch.compile the Wan-VAE decoder's residual blocks (``compile_backend``)."""


@dataclass
class Config:
    stage: str = "teacher"
    """teacher | distill | apt (APT), or stream_teacher | stream_distill | stream_apt (AAPT's, for a causal model)."""
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
    stream: StreamConfig = field(default_factory=StreamConfig)
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
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a directory; give a recipe YAML file, e.g. recipes/demo/teacher.yaml")
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text (YAML) file") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} must hold a mapping at top level")
    return cfg


def parse_override(item: str) -> DictConfig:
    """``key=value`` -> a nested DictConfig. ``key=`` (nothing after '=') is the empty string, as ``key=''`` is
    (OmegaConf's dotlist would read it as null)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value")
    key, value = item.split("=", 1)
    if value.strip() == "":
        cfg = OmegaConf.create()
        OmegaConf.update(cfg, key.strip(), "", force_add=True)
        return cfg
    return OmegaConf.from_dotlist([item])


def load_config(recipe: str | None, overlays: list[str] = (), overrides: list[str] = ()) -> Config:
    """Merge defaults < recipe < overlays < overrides into a typed ``Config`` and validate it."""
    cfg = OmegaConf.structured(Config)
    if recipe:
        cfg = _merge(cfg, load_yaml(recipe), str(recipe))
    for name in overlays:
        path = resolve_overlay(name)
        cfg = _merge(cfg, load_yaml(path), str(path))
    for item in overrides:
        cfg = _merge(cfg, parse_override(item), f"override '{item}'")
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
    """Value checks that need no files, one function per section; each failure names the key. Every numeric
    field has a range (tests/test_config.py walks them all). File checks (shards, checkpoints) follow in
    ``apt.train.check_paths``, still before any work."""
    need(c.stage in STAGES, f"stage must be one of {', '.join(STAGES)}, got '{c.stage}'")
    for check in (check_text, check_data, check_model, check_causal, check_lora, check_flow, check_optim, check_train, check_distill, check_apt,
                  check_stream, check_eval):
        check(c)
    check_perf(c.perf)


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _value(section, key: str):
    return getattr(section, key.split(".")[-1])


def positive(section, *keys: str) -> None:
    """Each ``section.key`` (keys given in full, e.g. 'train.max_steps') must be > 0."""
    for key in keys:
        v = _value(section, key)
        need(v > 0, f"{key} must be positive, got {v}")


def at_least(section, lo: float, *keys: str, note: str = "") -> None:
    for key in keys:
        v = _value(section, key)
        need(v >= lo, f"{key} must be >= {lo}{note}, got {v}")


def within(section, key: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
    """``key`` in the interval from lo to hi ((lo, ...) when lo_open, (..., hi) when hi_open); a list: each element."""
    v = _value(section, key)
    for x in v if isinstance(v, (list, tuple)) else [v]:
        ok = (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
        need(ok, f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {v}")


def check_model(c: Config) -> None:
    from apt.models.registry import FLAVOURS

    need(c.model.source in MODEL_SOURCES, f"model.source must be one of {', '.join(MODEL_SOURCES)}, got '{c.model.source}'")
    need(not c.model.init or c.stage == "teacher",
         f"model.init={c.model.init} starts a teacher stage from a checkpoint; stage '{c.stage}' loads its networks from its own keys"
         + (" (stream.init)" if c.stage == "stream_teacher" else ""))
    from apt.models.checkpointing import CHECKPOINT_POLICIES

    need(c.model.checkpoint_policy in CHECKPOINT_POLICIES,
         f"model.checkpoint_policy must be one of {', '.join(CHECKPOINT_POLICIES)}, got '{c.model.checkpoint_policy}'")
    need(c.model.checkpoint_policy == "full" or c.model.source == "builtin",
         f"model.checkpoint_policy={c.model.checkpoint_policy} applies to the built-in DiT; diffusers models checkpoint their own way")
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


def check_causal(c: Config) -> None:
    """``model.causal_chunk_frames`` and its window (the built-in DiT's causal mode)."""
    m = c.model
    need(m.causal_chunk_frames >= 0, f"model.causal_chunk_frames must be >= 0 (0 = bidirectional), got {m.causal_chunk_frames}")
    need(m.sink_chunks >= 1, f"model.sink_chunks must be >= 1, got {m.sink_chunks}")
    need(m.window_chunks >= 0, f"model.window_chunks must be >= 0, got {m.window_chunks}")
    streaming = c.stage in STREAM_STAGES
    need(streaming == bool(m.causal_chunk_frames),
         f"stage '{c.stage}' with model.causal_chunk_frames={m.causal_chunk_frames}: the stream_* stages train a causal model "
         "(model.causal_chunk_frames > 0), the others a bidirectional one (0)")
    need(not m.clean_context or m.causal_chunk_frames > 0, "model.clean_context needs causal mode (model.causal_chunk_frames > 0)")
    if not m.causal_chunk_frames:
        return
    from apt.models.registry import FLAVOURS

    need(m.source == "builtin", f"model.causal_chunk_frames={m.causal_chunk_frames}: causal mode is a switch of the built-in DiT (model.source=builtin)")
    pt = FLAVOURS[m.flavour].patch_size[0]
    need(m.causal_chunk_frames % pt == 0, f"model.causal_chunk_frames={m.causal_chunk_frames} must be a multiple of the temporal patch {pt} of model '{m.flavour}'")
    need(c.data.frames % m.causal_chunk_frames == 0,
         f"data.frames={c.data.frames} is not a whole number of model.causal_chunk_frames={m.causal_chunk_frames}-frame chunks")
    need(c.train.sequence_parallel == 1, "train.sequence_parallel: the causal model's block mask is not wired into Ulysses; use 1")


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
    positive(c.text, "text.max_length")
    within(c.text, "text.dropout", 0.0, 1.0, hi_open=True)


def check_data(c: Config) -> None:
    d = c.data
    positive(d, "data.frames", "data.height", "data.width", "data.channels", "data.batch_size", "data.image_batch_size",
             "data.max_consecutive_skipped")
    at_least(d, 0, "data.num_workers")
    within(d, "data.max_skipped_fraction", 0.0, 1.0)
    need(not (d.image_shards and c.stage == "apt"),
         f"data.image_shards={d.image_shards}: the APT stage trains on data.shards only (one modality per stage: "
         "an image stage, then a video stage); set data.image_shards= (empty)")
    need(not (c.data.image_shards and c.stage in STREAM_STAGES),
         f"data.image_shards={c.data.image_shards}: stage '{c.stage}' trains a causal video model on data.shards only; set data.image_shards= (empty)")


def check_flow(c: Config) -> None:
    positive(c.flow, "flow.sample_steps", "flow.train_shift", "flow.sample_shift")
    at_least(c.flow, 0, "flow.cfg_scale", note=" (1 = no guidance)")


def check_optim(c: Config) -> None:
    o = c.optim
    need(o.schedule in ("constant", "cosine"), f"optim.schedule must be constant or cosine, got '{o.schedule}'")
    positive(o, "optim.lr")
    need(len(o.betas) == 2, f"optim.betas must be two numbers (beta1, beta2), got {o.betas}")
    within(o, "optim.betas", 0.0, 1.0, hi_open=True)
    at_least(o, 0, "optim.weight_decay", "optim.warmup_steps", "optim.decay_steps")
    at_least(o, 0, "optim.grad_clip", note=" (0 = off)")


def check_train(c: Config) -> None:
    t = c.train
    positive(t, "train.max_steps", "train.devices")
    at_least(t, 0, "train.seed", "train.num_nodes", "train.log_every_steps", "train.sample_every_steps", "train.ckpt_every_steps",
             "train.progress_every_seconds")
    at_least(t, 0, "train.keep_checkpoints", note=" (0 = keep all)")
    at_least(t, 0, "train.num_sample_prompts", note=" (0 = every sample prompt)")
    at_least(t, 1, "train.accumulate_grad_batches")
    within(t, "train.ema_decay", 0.0, 1.0, lo_open=True, hi_open=True)
    need(not (t.sample_prompts and t.sample_prompts_file),
         f"train.sample_prompts ({len(t.sample_prompts)} prompts) and train.sample_prompts_file ({t.sample_prompts_file}) are both set; keep one")
    check_strategy(c)
    check_sequence_parallel(c)


def check_strategy(c: Config) -> None:
    """A strategy this stage cannot run fails before any work."""
    s = c.train.strategy
    known = (*TRAINER_STRATEGIES, *DEEPSPEED_STAGES)
    need(s in known, f"train.strategy '{s}' unknown; choose from {', '.join(known)}")
    need(not (s == "fsdp2" and c.stage not in ADVERSARIAL_STAGES),
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
    d = c.distill
    at_least(d, 1, "distill.num_steps")
    positive(d, "distill.shift")
    at_least(d, 0, "distill.cfg_scale", "distill.final_step_weight")
    if c.stage in ("distill", "stream_distill"):
        need(bool(d.teacher), "distill.teacher must name the teacher checkpoint")


def check_apt(c: Config) -> None:
    a = c.apt
    positive(a, "apt.lr_g", "apt.lr_d", "apt.r1_sigma", "apt.d_timestep_shift")
    within(a, "apt.ema_decay", 0.0, 1.0, lo_open=True, hi_open=True)
    need(a.optimizer in ("rmsprop", "adam"), f"apt.optimizer must be rmsprop or adam, got '{a.optimizer}'")
    within(a, "apt.rmsprop_alpha", 0.0, 1.0, hi_open=True)
    need(len(a.adam_betas) == 2, f"apt.adam_betas must be two numbers (beta1, beta2), got {a.adam_betas}")
    within(a, "apt.adam_betas", 0.0, 1.0, hi_open=True)
    at_least(a, 0, "apt.r1_lambda", "apt.d_warmup_steps")
    at_least(a, 1, "apt.d_steps_per_g_step", "apt.collapse_patience")
    need(len(a.readout_fractions) > 0, "apt.readout_fractions must list at least one depth")
    within(a, "apt.readout_fractions", 0.0, 1.0, lo_open=True)
    at_least(a, 0, "apt.mismatch_weight", "apt.text_contrast_weight")
    need(a.text_contrast_weight == 0.0 or a.mismatch_weight > 0.0,
         f"apt.text_contrast_weight={a.text_contrast_weight} needs apt.mismatch_weight > 0 (a D that reads the text)")
    need(a.gan_loss in ("nonsaturating", "relativistic"), f"apt.gan_loss must be nonsaturating or relativistic, got '{a.gan_loss}'")
    need(a.r2_lambda >= 0.0, f"apt.r2_lambda must be >= 0 (0 = off), got {a.r2_lambda}")
    need(a.text_contrast_weight == 0.0 or a.gan_loss == "nonsaturating",
         f"apt.text_contrast_weight={a.text_contrast_weight} is a term of the non-saturating G loss; apt.gan_loss is '{a.gan_loss}'")
    if c.stage in ADVERSARIAL_STAGES:
        need(bool(a.generator), "apt.generator must name the stage-1 (distilled) checkpoint")
        need(bool(a.teacher), "apt.teacher must name the original diffusion checkpoint (D is initialised from it)")


def check_stream(c: Config) -> None:
    s, cf = c.stream, c.model.causal_chunk_frames
    need(s.grad_chunks >= 0, f"stream.grad_chunks must be >= 0 (0 = every chunk), got {s.grad_chunks}")
    need(s.window_frames >= 0, f"stream.window_frames must be >= 0 (0 = data.frames), got {s.window_frames}")
    need(s.d_context in ("windows", "stream"), f"stream.d_context must be 'windows' or 'stream', got {s.d_context!r}")
    need(s.forcing in ("student", "teacher"), f"stream.forcing must be 'student' or 'teacher', got {s.forcing!r}")
    need(s.forcing == "student" or (s.grad_chunks == 0 and s.detach_context),
         "stream.grad_chunks and stream.detach_context shape a student-forcing rollout; stream.forcing=teacher takes neither")
    if c.stage == "stream_teacher":
        need(bool(s.init), "stream.init must name the bidirectional teacher checkpoint the causal model starts from")
    at_least(s, 0, "stream.dmd_weight", note=" (0 = off)")
    at_least(s, 0, "stream.dmd_cfg_scale", note=" (1 = no guidance)")
    positive(s, "stream.fake_score_steps", "stream.lr_fake_score")
    if s.dmd_weight > 0:
        key = f"stream.dmd_weight={s.dmd_weight}"
        need(c.stage == "stream_apt", f"{key}: distribution matching is an option of stage stream_apt, not '{c.stage}'")
    if s.dmd_teacher:
        key = f"stream.dmd_teacher={s.dmd_teacher}"
        need(s.dmd_weight > 0, f"{key} is the teacher of distribution matching, which is off (stream.dmd_weight=0)")
    if c.stage == "stream_apt":
        window = s.window_frames or c.data.frames
        need(c.data.frames % window == 0, f"stream.window_frames={window} must divide data.frames={c.data.frames} (D judges whole windows)")
        need(window % cf == 0, f"stream.window_frames={window} must be a whole number of {cf}-frame chunks")


def check_eval(c: Config) -> None:
    """Ranges of every eval field, then whether a run may run the in-training (toy) evaluation."""
    e = c.eval
    at_least(e, 0, "eval.every_steps", note=" (0 = off)")
    at_least(e, 0, "eval.seed")
    positive(e, "eval.num_samples")
    if e.every_steps == 0:
        return
    key = f"eval.every_steps={e.every_steps}"
    need(c.model.source != "diffusers",
         f"{key}: the in-training evaluation scores the toy world with the toy classifier, not the samples of "
         f"model.source=diffusers (model.family={c.model.family}); set eval.every_steps=0 and evaluate checkpoints "
         "with eval/fid.py, eval/fvd.py or eval/benchmark_images.py / benchmark_video.py")
    need(bool(e.classifier), f"{key} needs eval.classifier, the toy classifier directory (the demo recipes: assets/toy_classifier)")


def check_perf(p: PerfConfig) -> None:
    """Also called by ``apt.perf.apply_perf``: a PerfConfig can be built in code, not only from a recipe."""
    from apt.models.attention import ATTENTION_BACKENDS

    need(p.attention_backend in ATTENTION_BACKENDS, f"perf.attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got '{p.attention_backend}'")
    at_least(p, 0, "perf.vae_chunk_frames")
    from apt.models.attention import KERNEL_BACKENDS, TEXT_PADDING_MODES

    need(p.text_padding in TEXT_PADDING_MODES, f"perf.text_padding must be one of {', '.join(TEXT_PADDING_MODES)}, got '{p.text_padding}'")
    need(not (p.attention_backend in KERNEL_BACKENDS and p.text_padding == "mask"),
         f"perf.attention_backend={p.attention_backend} takes no dense mask: set perf.text_padding=trim or varlen")
    need(p.fp8_scaling in ("tensor", "row"), f"perf.fp8_scaling must be tensor or row, got '{p.fp8_scaling}'")
    need(p.fp8 or (p.fp8_scaling == "tensor" and not p.fp8_fast_accum),
         "perf.fp8_scaling / perf.fp8_fast_accum are options of FP8 matmuls: set perf.fp8=true too")
