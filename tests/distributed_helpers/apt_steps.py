"""A few APT iterations on a fixed global batch; writes per-iteration metrics and the EMA weights.

    python tests/distributed_helpers/apt_steps.py --init DIR --out FILE.pt --mode single
    torchrun --nproc_per_node 2 tests/distributed_helpers/apt_steps.py --init DIR --out FILE.pt --mode deepspeed_stage_2

``single`` runs the shared ``apt.methods.apt.apt_step`` (through ``AptModule.run_step``) with plain torch optimisers in one process (the
single-device math); ``deepspeed_stage_*`` runs it through the DeepSpeed runner's engines on every
rank; ``fsdp2`` shards G, its EMA and D with ``fully_shard_apt`` (plain torch optimisers, as the
Trainer's FSDP2 path). The global batch is the same in every mode: rank r takes its contiguous slice,
split into ``--accumulate`` micro-batches, so the losses can be compared number for number.

The output holds the metrics, the whole EMA after every iteration (gathered when sharded), the EMA
elements each rank holds, and samples of the final EMA (every rank sampling when it is sharded).
``--roundtrip DIR`` (DeepSpeed modes): after the last-but-one iteration, save a sharded checkpoint to
DIR, zero the EMA, load the checkpoint back and go on. ``--stage stream_apt``: the streaming stage (a causal G
rolled out chunk by chunk, student forcing; a per-chunk D on windows), on clips of the long-clip world; with
``--dmd W`` plus distribution matching of weight W (its fake score a third network with its own optimiser).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from apt.config import load_config  # noqa: E402
from apt.data.shards import pixels_to_tensor  # noqa: E402
from apt.distributed.process_group import close_process_group, import_before_init  # noqa: E402
from apt.lit.apt import AptModule  # noqa: E402
from apt.lit.stream import StreamAptModule  # noqa: E402
from apt.methods.update import OptimizerUpdate  # noqa: E402
from apt.toy.long_world import make_long_sample  # noqa: E402
from apt.toy.world import make_sample  # noqa: E402


def global_batch(n: int, frames: int, long_clips: bool = False) -> dict:
    samples = [(make_long_sample if long_clips else make_sample)(i, seed=0, frames=frames) for i in range(n)]
    return {"x": pixels_to_tensor(torch.stack([torch.from_numpy(s["pixels"]) for s in samples]).numpy()), "caption": [s["caption"] for s in samples]}


def optimizer_updates(module) -> tuple[OptimizerUpdate, OptimizerUpdate]:
    """G's and D's updates with plain torch optimisers; with DMD the fake score's third one goes to its term."""
    optimizers = module.configure_optimizers()
    if len(optimizers) == 3:
        module.extra = module.distribution_matching(OptimizerUpdate(optimizers[2], module.fake_score))
    return OptimizerUpdate(optimizers[0], module.generator), OptimizerUpdate(optimizers[1], module.discriminator)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--init", required=True, help="directory with net_ema.safetensors (G init and D backbone)")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="single")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--extra", nargs="*", default=[], help="more key=value overrides")
    p.add_argument("--stage", default="apt", choices=["apt", "stream_apt"])
    p.add_argument("--roundtrip", default=None, help="sharded checkpoint dir written and read back before the last iteration")
    p.add_argument("--dmd", type=float, default=0.0, help="stream_apt: stream.dmd_weight (0: the adversarial stage alone)")
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_batch = args.global_batch // world
    overrides = [f"apt.generator={args.init}", f"apt.teacher={args.init}", "apt.d_warmup_steps=1", "train.accelerator=cpu",
                 f"train.strategy={'auto' if args.mode == 'single' else args.mode}", f"train.devices={world}",
                 f"data.batch_size={local_batch // args.accumulate}", f"train.accumulate_grad_batches={args.accumulate}", f"train.precision={args.precision}",
                 f"run_dir={Path(args.out).parent / ('run-' + args.mode)}", *args.extra]
    recipe = "recipes/demo/stream_apt.yaml" if args.stage == "stream_apt" else "recipes/demo/apt_video.yaml"
    if args.stage == "stream_apt":
        overrides.append(f"stream.dmd_weight={args.dmd}")
    c = load_config(recipe, ["tiny"], overrides)
    Module = StreamAptModule if args.stage == "stream_apt" else AptModule
    torch.manual_seed(0)
    if args.mode == "single":
        rank = 0
        module = Module(c)
        update_g, update_d = optimizer_updates(module)
        all_reduce = lambda t: t  # noqa: E731
    elif args.mode == "fsdp2":
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from apt.distributed.parallelize import fully_shard_apt

        import_before_init()
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        module = Module(c)
        fully_shard_apt(module, init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",)))
        update_g, update_d = optimizer_updates(module)
        all_reduce = lambda t: (dist.all_reduce(t), t / world)[1]  # noqa: E731
    else:
        from apt.distributed.deepspeed_runner import build_fabric, setup_apt

        import_before_init(deepspeed=True)
        fabric = build_fabric(c)
        fabric.launch()
        rank, world = fabric.global_rank, fabric.world_size
        module = Module(c)
        update_g, update_d = setup_apt(fabric, module, args.accumulate)
        all_reduce = lambda t: fabric.all_reduce(t, reduce_op="mean")  # noqa: E731
    batch = global_batch(args.global_batch, c.data.frames, long_clips=args.stage == "stream_apt")
    mine = slice(rank * local_batch, (rank + 1) * local_batch)
    x, captions = batch["x"][mine], batch["caption"][mine]
    mb = local_batch // args.accumulate
    micro = [{"x": x[i * mb:(i + 1) * mb], "caption": captions[i * mb:(i + 1) * mb]} for i in range(args.accumulate)]
    if args.accumulate > 1 and world > 1:
        raise SystemExit("the global-index layout of micro-batches x ranks is (micro, rank); test one of them at a time")
    history, emas = [], []
    for it in range(args.iterations):
        if args.roundtrip and it == args.iterations - 1:
            from apt.distributed import sharded_checkpoint

            sharded_checkpoint.save(fabric, args.roundtrip, module)
            for part in (module.ema_partitions.parts if module.ema_partitions else module.generator_ema.parameters()):
                part.data.zero_()  # what the load must restore
            sharded_checkpoint.load(fabric, args.roundtrip, module)
        metrics = module.run_step(micro, update_g=update_g, update_d=update_d, rank=rank, world_size=world)
        keys = sorted(k for k in metrics if not k.startswith("grad_norm"))
        values = all_reduce(torch.stack([metrics[k].detach().float().reshape(()) for k in keys]))
        history.append({k: float(v) for k, v in zip(keys, values)} | {k: float(metrics[k]) for k in metrics if k.startswith("grad_norm")})
        with module.gathered_sampling_network() as net:  # collective when sharded
            emas.append({k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().float().clone() for k, v in net.state_dict().items()})
    counts = [module.ema_numel()]
    if world > 1:
        counts = [None] * world
        torch.distributed.all_gather_object(counts, module.ema_numel())
    samples = module.generate(["a red circle moving left on a black background", "a blue square"], [0, 1], steps=1)
    if rank == 0:
        out = {"history": history, "ema": emas[-1], "emas": emas, "g_updates": module.g_updates, "ema_numel": counts, "samples": samples}
        torch.save(out, args.out)
        print("done", history[-1])


if __name__ == "__main__":
    main()
    close_process_group()  # gloo left to interpreter exit can abort a rank that finished
