"""The bar of the demo's report: what the paper's claim predicts for the four rows, checked in one run.

Each line compares a figure of the report with a threshold derived from the same report (docs/demo.md):
the benchmark can show the phenomenon (a good teacher, a distilled row clearly worse than it, a
real-vs-real floor well below the teacher's distance), and the one-step APT row is near the teacher, far better than
distillation alone, and at least 30x faster. Nothing here is tuned: the thresholds are those the demo set out to meet (docs/demo.md).
"""

from __future__ import annotations

TEACHER_MIN_ACCURACY = 0.8
DISTILLED_MIN_RATIO = 2.0       # distilled-1step distance >= 2x the teacher's
FLOOR_MAX_RATIO_TO_TEACHER = 0.5
"""The issue's "enough samples that the real-vs-real floor is well below the teacher's distance", read as at most half
of it. Until 2026-12-05 the line read "below" (ratio <= 1), which the report's N = 1000 met at 0.81: there the
floor was most of the teacher's distance and the rows' distances carried different small-sample biases
(``experiments/toy_distance_vs_n.py``, docs/log/demo_tuning.md fifteenth round)."""
APT_MAX_RATIO_TO_DISTILLED = 0.5
APT_MAX_RATIO_TO_TEACHER = 1.3
APT_MAX_ACCURACY_DROP = 0.10    # attribute accuracy within 10 points of the teacher's
APT_MIN_SPEEDUP = 30.0
DEMO_MAX_SECONDS = 20 * 60      # the whole demo on 2 CPU cores


def _line(what: str, value: float, op: str, threshold: float) -> dict:
    value, threshold = round(value, 4), round(threshold, 4)  # compared as reported: 0.95 - 0.10 is 0.85, not 0.8499999999999999
    met = value >= threshold if op == ">=" else value <= threshold
    return {"line": what, "value": value, "op": op, "threshold": threshold, "met": met}


def reused_stages(report: dict) -> list[str]:
    """The stages a demo took from an earlier run (``stage_seconds`` None). Its total then times only the rest, so the
    wall-time line is not checked: a demo into a fresh folder times the whole chain."""
    return [name for name, seconds in report.get("stage_seconds", {}).items() if seconds is None]


def wall_time_lines(report: dict, what: str) -> list[dict]:
    """The bar's wall-time line, when the report timed a whole demo: written by ``python -m apt demo`` (not by a bare
    evaluation) with no stage reused."""
    if "total_seconds" not in report or reused_stages(report):
        return []
    return [_line(what, report["total_seconds"], "<=", DEMO_MAX_SECONDS)]


def wall_time_note(report: dict) -> str:
    """A line under the bar when its wall-time line was left out because stages were reused; else ""."""
    reused = reused_stages(report) if "total_seconds" in report else []
    return (f"\n  wall time not checked: {', '.join(reused)} reused from an earlier run in this folder "
            "(a demo into a fresh folder, --out, times the whole chain)") if reused else ""


def check_bar(report: dict) -> list[dict]:
    """One dict per line of the bar: ``line``, ``value``, ``op``, ``threshold``, ``met``."""
    rows = {r["name"]: r for r in report["rows"]}
    missing = {"teacher-25step-cfg", "distilled-1step", "apt-1step"} - set(rows)
    if missing:
        raise KeyError(f"report rows lack {sorted(missing)} (has {sorted(rows)})")
    teacher, distilled, apt = rows["teacher-25step-cfg"], rows["distilled-1step"], rows["apt-1step"]
    lines = [
        _line("teacher-25step-cfg attribute accuracy", teacher["attribute_accuracy"], ">=", TEACHER_MIN_ACCURACY),
        _line("distilled-1step distance / teacher's", distilled["distance"] / teacher["distance"], ">=", DISTILLED_MIN_RATIO),
        _line("real-vs-real floor / teacher's distance", report["real_vs_real_floor"] / teacher["distance"], "<=", FLOOR_MAX_RATIO_TO_TEACHER),
        _line("apt-1step distance / distilled-1step's", apt["distance"] / distilled["distance"], "<=", APT_MAX_RATIO_TO_DISTILLED),
        _line("apt-1step distance / teacher's", apt["distance"] / teacher["distance"], "<=", APT_MAX_RATIO_TO_TEACHER),
        _line("apt-1step attribute accuracy", apt["attribute_accuracy"], ">=", teacher["attribute_accuracy"] - APT_MAX_ACCURACY_DROP),
        _line("apt-1step speed-up, batch 1", apt["speedup_batch1"], ">=", APT_MIN_SPEEDUP),
        _line("apt-1step speed-up, batched", apt["speedup_batched"], ">=", APT_MIN_SPEEDUP),
    ]
    return lines + wall_time_lines(report, "demo wall time, seconds")


def format_bar(lines: list[dict], title: str = "the paper's claim, docs/demo.md") -> str:
    out = [f"bar ({title}): {sum(x['met'] for x in lines)} of {len(lines)} lines met"]
    for x in lines:
        out.append(f"  {'met    ' if x['met'] else 'NOT met'}  {x['line']}: {x['value']:.4g} (bar {x['op']} {x['threshold']:.4g})")
    return "\n".join(out)
