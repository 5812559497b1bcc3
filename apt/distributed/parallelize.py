"""The one place where parallelism is applied to the APT stage's networks, in a fixed order.

    model built -> weights loaded -> 1. FSDP2: blocks, then each network's root (G, its EMA, D separately)
                                  -> 2. DeepSpeed: one engine per trained network (G, D, a fake score)
                                  -> 3. Ulysses: attention wrapped, sequences split over SP groups

``parallelize_apt`` is called by both runners: the Trainer path (``AptModule.configure_model``: FSDP2
and/or Ulysses; plain DDP needs nothing here) and the DeepSpeed path (``deepspeed_runner``: engines
and/or Ulysses). Model files stay free of distributed code (torchtitan's ``parallelize_*`` order).
"""

from __future__ import annotations

import torch
from torch import nn

from apt.distributed.engines import BypassWhenFrozen, EngineUpdate
from apt.distributed.sequence_parallel import apply_sequence_parallel, sequence_parallel_mesh
from apt.distributed.sharded_checkpoint import module_engines
from apt.distributed.zero3_ema import PartitionedEma


def parallelize_apt(module, *, sequence_parallel: int = 1, fsdp_mesh=None, fabric=None, accumulate: int = 1,
                    device_type: str = "cpu") -> tuple[EngineUpdate, ...] | None:
    """Apply FSDP2 (``fsdp_mesh``), DeepSpeed engines (``fabric``) and Ulysses (``sequence_parallel`` > 1) to
    an ``AptModule``'s G, EMA and D (and a streaming run's fake score), in that order; returns the engines' updates,
    one per optimiser, when ``fabric`` is given."""
    generator, discriminator = module.generator, module.discriminator  # the bare networks, for Ulysses
    if fsdp_mesh is not None:  # 1.
        fully_shard_apt(module, fsdp_mesh)
    updates = deepspeed_engines(fabric, module, accumulate) if fabric is not None else None  # 2.
    if sequence_parallel > 1:  # 3.
        apply_sequence_parallel_apt(generator, discriminator, sequence_parallel_mesh(sequence_parallel, device_type))
    return updates


def fully_shard_apt(module, mesh) -> None:
    """FSDP2 for the APT module: each backbone block, then the rest of G, of its EMA and of D, as separate units.

    G and D are separate FSDP roots (they run and step separately). The EMA generator is sharded
    exactly like G (same mesh, same units), so each rank's EMA shards match its G shards and the EMA
    update is a local lerp (``apt.ema.ema_update``); sampling runs it on every rank, gathering block by
    block. Logs the EMA elements each rank holds.
    The text encoder is frozen and replicated. D's root unit owns its readout heads. The streaming stage's fake score
    (``stream.dmd_weight`` > 0) is a fourth root, sharded like D; its frozen teacher is replicated.
    """
    from torch.distributed.fsdp import fully_shard

    dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
    # reshard_after_forward: None is FSDP2's default (a root keeps its parameters gathered for the
    # backward); the EMA has no backward, and its update needs the shards back after sampling.
    nets = [(module.generator, module.generator, None), (module.discriminator, module.discriminator.backbone, None)]
    if module.generator_ema is not None:  # None for a LoRA generator: its EMA adapters are sharded with G (apt.lora)
        nets.insert(1, (module.generator_ema, module.generator_ema, True))
    if getattr(module, "fake_score", None) is not None:  # the streaming stage's DMD (its frozen teacher stays whole)
        nets.append((module.fake_score, module.fake_score, None))
    for net, backbone, reshard_root in nets:
        for block in backbone.blocks:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(net, mesh=dp_mesh, reshard_after_forward=reshard_root)
    module.ema_sharded = True
    module.log_ema_size()


def deepspeed_engines(fabric, module, accumulate: int) -> tuple[EngineUpdate, ...]:
    """Turn each trained network of an ``AptModule`` into a DeepSpeed engine (in place), in the order of its
    optimisers: G, D and, for the streaming stage's distribution matching, the fake score (its frozen teacher stays
    whole on every rank). Under ZeRO-3 the EMA is partitioned like G (ZeRO-1/2: whole, as G is)."""
    device = fabric.device
    trained = module_engines(module)
    for name, child in module.named_children():
        if name not in trained:
            child.to(device)  # the engines place the trained networks themselves (ZeRO-3: already partitioned)
    module._device = device  # LightningModule.device, read by the step to place noise
    optimizers = module.configure_optimizers()
    assert len(optimizers) == len(trained), (trained, len(optimizers))
    engines = [fabric.setup(getattr(module, name), opt)[0] for name, opt in zip(trained, optimizers)]
    for name, engine in zip(trained, engines):
        setattr(module, name, BypassWhenFrozen(engine, fabric.strategy.precision) if name == "discriminator" else engine)
    G = engines[0]
    if G._forward_module.zero_optimization_stage() == 3:
        module.ema_partitions = PartitionedEma(module.generator_ema, G)
        module.log_ema_size()
    return tuple(EngineUpdate(fabric, engine, accumulate) for engine in engines)


def apply_sequence_parallel_apt(generator: nn.Module, discriminator: nn.Module, mesh) -> None:
    """G and D sequence-parallel over the mesh's ulysses groups (D's readout heads read whole layers):
    the built-in DiT by patching its blocks (``apt.distributed.sequence_parallel``), a diffusers adapter
    through diffusers' context-parallel hooks (``apt.distributed.context_parallel``). The EMA generator
    is left whole: rank 0 samples from it alone."""
    from apt.distributed.context_parallel import apply_context_parallel
    from apt.models.adapters import DiffusersAdapter

    if torch.distributed.get_rank() == 0:
        print(f"Ulysses sequence parallelism: {mesh['ulysses'].size()} ranks per group split G's and D's tokens; "
              f"{mesh['data_parallel'].size()} data-parallel group(s)", flush=True)
    group = mesh["ulysses"].get_group()
    for backbone, readout_layers in ((generator, ()), (discriminator.backbone, discriminator.layers)):
        if isinstance(backbone, DiffusersAdapter):
            apply_context_parallel(backbone, mesh)
        else:
            apply_sequence_parallel(backbone, group, gather_after=readout_layers)
