"""FVD of a directory of generated videos against real videos (StyleGAN-V protocol, offline).

    python eval/fvd.py --gen samples/ --real real_clips/ --detector weights/i3d_torchscript.pt \
        --num-videos 2048 --out reports/fvd

Writes <out>/report.json (every protocol fact with the number) and <out>/report.md.
The protocol is documented in apt/eval/fvd.py.
"""

from __future__ import annotations

import argparse
import json
import os

from apt.eval.fvd import FVDProtocol, compute_fvd, fvd_report_markdown


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    d = FVDProtocol()
    p.add_argument("--detector", required=True, help="local path of i3d_torchscript.pt (or its directory)")
    p.add_argument("--num-videos", type=int, default=d.num_videos, help="N clips per set")
    p.add_argument("--num-frames", type=int, default=d.num_frames)
    p.add_argument("--offset", type=int, default=d.offset, help="first frame of the clip")
    p.add_argument("--stride", default=str(d.stride), help="frame step in the clip, or 'span'")
    p.add_argument("--crop", choices=["center", "none"], default=d.crop)
    p.add_argument("--resolution", type=lambda s: None if s == "none" else int(s), default=d.resolution,
                   help="square side after the PIL Lanczos resize, or 'none'")
    p.add_argument("--fps", type=float, default=d.fps)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-workers", type=int, default=0, help="decoding threads")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/apt/fvd"),
                   help="real-set statistics cache ('none' to disable)")


def protocol_from_args(a: argparse.Namespace) -> FVDProtocol:
    stride = a.stride if a.stride == "span" else int(a.stride)
    return FVDProtocol(num_frames=a.num_frames, offset=a.offset, stride=stride, crop=a.crop,
                       resolution=a.resolution, fps=a.fps, num_videos=a.num_videos)


def run_fvd(a: argparse.Namespace, gen: str) -> dict:
    return compute_fvd(gen, a.real, detector_path=a.detector, protocol=protocol_from_args(a),
                       batch_size=a.batch_size, device=a.device, num_workers=a.num_workers,
                       cache_dir=None if a.cache_dir == "none" else a.cache_dir, progress=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gen", required=True, help="directory or .txt list of generated videos")
    p.add_argument("--real", required=True, help="directory or .txt list of real videos")
    p.add_argument("--out", required=True, help="report directory")
    add_protocol_args(p)
    a = p.parse_args(argv)
    result = run_fvd(a, a.gen)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = fvd_report_markdown(result, title=f"FVD: {a.gen} vs {a.real}")
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
