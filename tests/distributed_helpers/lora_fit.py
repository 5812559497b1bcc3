"""A LoRA stage through the real Trainer path (``apt.train.build_trainer``: strategy, checkpoint IO, CSV logs) on a
fixed global batch, so one process and 2 ranks can be compared number for number.

    python tests/distributed_helpers/lora_fit.py --init DIR --out RUN --strategy auto
    torchrun --nproc_per_node 2 tests/distributed_helpers/lora_fit.py --init DIR --out RUN --strategy ddp|fsdp2 [--resume CKPT]

Rank r of W trains on its contiguous slice of the same global batch every step (the APT step draws each
sample's noise by its index in the global batch, so the math is the single process's). The run writes its
checkpoints (one per generator update) and metrics.csv under RUN, and RUN/result.pt with what the ranks
saw: the EMA elements each rank holds and samples of the EMA generator (every rank sampling when sharded).
``--stage distill`` runs the LoRA distillation instead (its noise comes from each rank's own stream: not
comparable with one process, a run-through).
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
from apt.distributed.process_group import close_process_group, import_before_init  # noqa: E402
from apt.train import STAGES, build_trainer  # noqa: E402
from tests.distributed_helpers.apt_steps import global_batch  # noqa: E402


class Repeat:
    """The same batch, ``n`` times (a plain iterable: Lightning adds no sampler)."""

    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __iter__(self):
        return iter([self.batch] * self.n)

    def __len__(self) -> int:
        return self.n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--init", required=True, help="run or checkpoint dir: the teacher (distill) / the G init and D backbone (apt)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--stage", default="apt")
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--resume", default=None)
    p.add_argument("--extra", nargs="*", default=[])
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = args.global_batch // world
    recipe = {"apt": "recipes/demo/apt_video.yaml", "distill": "recipes/demo/distill.yaml"}[args.stage]
    overrides = [f"run_dir={args.out}", "train.accelerator=cpu", f"train.strategy={args.strategy}", f"train.devices={world}",
                 f"data.batch_size={local}", "lora.rank=4", "lora.alpha=8", "train.ckpt_every_steps=1", "train.keep_checkpoints=5",
                 "train.max_steps=2", "data.image_shards=\"\"", *([f"resume={args.resume}"] if args.resume else []), *args.extra]
    if args.stage == "apt":
        overrides += [f"apt.generator={args.init}", f"apt.teacher={args.init}", "apt.d_warmup_steps=1"]
    else:
        overrides += [f"distill.teacher={args.init}", "optim.schedule=constant"]
    c = load_config(recipe, ["tiny"], overrides)
    torch.manual_seed(0)
    import_before_init()
    module = STAGES[c.stage](c)
    trainer = build_trainer(c, module)
    batch = global_batch(args.global_batch, c.data.frames)
    mine = {"x": batch["x"][rank * local:(rank + 1) * local], "caption": batch["caption"][rank * local:(rank + 1) * local]}
    trainer.fit(module, train_dataloaders=Repeat(mine, 64), ckpt_path=args.resume)
    counts = [module.ema_numel()] if args.stage == "apt" else []
    if args.stage == "apt" and world > 1:
        counts = [None] * world
        torch.distributed.all_gather_object(counts, module.ema_numel())
    samples = None
    if rank == 0 or module.samples_on_every_rank:
        samples = module.generate(["a red circle moving left on a black background", "a blue square"], [0, 1], steps=1)
    if rank == 0:
        torch.save({"ema_numel": counts, "samples": samples}, Path(args.out) / "result.pt")
    print("done", flush=True)


if __name__ == "__main__":
    main()
    close_process_group()  # gloo left to interpreter exit can abort a rank that finished
