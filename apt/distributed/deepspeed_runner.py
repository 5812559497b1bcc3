"""APT under DeepSpeed ZeRO 1/2/3: G and D as two engines, driven by Lightning Fabric.

Why not Lightning's Trainer (DESIGN.md §4, measured): its DeepSpeed strategy takes one optimiser and
wraps the whole LightningModule in ONE engine, and it refuses CPU. APT has two networks with their
own optimisers, so each gets its own engine (``fabric.setup(net, optimizer)`` twice). The algorithm
stays in ``AptModule.apt_step``, shared with the Trainer path; this file only supplies

- ``EngineUpdate``: the step's ``NetUpdate`` for an engine (``fabric.backward(loss, model=engine)``
  names the engine; D is frozen in the G step by the step itself, which two ZeRO engines need),
- the loop: data for this rank (the same for the ranks of a sequence-parallel group), logging and
  media on rank 0, sharded checkpoints (``sharded_checkpoint``),
- under ZeRO-3, the EMA generator partitioned like G (``zero3_ema.PartitionedEma``).

The DeepSpeed config comes from the recipe (``apt.distributed.strategies.deepspeed_config``).
"""

from __future__ import annotations

import argparse
import time
import warnings

import lightning as L
import torch
from lightning.fabric.accelerators import CUDAAccelerator
from lightning.fabric.loggers import CSVLogger
from lightning.fabric.strategies import DDPStrategy as FabricDDPStrategy
from lightning.fabric.strategies import DeepSpeedStrategy as FabricDeepSpeedStrategy
from lightning.fabric.utilities.seed import reset_seed

from apt.config import Config, ConfigError
from apt.distributed import sharded_checkpoint
from apt.distributed.sequence_parallel import apply_sequence_parallel_apt, data_parallel_rank, sequence_parallel_mesh
from apt.distributed.strategies import deepspeed_config, num_nodes
from apt.distributed.zero3_ema import PartitionedEma


class DeepSpeedAnyDeviceStrategy(FabricDeepSpeedStrategy):
    """Fabric's DeepSpeed strategy, also on CPU (gloo): the three overrides measured in DESIGN.md §4."""

    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            return super().setup_environment()
        FabricDDPStrategy.setup_environment(self)  # skips the "only supported on CUDA GPUs" check

    def _setup_distributed(self) -> None:
        # As Fabric's, minus the device-index validation (CPU devices have no index).
        reset_seed()
        self._set_world_ranks()
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


class EngineUpdate:
    """``NetUpdate`` (``apt.lit.apt``) for one DeepSpeed engine with ``accumulate`` micro-batches per update.

    The engine counts micro-steps and only steps at its accumulation boundary; the step already
    divides each micro-batch loss by the count, so the engine must not scale it again.
    """

    def __init__(self, fabric: L.Fabric, net, accumulate: int):
        self.fabric, self.net, self.accumulate = fabric, net, accumulate
        self.engine = net._forward_module
        self.pending = 0

    def zero_grad(self) -> None:
        assert self.pending == 0, "an update was left half accumulated"  # the engine clears gradients in step()

    def backward(self, loss: torch.Tensor) -> None:
        self.fabric.backward(loss, model=self.net, scale_wrt_gas=False)
        self.pending += 1
        if self.pending < self.accumulate:
            self.engine.step()  # a micro-step: no update before the boundary

    def step(self) -> torch.Tensor:
        if self.pending != self.accumulate:
            raise RuntimeError(f"{self.pending} micro-batches backpropagated, expected {self.accumulate}")
        assert self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        self.pending = 0
        norm = self.engine.get_global_grad_norm()
        return torch.tensor(float("nan") if norm is None else float(norm))


class BypassWhenFrozen(torch.nn.Module):
    """D as the step calls it: through its engine while D trains (D step), straight into the engine's
    module while D is frozen (G step).

    Why: a DeepSpeed engine hooks its forward's outputs into whatever backward later passes through
    them (deepspeed 0.19: ``register_output_backward_hooks``), so G's backward through D would run D's
    gradient-reduction epilogue with no D gradients (IndexError in ``reduce_ipg_grads``, measured).
    Bypassing D's engine in the G step keeps G's backward G's alone; ZeRO-3 still gathers D's
    parameters through its module hooks. Inputs are cast to the engine's precision as Fabric would.
    """

    def __init__(self, fabric_module, precision):
        super().__init__()
        self.fabric_module = fabric_module
        self._precision = precision
        self._trainable = [p for p in fabric_module.parameters() if p.requires_grad]

    def forward(self, *args, **kwargs):
        if not self._trainable or self._trainable[0].requires_grad:
            return self.fabric_module(*args, **kwargs)
        args, kwargs = self._precision.convert_input((args, kwargs))
        with self._precision.forward_context():
            out = self.fabric_module._forward_module.module(*args, **kwargs)
        return self._precision.convert_output(out)

    def __getattr__(self, item):
        try:
            return super().__getattr__(item)
        except AttributeError:
            return getattr(super().__getattr__("fabric_module"), item)


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
    """Turn G and D of an ``AptModule`` into engines (in place), then split their sequences over groups
    of ``train.sequence_parallel`` ranks if asked; return their updates."""
    device = fabric.device
    generator, discriminator = module.generator, module.discriminator
    for name, child in module.named_children():
        if name not in ("generator", "discriminator"):
            child.to(device)  # the engines place G and D themselves (ZeRO-3: already partitioned)
    module._device = device  # LightningModule.device, read by the step to place noise
    opt_g, opt_d = module.configure_optimizers()
    G, opt_g = fabric.setup(module.generator, opt_g)
    D, opt_d = fabric.setup(module.discriminator, opt_d)
    module.generator, module.discriminator = G, BypassWhenFrozen(D, fabric.strategy.precision)
    if G._forward_module.zero_optimization_stage() == 3:  # the EMA partitioned like G (ZeRO-1/2: whole, as G is)
        module.ema_partitions = PartitionedEma(module.generator_ema, G)
        module.log_ema_size()
    P = module.config.train.sequence_parallel
    if P > 1:  # after the engines (the order of apt.distributed.strategies)
        apply_sequence_parallel_apt(generator, discriminator, sequence_parallel_mesh(P, device.type))
    return EngineUpdate(fabric, G, accumulate), EngineUpdate(fabric, D, accumulate)


def _mean_over_ranks(fabric: L.Fabric, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    keys = sorted(metrics)
    values = torch.stack([metrics[k].detach().float().cpu().reshape(()) for k in keys])
    values = fabric.all_reduce(values, reduce_op="mean")
    return {k: float(v) for k, v in zip(keys, values)}


def fit_deepspeed(c: Config, ckpt_path: str | None = None):
    """Train the APT stage under ``train.strategy: deepspeed_stage_{1,2,3}``; returns the module."""
    from apt.data.latent_shards import is_latent_shards, latent_train_loader
    from apt.data.shards import resolve_shards, train_loader
    from apt.lit.apt import AptModule
    from apt.lit.callbacks import SampleMedia, checkpoint_path
    from apt.prompts import sample_prompts

    if c.stage != "apt":
        raise ConfigError(f"the DeepSpeed runner trains the APT stage; stage '{c.stage}' uses Lightning's strategies")
    if c.data.image_shards:
        raise ConfigError("data.image_shards: the APT stage trains on data.shards only (one modality per stage)")
    if c.eval.every_steps:
        warnings.warn("eval.every_steps is ignored under DeepSpeed (in-training evaluation runs on the Trainer path)", stacklevel=2)
    accumulate = accumulate_batches(c)
    fabric = build_fabric(c)
    fabric.launch()
    L.seed_everything(c.train.seed, workers=True, verbose=False)
    module = AptModule(c)
    update_g, update_d = setup_apt(fabric, module, accumulate)
    if ckpt_path is not None:
        sharded_checkpoint.load(fabric, ckpt_path, module)
    rank, world_size = data_parallel_rank(fabric.global_rank, fabric.world_size, c.train.sequence_parallel)  # of the data
    shards = resolve_shards(c.data.shards)
    loader = (latent_train_loader if is_latent_shards(shards) else train_loader)(  # as ShardDataModule chooses
        shards, batch_size=c.data.batch_size, seed=c.train.seed,
        rank=rank, world_size=world_size, num_workers=c.data.num_workers,
        skip_batches=module.batches_consumed,
    )
    sampler = SampleMedia(c.run_dir, c.train.sample_every_steps, sample_prompts(c), steps=1, cfg_scale=1.0)
    batches = iter(loader)
    last_saved = module.progress_step if ckpt_path else -1

    def save() -> None:
        nonlocal last_saved
        if module.progress_step != last_saved:
            sharded_checkpoint.save(fabric, checkpoint_path(c.run_dir, module.progress_step), module, keep=c.train.keep_checkpoints)
            last_saved = module.progress_step
            for logger in fabric.loggers:
                logger.save()  # the metrics up to a checkpoint survive a crash after it

    while not module.done:
        micro_batches = [fabric.to_device(next(batches)) for _ in range(accumulate)]  # the Trainer path does this itself
        t0 = time.perf_counter()  # the step, as the Trainer's Throughput callback times it
        module.batches_consumed += accumulate  # before the step, as the Trainer path counts it
        g_before = module.progress_step
        metrics = module.apt_step(micro_batches, update_g=update_g, update_d=update_d, rank=rank, world_size=world_size)
        iteration = module.batches_consumed // accumulate - 1
        if c.train.log_every_steps and iteration % c.train.log_every_steps == 0:
            logged = _mean_over_ranks(fabric, metrics)
            logged.update(g_updates=float(module.g_updates), sec_per_step=time.perf_counter() - t0)
            fabric.log_dict(logged, step=iteration)
        step = module.progress_step
        if step != g_before:
            if (c.train.ckpt_every_steps and step % c.train.ckpt_every_steps == 0) or module.done:
                save()
            if c.train.sample_every_steps and step % c.train.sample_every_steps == 0:
                sampler.write(module)
    save()
    sampler.write(module)
    for logger in fabric.loggers:
        logger.finalize("success")
    return module
