"""Map ``train.strategy`` to what runs it (docs/distributed.md has the measurements behind each choice).

    auto | single            Lightning's default: one device
    ddp                      Trainer + DDPStrategy(find_unused_parameters=True): each backward of an
                             APT step reaches one network only (D step, then G step)
    fsdp2                    Trainer + ModelParallelStrategy; ``AptModule.configure_model`` calls
                             ``fully_shard_apt``: G and D are sharded separately, block by block
    deepspeed_stage_{1,2,3}  APT: the Fabric runner (``apt.distributed.deepspeed_runner``) with one
                             DeepSpeed engine per network; Lightning's Trainer strategy takes one
                             optimiser and one engine, and refuses CPU (DESIGN.md §4)

Order in which parallelism is applied (fixed): model built -> weights loaded -> (FSDP2) blocks then
root sharded per network -> (DeepSpeed) one engine per network -> (Ulysses) attention wrapped
(``apt.distributed.sequence_parallel``).
"""

from __future__ import annotations

import os

import torch

from apt.config import Config, ConfigError

DEEPSPEED_STAGES = {"deepspeed_stage_1": 1, "deepspeed_stage_2": 2, "deepspeed_stage_3": 3}
TRAINER_STRATEGIES = ("auto", "single", "ddp", "fsdp2")


def uses_deepspeed(config: Config) -> bool:
    return config.train.strategy.startswith("deepspeed")


def num_nodes(config: Config) -> int:
    """Nodes of the job: ``train.num_nodes`` if the config has it, else what the launcher says
    (SLURM_NNODES, or torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE), else 1."""
    if config.train.num_nodes:
        return config.train.num_nodes
    if "SLURM_NNODES" in os.environ and "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_NNODES"])
    if "WORLD_SIZE" in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        return max(1, int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"]))
    return 1


def check_strategy(config: Config) -> None:
    """Fail before any work on a strategy this stage cannot run (ConfigError naming the key)."""
    s = config.train.strategy
    known = (*TRAINER_STRATEGIES, *DEEPSPEED_STAGES)
    if s not in known:
        raise ConfigError(f"train.strategy '{s}' unknown; choose from {', '.join(known)}")
    if s == "fsdp2" and config.stage != "apt":
        raise ConfigError(f"train.strategy=fsdp2 shards the APT stage's G and D; stage '{config.stage}' runs with ddp or deepspeed_stage_*")


def make_strategy(config: Config):
    """The Lightning Trainer strategy for ``train.strategy`` (DeepSpeed APT runs use the Fabric runner)."""
    s = config.train.strategy
    if s in ("auto", "single"):
        return "auto"
    if s == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=True)
    if s == "fsdp2":
        world = config.train.devices * num_nodes(config) if isinstance(config.train.devices, int) else "auto"
        return FSDP2Strategy(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=False)
    if s in DEEPSPEED_STAGES:
        if config.stage == "apt":
            raise ConfigError(f"train.strategy={s}: the APT stage runs through apt.distributed.deepspeed_runner (apt.train.fit dispatches to it)")
        return s  # teacher / distill: one network, one optimiser; Lightning's own DeepSpeed strategy (CUDA only)
    check_strategy(config)
    raise AssertionError(s)


# -- DeepSpeed -------------------------------------------------------------------------------------
def deepspeed_config(config: Config, *, accumulate: int = 1) -> dict:
    """DeepSpeed config of one APT engine, generated from the recipe (same for G and D).

    ZeRO stage from ``train.strategy``; bf16 from ``train.precision`` (set by Fabric's precision
    plugin); no gradient clipping (APT §3.5); ``accumulate`` micro-batches per update, each engine
    stepping only after its own accumulation (``AptModule.apt_step`` runs all D micro-batches, then
    all G micro-batches). Activation checkpointing is the model's own (``model.gradient_checkpointing``,
    non-reentrant torch checkpointing), identical under every strategy, so DeepSpeed's is not used.
    """
    stage = DEEPSPEED_STAGES[config.train.strategy]
    zero: dict = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        # Gather parameters per block as the forward reaches it; no prefetch/persistence tuning at toy scale.
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0, stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": accumulate,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # RMSProp / Adam(0, 0.9) as the paper uses
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }


# -- FSDP2 -----------------------------------------------------------------------------------------
def fully_shard_apt(module, mesh) -> None:
    """FSDP2 for the APT module: each backbone block, then the rest of G, of its EMA and of D, as separate units.

    G and D are separate FSDP roots (they run and step separately). The EMA generator is sharded
    exactly like G (same mesh, same units), so each rank's EMA shards match its G shards and the EMA
    update is a local lerp (``apt.ema.ema_update``); sampling runs it on every rank, gathering block by
    block. Logs the EMA elements each rank holds.
    The text encoder is frozen and replicated. D's root unit owns its readout heads.
    """
    from torch.distributed.fsdp import fully_shard

    dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
    # reshard_after_forward: None is FSDP2's default (a root keeps its parameters gathered for the
    # backward); the EMA has no backward, and its update needs the shards back after sampling.
    nets = ((module.generator, module.generator, None), (module.generator_ema, module.generator_ema, True),
            (module.discriminator, module.discriminator.backbone, None))
    for net, backbone, reshard_root in nets:
        for block in backbone.blocks:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(net, mesh=dp_mesh, reshard_after_forward=reshard_root)
    module.ema_sharded = True
    module.log_ema_size()


def _fsdp2_strategy_class():
    from lightning.pytorch.strategies import ModelParallelStrategy

    class _FSDP2Strategy(ModelParallelStrategy):
        """ModelParallelStrategy writing and reading apt's checkpoint layout (full safetensors per network).

        Saving gathers full state dicts on rank 0 (``save_distributed_checkpoint=False``) and hands them
        to ``SafetensorsCheckpointIO``; loading reads that directory on every rank and scatters the
        full tensors into the local shards (DCP ``set_model_state_dict`` / ``set_optimizer_state_dict``).
        """

        def load_checkpoint(self, checkpoint_path, weights_only=None):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp import OptimStateKeyType

            path = self.broadcast(checkpoint_path)
            checkpoint = self.checkpoint_io.load_checkpoint(path)
            options = StateDictOptions(full_state_dict=True, strict=False)
            model_state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(("text_encoder.", "teacher."))}
            set_model_state_dict(self.model, model_state, options=options)
            for optimizer, state in zip(self.optimizers, checkpoint.pop("optimizer_states", [])):
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model)
                set_optimizer_state_dict(self.model, getattr(optimizer, "_optimizer", optimizer), state, options=options)
            checkpoint["state_dict"] = {}  # weights are in place; Lightning must not load them again
            return checkpoint

    return _FSDP2Strategy


def FSDP2Strategy(**kwargs):  # noqa: N802 - a class factory (Lightning imported lazily)
    return _fsdp2_strategy_class()(**kwargs)


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()
