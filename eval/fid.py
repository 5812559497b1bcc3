"""FID of a directory of generated PNGs against real PNGs (Inception 2015-12-05 TorchScript, offline).

    python eval/fid.py --gen samples/ --real coco10k_1024/ --inception weights/inception-2015-12-05.pt \
        --out reports/fid

Optionally also the CLIP score of the generated images (`--clip-dir` + `--prompts`; prompt i
belongs to the i-th image in sorted order, cycling if there are fewer prompts than images).
Writes <out>/report.json and <out>/report.md. The protocol is documented in apt/eval/fid.py.
"""

from __future__ import annotations

import argparse
import json
import os

from apt.eval.fid import RESIZE_MODES, compute_fid, fid_report_markdown, list_images


def add_fid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inception", required=True, help="local path of inception-2015-12-05.pt (or its directory)")
    p.add_argument("--resize", choices=sorted(RESIZE_MODES), default="clean",
                   help="clean = PIL bicubic to 299 (default); torchscript = the model's own bilinear resize")
    p.add_argument("--num-images", type=int, default=None, help="N per set (default: all files)")
    p.add_argument("--expected-size", type=int, default=1024, help="warn when images are not this square size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/apt/fid"),
                   help="real-set statistics cache ('none' to disable)")
    p.add_argument("--clip-dir", default=None, help="local transformers CLIP directory (optional)")
    p.add_argument("--prompts", default=None, help=".txt/.json prompts for the CLIP score")


def run_fid(a: argparse.Namespace, gen: str) -> dict:
    result = compute_fid(gen, a.real, inception_path=a.inception, resize=a.resize, num_images=a.num_images,
                         batch_size=a.batch_size, device=a.device, expected_size=a.expected_size,
                         cache_dir=None if a.cache_dir == "none" else a.cache_dir)
    if a.clip_dir:
        from apt.eval.clip_score import clip_score_files, load_prompts

        if not a.prompts:
            raise ValueError("--clip-dir needs --prompts (prompt i belongs to image i in sorted order)")
        prompts = load_prompts(a.prompts)
        paths = list_images(gen)[: result["num_generated"]]
        result["clip"] = clip_score_files(paths, [prompts[i % len(prompts)] for i in range(len(paths))],
                                          model_dir=a.clip_dir, batch_size=a.batch_size, device=a.device)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gen", required=True, help="directory or .txt list of generated PNGs")
    p.add_argument("--real", required=True, help="directory or .txt list of real PNGs")
    p.add_argument("--out", required=True, help="report directory")
    add_fid_args(p)
    a = p.parse_args(argv)
    result = run_fid(a, a.gen)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = fid_report_markdown(result, title=f"FID: {a.gen} vs {a.real}")
    if "clip" in result:
        md += f"\nCLIP score: {result['clip']['clip_score']:.3f} (N {result['clip']['N']}, {result['clip']['model_dir']})\n"
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
