"""How steady the demo report's batch-1 timing is on this machine, and what inference mode buys.

    python experiments/batch1_timing.py assets/demo_teacher runs/demo/distill runs/demo/apt_video/checkpoints/step-000200

1. The first one-step checkpoint's network, one forward at batch 1 and at batch 2 (two prompts: the size of
   the teacher's CFG batch), under ``torch.no_grad`` and under ``torch.inference_mode`` (what
   ``apt.inference.Generator`` uses), interleaved: ``--rounds`` rounds of 30 calls each, the median call of
   each round, the median over rounds.
2. ``--repeats`` measurements of the report's batch-1 timing (``apt.toy.report.batch1_call_times``,
   the report's settings) of the teacher (25 steps + CFG) and each one-step checkpoint, with two estimators
   of a row's latency: the median call (the report's) and the median of each turn's mean call (the
   report's before 2026-11-22). Give two one-step checkpoints of the same network: they should time alike,
   so the spread of their figures is the estimator's noise on this machine.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from apt.inference import load_generator
from apt.toy.report import EVAL_SEED, batch1_call_times, one_torch_thread
from apt.toy.world import eval_prompts


def forward_modes(checkpoint: str, *, rounds: int) -> dict:
    gen = load_generator(checkpoint)
    c = gen.config
    text = gen.text_encoder.encode(eval_prompts(2, seed=EVAL_SEED, frames=c.data.frames))
    out = {}
    with one_torch_thread():
        for B in (1, 2):
            z = torch.randn(B, c.data.channels, c.data.frames, c.data.height, c.data.width)
            t, tb = torch.ones(B), type(text)(text.emb_BLD[:B], text.mask_BL[:B])
            medians: dict[str, list[float]] = {"no_grad": [], "inference_mode": []}
            for _ in range(rounds):
                for mode, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
                    calls = []
                    with ctx():
                        for _ in range(30):
                            t0 = time.perf_counter()
                            gen.net(z, t, tb)
                            calls.append(time.perf_counter() - t0)
                    medians[mode].append(float(np.median(calls)))
            out[f"batch{B}_ms"] = {mode: round(float(np.median(m)) * 1e3, 3) for mode, m in medians.items()}
    return out


def speedups(teacher: str, one_step: list[str], *, repeats: int) -> list[dict]:
    t_gen = load_generator(teacher)
    rows = [(t_gen, t_gen.config.flow.sample_steps, t_gen.config.flow.cfg_scale)] + [(load_generator(p), 1, 1.0) for p in one_step]
    prompts = eval_prompts(64, seed=EVAL_SEED, frames=t_gen.num_frames)
    results = []
    for _ in range(repeats):
        times = batch1_call_times(rows, prompts)
        median_call = [float(np.median([s for turn in row for s in turn])) for row in times]
        median_turn_mean = [float(np.median([np.mean(turn) for turn in row])) for row in times]
        results.append({
            "teacher_ms": {"median_call": round(median_call[0] * 1e3, 2), "median_turn_mean": round(median_turn_mean[0] * 1e3, 2)},
            "speedups": {p: {"median_call": round(median_call[0] / median_call[i], 2), "median_turn_mean": round(median_turn_mean[0] / median_turn_mean[i], 2)}
                         for i, p in enumerate(one_step, start=1)},
        })
        print(json.dumps(results[-1]), flush=True)
    return results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher")
    ap.add_argument("one_step", nargs="+", help="one or two one-step checkpoints (distilled / APT)")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args(argv)
    modes = forward_modes(args.one_step[0], rounds=args.rounds)
    print(json.dumps({"forward": modes}), flush=True)
    return {"forward": modes, "measurements": speedups(args.teacher, args.one_step, repeats=args.repeats)}


if __name__ == "__main__":
    main()
