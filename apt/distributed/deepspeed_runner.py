"""APT under DeepSpeed ZeRO 1/2/3: G and D as two engines (a streaming run's fake score a third), driven by Lightning Fabric.

Why not Lightning's Trainer (docs/design.md §3, measured): its DeepSpeed strategy takes one optimiser and
wraps the whole LightningModule in ONE engine, and it refuses CPU. APT has two networks with their
own optimisers, so each gets its own engine (``fabric.setup(net, optimizer)`` twice). The algorithm
stays in ``apt.methods.apt.apt_step`` (through ``AptModule.run_step``), shared with the Trainer path;
the engines are made by ``apt.distributed.parallelize`` (``apt.distributed.engines``); this file supplies

- the loop: data for this rank (the same for the ranks of a sequence-parallel group), logging,
  progress lines and media on rank 0, sharded checkpoints (``sharded_checkpoint``), a stop signal
  honoured at the next iteration boundary with a checkpoint (``apt.preemption``),
- under ZeRO-3, the EMA generator partitioned like G (``zero3_ema.PartitionedEma``).

The DeepSpeed config comes from the recipe (``apt.distributed.strategies.deepspeed_config``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import lightning as L
import torch
from lightning.fabric.accelerators import CUDAAccelerator
from lightning.fabric.loggers import CSVLogger
from lightning.fabric.strategies import DDPStrategy as FabricDDPStrategy
from lightning.fabric.strategies import DeepSpeedStrategy as FabricDeepSpeedStrategy
from lightning.fabric.utilities.seed import reset_seed

from apt.config import ADVERSARIAL_STAGES, Config, ConfigError
from apt.distributed import sharded_checkpoint
from apt.distributed.engines import EngineUpdate
from apt.distributed.parallelize import parallelize_apt
from apt.distributed.process_group import skip_deepspeed_inference_comm_op
from apt.distributed.sequence_parallel import data_parallel_rank
from apt.distributed.strategies import deepspeed_config, num_nodes
from apt.preemption import Preempted, agree_to_stop, signal_name


class DeepSpeedAnyDeviceStrategy(FabricDeepSpeedStrategy):
    """Fabric's DeepSpeed strategy, also on CPU (gloo): the three overrides of docs/design.md §3."""

    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            return super().setup_environment()
        FabricDDPStrategy.setup_environment(self)  # skips the "only supported on CUDA GPUs" check

    def _setup_distributed(self) -> None:
        # As Fabric's, minus the device-index validation (CPU devices have no index), and without building DeepSpeed's
        # CPU inference comm op, which training never calls.
        reset_seed()
        self._set_world_ranks()
        skip_deepspeed_inference_comm_op()
        self._init_deepspeed_distributed()
        if not self._config_initialized:
            self._format_config()
            self._config_initialized = True

    def _initialize_engine(self, model, optimizer=None, scheduler=None):
        import deepspeed

        device_rank = self.root_device.index if self.root_device.index is not None else self.local_rank
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            args=argparse.Namespace(device_rank=device_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer, ds_scheduler


def build_fabric(c: Config) -> L.Fabric:
    strategy = DeepSpeedAnyDeviceStrategy(config=deepspeed_config(c, accumulate=accumulate_batches(c)))
    return L.Fabric(
        accelerator=c.train.accelerator,
        devices=c.train.devices,
        num_nodes=num_nodes(c),
        strategy=strategy,
        precision=c.train.precision,
        loggers=CSVLogger(c.run_dir, name="logs"),
    )


def accumulate_batches(c: Config) -> int:
    """Micro-batches per update (``train.accumulate_grad_batches``)."""
    return c.train.accumulate_grad_batches


def setup_apt(fabric: L.Fabric, module, accumulate: int = 1) -> tuple[EngineUpdate, EngineUpdate]:
    """G and D of an ``AptModule`` as engines, then Ulysses if asked (``apt.distributed.parallelize``); their updates.
    A streaming run with distribution matching gets its fake score's engine inside its DMD term (``module.extra``)."""
    update_g, update_d, *fake = parallelize_apt(module, sequence_parallel=module.config.train.sequence_parallel, fabric=fabric,
                                                accumulate=accumulate, device_type=fabric.device.type)
    if fake:
        module.extra = module.distribution_matching(fake[0])
    return update_g, update_d


def _mean_over_ranks(fabric: L.Fabric, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    keys = sorted(metrics)
    values = torch.stack([metrics[k].detach().float().cpu().reshape(()) for k in keys])
    values = fabric.all_reduce(values, reduce_op="mean")
    return {k: float(v) for k, v in zip(keys, values)}


def fit_deepspeed(c: Config, ckpt_path: str | None = None, *, prepare_run_dir: Callable[[], None] | None = None):
    """Train the APT stage under ``train.strategy: deepspeed_stage_{1,2,3}``; returns the module.

    ``prepare_run_dir``: called once the networks are built, before anything is written to the run directory."""
    from apt.data.faults import merge_snapshots
    from apt.data.latent_shards import is_latent_shards, latent_train_loader
    from apt.data.shards import resolve_shards, train_loader
    from apt.lit.callbacks import SampleMedia, checkpoint_path
    from apt.progress import ProgressLog
    from apt.prompts import sample_prompts

    if c.stage not in ADVERSARIAL_STAGES:
        raise ConfigError(f"the DeepSpeed runner trains the APT stages ({', '.join(ADVERSARIAL_STAGES)}); stage '{c.stage}' uses Lightning's strategies")
    from apt.lit.apt import AptModule
    from apt.lit.stream import (
        StreamAptModule,  # the same step with a student-forcing rollout and a per-chunk D
    )
    accumulate = accumulate_batches(c)
    fabric = build_fabric(c)
    fabric.launch()
    L.seed_everything(c.train.seed, workers=True, verbose=False)
    module = (StreamAptModule if c.stage == "stream_apt" else AptModule)(c)
    update_g, update_d = setup_apt(fabric, module, accumulate)
    if ckpt_path is not None:
        sharded_checkpoint.load(fabric, ckpt_path, module)
    if prepare_run_dir is not None:
        prepare_run_dir()
    fabric.barrier()  # rank 0 cleaned the run directory before any rank saves
    rank, world_size = data_parallel_rank(fabric.global_rank, fabric.world_size, c.train.sequence_parallel)  # of the data
    shards = resolve_shards(c.data.shards)
    loader = (latent_train_loader if is_latent_shards(shards) else train_loader)(  # as ShardDataModule chooses
        shards, batch_size=c.data.batch_size, seed=c.train.seed,
        rank=rank, world_size=world_size, num_workers=c.data.num_workers,
        skip_batches=module.batches_consumed,
        max_consecutive_skipped=c.data.max_consecutive_skipped, max_skipped_fraction=c.data.max_skipped_fraction,
    )
    sampler = SampleMedia(c.run_dir, c.train.sample_every_steps, sample_prompts(c), steps=1, cfg_scale=1.0)
    progress = ProgressLog("apt", c.train.max_steps, c.train.progress_every_seconds, progress_bar=c.train.progress_bar, rank=fabric.global_rank)
    progress.start(module.progress_step)
    faults: dict = {}
    batches = iter(loader)
    last_saved = (module.progress_step, module.batches_consumed) if ckpt_path else (-1, -1)

    def save(force: bool = False):
        """Once per generator update; ``force`` (a stop signal) also after D-only iterations since that save."""
        nonlocal last_saved
        path = checkpoint_path(c.run_dir, module.progress_step)
        if module.progress_step != last_saved[0] or (force and module.batches_consumed != last_saved[1]):
            sharded_checkpoint.save(fabric, path, module, keep=c.train.keep_checkpoints)
            last_saved = (module.progress_step, module.batches_consumed)
            for logger in fabric.loggers:
                logger.save()  # the metrics up to a checkpoint survive a crash after it
        return path

    while not module.done:
        micro_batches = [fabric.to_device(next(batches)) for _ in range(accumulate)]  # the Trainer path does this itself
        t0 = time.perf_counter()  # the step, as the Trainer's Throughput callback times it
        module.batches_consumed += accumulate  # before the step, as the Trainer path counts it
        g_before = module.progress_step
        metrics = module.run_step(micro_batches, update_g=update_g, update_d=update_d, rank=rank, world_size=world_size)
        iteration = module.batches_consumed // accumulate - 1
        skipped = merge_snapshots(faults, micro_batches)  # this rank's loader; rank 0's are logged
        if c.train.log_every_steps and iteration % c.train.log_every_steps == 0:
            logged = _mean_over_ranks(fabric, metrics)
            logged.update(g_updates=float(module.g_updates), sec_per_step=time.perf_counter() - t0, **skipped)
            fabric.log_dict(logged, step=iteration)
            progress.update(module.progress_step, logged)
        step = module.progress_step
        if step != g_before:
            if (c.train.ckpt_every_steps and step % c.train.ckpt_every_steps == 0) or module.done:
                save()
            if c.train.sample_every_steps and step % c.train.sample_every_steps == 0:
                sampler.write(module)
        signum = agree_to_stop(fabric.device)  # collective: every rank stops at the same iteration
        if signum:
            path = save(force=True)
            for logger in fabric.loggers:
                logger.finalize("failed")
            raise Preempted(signum, f"stopped by {signal_name(signum)} after generator update {step} of {c.train.max_steps}: checkpoint {path} written")
    save()
    sampler.write(module)
    for logger in fabric.loggers:
        logger.finalize("success")
    return module
