"""Distributed training (docs/distributed.md).

strategies          ``train.strategy`` -> Lightning strategy (auto, ddp, fsdp2) or the DeepSpeed runner
deepspeed_runner    APT under ZeRO 1/2/3: G and D as two DeepSpeed engines driven by Lightning Fabric
sharded_checkpoint  per-engine sharded checkpoints, atomic across ranks
consolidate         sharded checkpoint -> standard safetensors layout (``python -m apt consolidate``)
sequence_parallel   Ulysses sequence parallelism for the built-in DiT; SP groups and the data rank (train.sequence_parallel)
context_parallel    the same for diffusers adapters (Wan), through diffusers' context-parallel hooks
process_group       the launched group's lifetime: imports before it exists, an orderly close before exit
"""
