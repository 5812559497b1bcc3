"""A few APT iterations on a fixed global batch; writes per-iteration metrics and the EMA weights.

    python tests/distributed_helpers/apt_steps.py --init DIR --out FILE.pt --mode single
    torchrun --nproc_per_node 2 tests/distributed_helpers/apt_steps.py --init DIR --out FILE.pt --mode deepspeed_stage_2

``single`` runs the shared ``AptModule.apt_step`` with plain torch optimisers in one process (the
single-device math); the other modes run it through the DeepSpeed runner's engines on every rank.
The global batch is the same in every mode: rank r takes its contiguous slice, split into
``--accumulate`` micro-batches, so the losses can be compared number for number.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from apt.config import load_config  # noqa: E402
from apt.data.shards import pixels_to_tensor  # noqa: E402
from apt.data.toy import make_sample  # noqa: E402
from apt.lit.apt import AptModule, _grad_norm  # noqa: E402


class PlainUpdate:
    """Single-device NetUpdate: loss.backward() and a torch optimiser step."""

    def __init__(self, optimizer, net):
        self.optimizer, self.net = optimizer, net

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss):
        loss.backward()

    def step(self):
        norm = _grad_norm(self.net.parameters())
        self.optimizer.step()
        return norm


def global_batch(n: int, frames: int) -> dict:
    samples = [make_sample(i, seed=0, frames=frames) for i in range(n)]
    return {"x": pixels_to_tensor(torch.stack([torch.from_numpy(s["pixels"]) for s in samples]).numpy()), "caption": [s["caption"] for s in samples]}


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
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_batch = args.global_batch // world
    overrides = [f"apt.generator={args.init}", f"apt.teacher={args.init}", "apt.d_warmup_steps=1", "train.accelerator=cpu",
                 f"train.strategy={'auto' if args.mode == 'single' else args.mode}", f"train.devices={world}",
                 f"data.batch_size={local_batch // args.accumulate}", f"train.precision={args.precision}",
                 f"run_dir={Path(args.out).parent / ('run-' + args.mode)}", *args.extra]
    c = load_config("recipes/demo/apt_video.yaml", ["tiny"], overrides)
    torch.manual_seed(0)
    if args.mode == "single":
        rank = 0
        module = AptModule(c)
        opt_g, opt_d = module.configure_optimizers()
        update_g, update_d = PlainUpdate(opt_g, module.generator), PlainUpdate(opt_d, module.discriminator)
        all_reduce = lambda t: t  # noqa: E731
    else:
        from apt.distributed.deepspeed_runner import build_fabric, setup_apt

        if args.accumulate > 1:
            import apt.distributed.deepspeed_runner as runner

            runner.accumulate_batches = lambda _c: args.accumulate
        fabric = build_fabric(c)
        fabric.launch()
        rank, world = fabric.global_rank, fabric.world_size
        module = AptModule(c)
        update_g, update_d = setup_apt(fabric, module, args.accumulate)
        all_reduce = lambda t: fabric.all_reduce(t, reduce_op="mean")  # noqa: E731
    batch = global_batch(args.global_batch, c.data.frames)
    mine = slice(rank * local_batch, (rank + 1) * local_batch)
    x, captions = batch["x"][mine], batch["caption"][mine]
    mb = local_batch // args.accumulate
    micro = [{"x": x[i * mb:(i + 1) * mb], "caption": captions[i * mb:(i + 1) * mb]} for i in range(args.accumulate)]
    if args.accumulate > 1 and world > 1:
        raise SystemExit("the global-index layout of micro-batches x ranks is (micro, rank); test one of them at a time")
    history = []
    for _ in range(args.iterations):
        metrics = module.apt_step(micro, update_g=update_g, update_d=update_d, rank=rank, world_size=world)
        keys = sorted(k for k in metrics if not k.startswith("grad_norm"))
        values = all_reduce(torch.stack([metrics[k].detach().float().reshape(()) for k in keys]))
        history.append({k: float(v) for k, v in zip(keys, values)} | {k: float(metrics[k]) for k in metrics if k.startswith("grad_norm")})
    if rank == 0:
        ema = {k: v.detach().float().clone() for k, v in module.generator_ema.state_dict().items()}
        torch.save({"history": history, "ema": ema, "g_updates": module.g_updates}, args.out)
        print("done", history[-1])


if __name__ == "__main__":
    main()
