"""Show that FVD streams: peak memory of an FVD run does not grow with the number of clips N.

    python eval/measure_fvd_memory.py --sizes 64 256

Makes N generated + N real mp4 clips (49 frames, 128x72, 24 fps), a TorchScript stand-in for
I3D with the real file's call signature (`apt.eval.standins.StandInI3D`: forward(x, rescale,
resize, return_features) -> (B, 400), resizing to 224x224 inside like the real one), then for
each N runs `apt.eval.fvd.compute_fvd` in a fresh subprocess (ru_maxrss is a per-process
high-water mark) and prints wall time, peak RSS, RSS growth over the post-import baseline, and
the tracemalloc peak (Python + numpy allocations). The numbers are the pipeline's, not the real I3D's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def make_clips(d: str, n: int, seed: int, frames: int, height: int, width: int) -> None:
    import numpy as np

    from apt.eval.video_io import write_video

    os.makedirs(d, exist_ok=True)
    y, x = np.mgrid[0:height, 0:width]
    for i in range(n):
        path = os.path.join(d, f"{i:05d}.mp4")
        if os.path.exists(path):
            continue
        rng = np.random.default_rng(seed * 100_000 + i)
        ph, fr, sp = rng.uniform(0, 6, 3), rng.uniform(4, 12), rng.uniform(0.5, 3)
        clip = np.stack([
            np.stack([np.sin((x + sp * t) / fr + ph[c]) * 0.4 + 0.5 for c in range(3)], -1) for t in range(frames)
        ])
        write_video(path, (clip * 255).astype(np.uint8), fps=24)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(a: argparse.Namespace) -> None:
    import tracemalloc

    import torch

    from apt.eval.fvd import FVDProtocol, compute_fvd, load_i3d

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    load_i3d(a.detector)  # warm up imports / TorchScript runtime before the baseline
    base_rss = rss_mb()
    tracemalloc.start()
    t0 = time.time()
    res = compute_fvd(os.path.join(a.workdir, "gen"), os.path.join(a.workdir, "real"), detector_path=a.detector,
                      protocol=FVDProtocol(num_videos=a.child), batch_size=a.batch_size, cache_dir=None)
    wall = time.time() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"N": a.child, "num_generated": res["num_generated"], "num_real": res["num_real"],
                      "fvd": res["fvd"], "wall_s": wall, "peak_rss_mb": peak_rss, "baseline_rss_mb": base_rss,
                      "growth_mb": peak_rss - base_rss, "tracemalloc_peak_mb": py_peak / 2**20}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--height", type=int, default=72)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workdir", default=None, help="where clips go (default: a temporary directory)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--detector", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        child(a)
        return

    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory()
        a.workdir = tmp.name
    n_max = max(a.sizes)
    t0 = time.time()
    make_clips(os.path.join(a.workdir, "gen"), n_max, 1, a.frames, a.height, a.width)
    make_clips(os.path.join(a.workdir, "real"), n_max, 2, a.frames, a.height, a.width)
    detector = os.path.join(a.workdir, "i3d_torchscript.pt")
    from apt.eval.standins import save_standin_i3d

    save_standin_i3d(detector, resize_to=224, patch=7)
    print(f"made 2 x {n_max} clips ({a.frames} frames, {a.width}x{a.height}) in {time.time() - t0:.1f} s")
    rows = []
    for n in a.sizes:
        cmd = [sys.executable, __file__, "--child", str(n), "--detector", detector, "--workdir", a.workdir,
               "--batch-size", str(a.batch_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nFVD pipeline, stand-in I3D, batch {a.batch_size}, protocol defaults (16 frames from 0, "
          "centre crop, Lanczos 256, I3D resize 224)")
    print("| N (gen = real) | wall s | peak RSS MB | RSS growth over baseline MB | tracemalloc peak MB | FVD |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['N']} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['growth_mb']:.0f} | "
              f"{r['tracemalloc_peak_mb']:.1f} | {r['fvd']:.3f} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
