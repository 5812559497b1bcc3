"""Where the time of a streaming-APT iteration goes: the parts of ``apt_step`` timed during a short fit.

    python experiments/step_profile.py recipes/demo/stream_apt.yaml data.shards=runs/data/toy-freecol-16f \
        apt.generator=assets/demo_stream_colour_distilled apt.teacher=assets/demo_stream_colour_teacher \
        apt.d_warmup_steps=2 train.max_steps=8 run_dir=/tmp/step-profile
    python experiments/step_profile.py ... --ops 6     # also torch.profiler's op table of iteration 6

Runs ``python -m apt fit RECIPE OVERRIDES...`` in this process with timers around the parts of an iteration: the whole
``apt_step``, G's rollouts (student forcing), D's forwards, the teacher-forced streams of distribution matching (real
and fake scores, fake-score training; or their whole-clip windows with a bidirectional ``stream.dmd_teacher``), every backward and every optimiser step. Parts nest (``apt_step`` holds the
others), so they do not add up. Prints seconds and calls per part. To compare two versions of the code, run it twice
back to back, alone on the machine, the other one with ``PYTHONPATH=<its checkout>``.
"""

from __future__ import annotations

import argparse
import collections
import time

import apt.methods.apt as apt_method
import apt.methods.dmd as dmd
import apt.methods.streaming as streaming
import apt.methods.update as update

PARTS = [  # (owner, attribute, label)
    (apt_method, "apt_step", "apt_step (one iteration)"),
    (streaming.StudentForcing, "__call__", "rollout"),
    (streaming.TeacherForcing, "__call__", "teacher-forced fakes (stream.forcing=teacher)"),
    (streaming.ChunkDiscriminator, "forward", "D forward"),
    (dmd, "teacher_forced_stream", "teacher-forced streams (DMD)"),
    (dmd.WholeClipWindows, "__call__", "whole-clip windows (DMD, stream.dmd_teacher)"),
    (update.OptimizerUpdate, "backward", "backward"),
    (update.OptimizerUpdate, "step", "optimiser step"),
]


def timed(fn, label: str, seconds: dict, calls: collections.Counter, profile_call: int):
    def wrapper(*args, **kwargs):
        calls[label] += 1
        start = time.perf_counter()
        try:
            if label.startswith("apt_step") and calls[label] == profile_call:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    out = fn(*args, **kwargs)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
                return out
            return fn(*args, **kwargs)
        finally:
            seconds[label] += time.perf_counter() - start

    return wrapper


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value, as python -m apt fit takes them")
    p.add_argument("--ops", type=int, default=0, help="print torch.profiler's op table of this iteration (0: none)")
    args = p.parse_args(argv)

    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in PARTS]
    for owner, name, label in PARTS:
        setattr(owner, name, timed(getattr(owner, name), label, seconds, calls, args.ops))
    import apt.lit.apt as lit_apt  # imported its own name for apt_step

    lit_original = lit_apt.apt_step
    lit_apt.apt_step = apt_method.apt_step
    try:
        from apt.cli import main as cli

        rc = cli(["fit", args.recipe, *args.overrides])
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
        lit_apt.apt_step = lit_original
    if rc:
        raise SystemExit(rc)
    rows = {label: {"seconds": round(seconds[label], 3), "calls": calls[label]} for _, _, label in PARTS}
    for label, row in rows.items():
        print(f"{label:32s} {row['seconds']:9.2f} s  {row['calls']:5d} calls")
    return rows


if __name__ == "__main__":
    main()
