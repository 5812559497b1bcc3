"""FID of a directory of generated PNGs against real PNGs (Inception 2015-12-05 TorchScript, offline).

    python eval/fid.py --gen samples/ --real coco10k_1024/ --inception weights/inception-2015-12-05.pt \
        --out reports/fid

Optionally also the CLIP score of the generated images (`--clip-dir` + `--prompts`; prompt i
belongs to the i-th image in sorted order, cycling if there are fewer prompts than images).
Writes <out>/report.json and <out>/report.md. The protocol is documented in apt/eval/fid.py.
"""

from __future__ import annotations

import argparse

from apt.eval.benchmark_report import metric_cli
from apt.eval.fid import add_fid_args, fid_from_args, fid_report_markdown


def report_markdown(result: dict, a: argparse.Namespace) -> str:
    md = fid_report_markdown(result, title=f"FID: {a.gen} vs {a.real}")
    if "clip" in result:
        md += f"\nCLIP score: {result['clip']['clip_score']:.3f} (N {result['clip']['N']}, {result['clip']['model_dir']})\n"
    return md


def main(argv: list[str] | None = None) -> dict:
    return metric_cli(argv, description=__doc__, files="PNGs", add_args=add_fid_args, run=fid_from_args,
                      markdown=report_markdown)


if __name__ == "__main__":
    main()
