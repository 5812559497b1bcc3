"""FVD of a directory of generated videos against real videos (StyleGAN-V protocol, offline).

    python eval/fvd.py --gen samples/ --real real_clips/ --detector weights/i3d_torchscript.pt \
        --num-videos 2048 --out reports/fvd

Writes <out>/report.json (every protocol fact with the number) and <out>/report.md.
The protocol is documented in apt/eval/fvd.py.
"""

from __future__ import annotations

from apt.eval.benchmark_report import metric_cli
from apt.eval.fvd import add_protocol_args, fvd_from_args, fvd_report_markdown


def main(argv: list[str] | None = None) -> dict:
    return metric_cli(argv, description=__doc__, files="videos", add_args=add_protocol_args, run=fvd_from_args,
                      markdown=lambda result, a: fvd_report_markdown(result, title=f"FVD: {a.gen} vs {a.real}"))


if __name__ == "__main__":
    main()
