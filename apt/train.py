"""Build and run one stage: config -> checks -> the stage's runner -> its method.

Order (fixed, documented): check the config and files (shards, init checkpoints) and choose the
checkpoint to resume from (``resume=auto``: the newest that verifies) before any work; refuse to
overwrite a run that has checkpoints unless resuming; build the stage's networks (loading their
weights); only then write into ``run_dir`` (stale temporaries removed, broken checkpoints moved
aside, the resolved config); then the APT stage under DeepSpeed goes to
``apt.distributed.deepspeed_runner``, everything else to Lightning's Trainer with the stage's module
(``STAGES``), whose ``training_step`` calls the method in ``apt.methods``. Both run under
``apt.preemption.PreemptionGuard``: a stop signal ends the run at a step boundary with a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from apt.checkpoint import (
    CheckpointError,
    clean_stale_temporaries,
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from apt.config import (
    ADVERSARIAL_STAGES,
    MANY_STEP_STAGES,
    Config,
    ConfigError,
    check_config,
    load_config,
    save_config,
    to_yaml,
)
from apt.distributed.process_group import close_process_group, import_before_init
from apt.distributed.strategies import make_strategy, num_nodes, uses_deepspeed
from apt.lit.apt import AptModule
from apt.lit.callbacks import DataFaultMetrics, LogProgress, PeriodicCheckpoint, SampleMedia, Throughput
from apt.lit.checkpoint_io import SafetensorsCheckpointIO
from apt.lit.distill import DistillModule
from apt.lit.preemption import StopOnSignal, without_lightning_signal_handlers
from apt.lit.stream import StreamAptModule, StreamDistillModule, StreamTeacherModule
from apt.lit.teacher import TeacherModule
from apt.preemption import PreemptionGuard
from apt.prompts import sample_prompts

# Each stage's method (a plain-torch function) and the Lightning module that holds its networks and calls it.
STAGES = {
    "teacher": TeacherModule,  # apt.methods.flow_matching.teacher_loss
    "distill": DistillModule,  # apt.methods.consistency.consistency_loss
    "apt": AptModule,  # apt.methods.apt.apt_step (also run by apt.distributed.deepspeed_runner)
    # AAPT's stages for a causal model (model.causal_chunk_frames > 0), the same methods teacher- or student-forced:
    "stream_teacher": StreamTeacherModule,  # teacher_loss, teacher-forced (apt.methods.streaming.TeacherForced)
    "stream_distill": StreamDistillModule,  # consistency_loss, teacher-forced
    "stream_apt": StreamAptModule,  # apt_step with a student-forcing rollout and a per-chunk D (also DeepSpeed)
}


def check_paths(c: Config) -> None:
    """File checks that must pass before any training starts; each error names the key and path."""
    from apt.data.shards import resolve_shards

    for key in ("shards", "image_shards"):
        value = getattr(c.data, key)
        if key == "image_shards" and not value:
            continue
        try:
            resolve_shards(value)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.{key}: {e}") from None
        check_manifest(c, key, value)
        check_shard_text(c, key, value)
    if c.train.sample_prompts_file:
        sample_prompts(c)  # a missing or empty prompts file fails here, before any work
    from apt.models.factory import weights_available

    adversarial = [("apt.generator", c.apt.generator, ["generator_ema", "net_ema"]), ("apt.teacher", c.apt.teacher, ["net_ema"])]
    needs = {"teacher": [("model.init", c.model.init, ["net_ema"])] if c.model.init else [],
             "distill": [("distill.teacher", c.distill.teacher, ["net_ema"])], "apt": adversarial,
             "stream_teacher": [("stream.init", c.stream.init, ["net_ema"])],
             "stream_distill": [("distill.teacher", c.distill.teacher, ["net_ema"])],
             "stream_apt": adversarial + ([("stream.dmd_teacher", c.stream.dmd_teacher, ["net_ema"])] if c.stream.dmd_teacher else [])}
    for key, path, names in needs.get(c.stage, []):
        if not any(weights_available(c, path, n) for n in names):
            what = " or ".join(f"{n}.safetensors" for n in names)
            raise ConfigError(f"{key}: no weights at {path} (expected a checkpoint/run dir with {what}"
                              + (", or a diffusers model dir" if c.model.source == "diffusers" else "") + ")")
    P = c.train.sequence_parallel
    if P > 1 and c.model.source == "diffusers":  # the built-in flavours' heads are checked with the config
        from apt.models.adapters import read_model_config

        model_config = read_model_config(c.model.path)[1]
        heads = model_config["num_attention_heads"]
        if heads % P:
            raise ConfigError(f"train.sequence_parallel={P}: Ulysses splits attention heads over the group, and the {heads} heads of "
                              f"model.path {c.model.path} do not divide {P} ranks")
        check_sequence_split(c, model_config.get("patch_size"))


def check_sequence_split(c: Config, patch_size) -> None:
    """diffusers' context parallelism splits the visual tokens without padding: their count, from the first
    latent of data.shards and the model's patch, must divide train.sequence_parallel."""
    from apt.data.latent_shards import first_latent_shape
    from apt.data.shards import resolve_shards
    from apt.distributed.context_parallel import latent_token_count

    P, shape = c.train.sequence_parallel, first_latent_shape(resolve_shards(c.data.shards))
    if not patch_size or shape is None:
        return  # pixel shards are encoded on the fly: apt.distributed.context_parallel checks at the first forward
    (_, f, h, w), (pt, ph, pw) = shape, patch_size
    tokens = latent_token_count((f, h, w), patch_size)
    if tokens % P:
        raise ConfigError(f"train.sequence_parallel={P}: the latents of data.shards {c.data.shards} are {f}x{h}x{w} (frames x height x width), "
                          f"{tokens} visual tokens for patch {pt}x{ph}x{pw}, which do not split over {P} ranks; choose another "
                          f"sequence-parallel size or a resolution/frame count whose token count divides {P}")


def check_manifest(c: Config, key: str, path: str) -> None:
    """Shards that describe their clips (manifest.json) must match the config's clip shape."""
    manifest = Path(path) / "manifest.json"
    if not manifest.exists():
        return
    m = json.loads(manifest.read_text())
    frames = 1 if key == "image_shards" else c.data.frames
    for field, want in (("frames", frames), ("height", c.data.height), ("width", c.data.width)):
        if field in m and m[field] != want:
            expected = f"data.{field}={want}" if key == "shards" or field != "frames" else "one-frame images"
            raise ConfigError(f"data.{key}: {path} holds clips with {field}={m[field]} but the config expects {expected}")


def check_shard_text(c: Config, key: str, path: str) -> None:
    """Latent shards with text embeddings must have been encoded under the run's text convention."""
    from apt.data.latent_shards import check_text_convention
    from apt.text import text_convention

    try:
        check_text_convention(path, text_convention(c.text.encoder, c.text.max_length))
    except ValueError as e:
        raise ConfigError(f"data.{key}: {e}") from None


def say(message: str) -> None:
    """One line for the person running the job (stderr, rank 0)."""
    if rank_zero_only.rank == 0:
        print(message, file=sys.stderr, flush=True)


def resume_path(c: Config) -> tuple[str | None, list[Path]]:
    """The checkpoint to resume from (None: a new run) and the broken checkpoints ``resume=auto`` skipped.

    ``resume=auto`` takes the newest checkpoint of run_dir that verifies (``apt.checkpoint.verify_checkpoint``)
    and says which ones it skipped and why; on a run_dir without checkpoints (a new run, or a mistyped path)
    it says that it starts a new run there. An explicit path must verify."""
    run_dir = Path(c.run_dir)
    if not c.resume:
        if latest_checkpoint(run_dir) is not None:
            raise ConfigError(f"run_dir {run_dir} already has checkpoints; pass resume=auto to continue it or choose another run_dir")
        return None, []
    if c.resume == "auto":
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            why = "does not exist" if not run_dir.exists() else "has no checkpoint"
            say(f"resume=auto: {run_dir} {why}; starting a new run there")
            return None, []
        skipped = []
        for ckpt in reversed(ckpts):
            try:
                verify_checkpoint(ckpt)
            except CheckpointError as e:
                say(f"resume=auto: skipping {ckpt.name}: {e}")
                skipped.append(ckpt)
                continue
            say(f"resume=auto: continuing from {ckpt}" + (f" (skipped {len(skipped)} broken: {', '.join(p.name for p in skipped)})" if skipped else ""))
            return str(ckpt), skipped
        raise ConfigError(f"resume=auto: none of the {len(ckpts)} checkpoints in {run_dir / 'checkpoints'} is intact (see the lines above); "
                          "pass resume=<checkpoint dir> to choose one, or start a new run_dir")
    if not Path(c.resume, "trainer_state.pt").exists():
        raise ConfigError(f"resume: {c.resume} is not a checkpoint directory")
    try:
        verify_checkpoint(c.resume)
    except CheckpointError as e:
        raise ConfigError(f"resume: {e}") from None
    return c.resume, []


def prepare_run_dir(c: Config, broken: list[Path]) -> None:
    """The first writes into run_dir, once every check passed (rank 0): remove what a killed save left, move the
    checkpoints ``resume=auto`` skipped aside (``step-N.broken``, kept for inspection), write the resolved config."""
    if rank_zero_only.rank != 0:  # launched ranks (torchrun, SLURM) would race on the same files
        return
    for line in clean_stale_temporaries(c.run_dir):
        say(f"checkpoints: {line}")
    for ckpt in broken:
        aside = ckpt.with_name(ckpt.name + ".broken")
        if ckpt.exists() and not aside.exists():
            os.replace(ckpt, aside)
            say(f"checkpoints: moved the broken {ckpt.name} aside to {aside}")
    save_config(c, Path(c.run_dir) / "config.yaml")


class _HideMaxStepsReached(logging.Filter):
    """Lightning's "`Trainer.fit` stopped: `max_steps=14` reached." counts optimiser steps of both APT networks;
    apt says what the user asked for (``fit``'s last line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("`Trainer.fit` stopped: `max_steps=")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_HideMaxStepsReached())


def build_trainer(c: Config, module) -> L.Trainer:
    sample_steps = c.flow.sample_steps if c.stage in MANY_STEP_STAGES else 1
    cfg_scale = c.flow.cfg_scale if c.stage in MANY_STEP_STAGES else 1.0
    checkpoint = PeriodicCheckpoint(c.run_dir, c.train.ckpt_every_steps, c.train.keep_checkpoints)
    callbacks = [
        checkpoint,
        StopOnSignal(checkpoint, accumulate=c.train.accumulate_grad_batches),
        SampleMedia(c.run_dir, c.train.sample_every_steps, sample_prompts(c), steps=sample_steps, cfg_scale=cfg_scale),
        Throughput(),
        DataFaultMetrics(),
        LogProgress(c),
    ]
    if c.eval.every_steps:
        from apt.toy.eval_callback import ToyEvalCallback

        callbacks.append(ToyEvalCallback(c))
    return without_lightning_signal_handlers(L.Trainer(
        max_steps=module.trainer_max_steps(),
        max_epochs=-1,
        accelerator=c.train.accelerator,
        devices=c.train.devices,
        num_nodes=num_nodes(c),
        strategy=make_strategy(c),
        precision=c.train.precision,
        logger=CSVLogger(c.run_dir, name="logs"),
        callbacks=callbacks,
        plugins=[SafetensorsCheckpointIO()],
        enable_checkpointing=False,
        enable_progress_bar=c.train.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=c.train.log_every_steps or 1,
        # Automatic optimisation (teacher, distill): Lightning accumulates and clips; the APT step does both itself.
        gradient_clip_val=(c.optim.grad_clip or None) if module.automatic_optimization else None,
        accumulate_grad_batches=c.train.accumulate_grad_batches if module.automatic_optimization else 1,
        default_root_dir=c.run_dir,
        num_sanity_val_steps=0,
    ))


def fit(c: Config):
    """Train one stage; returns the fitted module."""
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # frozen text encoder / EMA copies
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    from apt.lit.data import ShardDataModule

    check_config(c)  # load_config checked it; a Config built in code is checked here
    # before Lightning / Fabric create the process group (apt.distributed.process_group)
    import_before_init(deepspeed=uses_deepspeed(c) or c.train.sequence_parallel > 1)
    check_paths(c)
    ckpt, broken = resume_path(c)
    L.seed_everything(c.train.seed, workers=True, verbose=False)
    with PreemptionGuard():
        if c.stage in ADVERSARIAL_STAGES and uses_deepspeed(c):  # two engines (G, D): docs/distributed.md
            from apt.distributed.deepspeed_runner import fit_deepspeed

            module = fit_deepspeed(c, ckpt, prepare_run_dir=lambda: prepare_run_dir(c, broken))
        else:
            module = STAGES[c.stage](c)  # builds the networks, loads their weights (errors name the file)
            prepare_run_dir(c, broken)
            trainer = build_trainer(c, module)
            trainer.fit(module, datamodule=ShardDataModule(c), ckpt_path=ckpt)
    what = "generator updates" if c.stage in ADVERSARIAL_STAGES else "steps"
    say(f"[{c.stage}] done: {module.progress_step} {what} (train.max_steps={c.train.max_steps}); checkpoints in {Path(c.run_dir) / 'checkpoints'}")
    return module


def fit_from_args(recipe: str, overlays: list[str], overrides: list[str], *, dry_run: bool = False) -> int:
    c = load_config(recipe, overlays, overrides)
    if dry_run:
        print(to_yaml(c), end="")
        return 0
    fit(c)
    close_process_group()
    return 0

