"""Map ``train.strategy`` to what runs it (docs/distributed.md has the measurements behind each choice).

    auto | single            Lightning's default: one device
    ddp                      Trainer + DDPStrategy(find_unused_parameters=True): each backward of an
                             APT step reaches one network only (D step, then G step)
    fsdp2                    Trainer + ModelParallelStrategy; ``AptModule.configure_model`` calls
                             ``fully_shard_apt``: G and D are sharded separately, block by block
    deepspeed_stage_{1,2,3}  APT: the Fabric runner (``apt.distributed.deepspeed_runner``) with one
                             DeepSpeed engine per network; Lightning's Trainer strategy takes one
                             optimiser and one engine, and refuses CPU (docs/distributed.md)

The order in which parallelism is applied is fixed in ``apt.distributed.parallelize``.
"""

from __future__ import annotations

import os

import torch

from apt.config import ADVERSARIAL_STAGES, DEEPSPEED_STAGES, Config, ConfigError, check_strategy


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
        if config.stage in ADVERSARIAL_STAGES:
            raise ConfigError(f"train.strategy={s}: the APT stage runs through apt.distributed.deepspeed_runner (apt.train.fit dispatches to it)")
        return s  # teacher / distill: one network, one optimiser; Lightning's own DeepSpeed strategy (CUDA only)
    check_strategy(config)
    raise AssertionError(s)


# -- DeepSpeed -------------------------------------------------------------------------------------
def deepspeed_config(config: Config, *, accumulate: int = 1) -> dict:
    """DeepSpeed config of one APT engine, generated from the recipe (same for G and D).

    ZeRO stage from ``train.strategy``; bf16 from ``train.precision`` (set by Fabric's precision
    plugin); ``optim.grad_clip`` (0: the paper clips nothing); ``accumulate`` micro-batches per update, each engine
    stepping only after its own accumulation (``apt.methods.apt.apt_step`` runs all D micro-batches, then
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
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # RMSProp / Adam(0, 0.9) as the paper uses
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }


# -- FSDP2 -----------------------------------------------------------------------------------------
def _fsdp2_strategy_class():
    from lightning.pytorch.strategies import ModelParallelStrategy

    class _FSDP2Strategy(ModelParallelStrategy):
        """ModelParallelStrategy writing and reading apt's checkpoint layout (full safetensors per network).

        Saving gathers full state dicts on rank 0 (``save_distributed_checkpoint=False``) and hands them
        to ``SafetensorsCheckpointIO``; loading reads that directory on every rank and scatters the
        full tensors into the local shards (DCP ``set_model_state_dict`` / ``set_optimizer_state_dict``).
        """

        def load_checkpoint(self, checkpoint_path, weights_only=None):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )
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
