"""Memory and time of one APT step under each strategy, as ratios to one process, in one run.

    python eval/benchmark_strategies.py [--flavours tiny demo] [--strategies single ddp zero2 zero3 fsdp2]
                                        [--nproc 2] [--global-batch 8] [--steps 4] [--out runs/bench_strategies]
                                        [--accelerator cpu|gpu] [--precision 32-true|bf16-mixed|bf16-true]

Each (flavour, strategy) is a real ``python -m apt fit`` of the APT stage (G = a random DiT of that
flavour, D from the same weights, toy shards), launched in a fresh process group: ``single`` is one
process with the whole global batch; the others are ``--nproc`` ranks (torchrun, gloo on CPU, NCCL on
GPU) with global batch / nproc each. One step = one D update + one G update + EMA (no warm-up).

Reported per configuration: seconds per step (median of the steps after the first, from the logged
``sec_per_step``; data loading excluded) and peak RSS per rank (``ru_maxrss`` at exit, the largest
rank; it includes ~0.5 GB of imported libraries, the same in every configuration). Ratios are to
``single`` of the same flavour. Threads per process: 1 (OMP_NUM_THREADS), so on CPU a ratio below 1
means the work split over ranks ran in parallel; on GPU pass --nproc <GPUs>.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = {"single": "auto", "ddp": "ddp", "zero2": "deepspeed_stage_2", "zero3": "deepspeed_stage_3", "fsdp2": "fsdp2"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(out_prefix: str, fit_args: list[str]) -> int:
    """Run ``apt fit`` in this rank and record its peak RSS (MB) to OUT_PREFIX.rank<R>.json."""
    sys.path.insert(0, str(REPO))
    from apt.cli import main

    rc = main(fit_args)
    rank = int(os.environ.get("RANK", "0"))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    Path(f"{out_prefix}.rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_mb": rss_mb}))
    return rc


def make_init(flavour: str, out: Path) -> Path:
    sys.path.insert(0, str(REPO))
    import torch

    from apt.checkpoint import save_weights
    from apt.models import build_dit
    from apt.text import TextEncoder

    if not (out / "net_ema.safetensors").exists():
        torch.manual_seed(0)
        net = build_dit(flavour, text_dim=TextEncoder.load("toy-t5").dim)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.02 * torch.randn_like(p))
        out.mkdir(parents=True, exist_ok=True)
        save_weights(net.state_dict(), out / "net_ema.safetensors")
    return out


def run_one(flavour: str, name: str, *, nproc: int, global_batch: int, steps: int, shards: str, init: Path, out: Path, accelerator: str,
            precision: str, timeout: float) -> dict:
    ranks = 1 if name == "single" else nproc
    run_dir = out / f"{flavour}-{name}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    fit = ["fit", "recipes/demo/apt_video.yaml", f"model.flavour={flavour}", f"run_dir={run_dir}", f"data.shards={shards}",
           f"apt.generator={init}", f"apt.teacher={init}", "apt.d_warmup_steps=0", f"train.max_steps={steps}",
           f"train.strategy={STRATEGIES[name]}", f"train.devices={ranks}", f"train.accelerator={accelerator}", f"train.precision={precision}",
           f"data.batch_size={global_batch // ranks}", "train.log_every_steps=1", "train.sample_every_steps=0",
           f"train.ckpt_every_steps={steps}", "train.progress_bar=false", "train.num_sample_prompts=2"]
    prefix = out / f"{flavour}-{name}"
    me = [str(Path(__file__).resolve()), "--worker", str(prefix), "--", *fit]
    cmd = [sys.executable, *me] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                                                    "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *me]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "runs" / "torch_extensions"))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return {"flavour": flavour, "strategy": name, "ranks": ranks, "error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"flavour": flavour, "strategy": name, "ranks": ranks, "error": log[-3000:]}
    times = []
    for f in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        times += [float(r["sec_per_step"]) for r in csv.DictReader(open(f)) if r.get("sec_per_step")]
    rss = [json.loads(p.read_text())["peak_rss_mb"] for p in sorted(out.glob(f"{flavour}-{name}.rank*.json"))]
    return {"flavour": flavour, "strategy": name, "ranks": ranks, "sec_per_step": statistics.median(times[1:] or times),
            "peak_rss_mb_per_rank": max(rss), "steps_timed": len(times[1:] or times)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return worker(argv[1], argv[3:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavours", nargs="+", default=["tiny", "demo"])
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default="32-true", help="train.precision: 32-true | bf16-mixed | bf16-true")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", default="runs/bench_strategies")
    args = p.parse_args(argv)
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.rank*.json"):
        f.unlink()
    sys.path.insert(0, str(REPO))
    from apt.toy.shards import write_toy_shards

    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        write_toy_shards(str(shards), num_samples=128, frames=4, seed=0, samples_per_shard=64, progress=False)
    results = []
    for flavour in args.flavours:
        init = make_init(flavour, out / f"init-{flavour}")
        for name in args.strategies:
            r = run_one(flavour, name, nproc=args.nproc, global_batch=args.global_batch, steps=args.steps, shards=str(shards),
                        init=init, out=out, accelerator=args.accelerator, precision=args.precision, timeout=args.timeout)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "error"} | ({"error": r["error"][-300:]} if "error" in r else {})), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| flavour | strategy | ranks | s/step | x single | peak RSS/rank (MB) | x single |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        base = next((b for b in results if b["flavour"] == r["flavour"] and b["strategy"] == "single" and "error" not in b), None)
        if "error" in r:
            print(f"| {r['flavour']} | {r['strategy']} | {r['ranks']} | failed | | | |")
            continue
        t = f"{r['sec_per_step'] / base['sec_per_step']:.2f}" if base else "-"
        m = f"{r['peak_rss_mb_per_rank'] / base['peak_rss_mb_per_rank']:.2f}" if base else "-"
        print(f"| {r['flavour']} | {r['strategy']} | {r['ranks']} | {r['sec_per_step']:.3f} | {t} | {r['peak_rss_mb_per_rank']:.0f} | {m} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
