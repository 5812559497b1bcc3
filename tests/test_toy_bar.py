"""The demo report's bar: each line against hand-made reports."""

import pytest

from apt.toy.bar import check_bar, format_bar, wall_time_note


def make_report(*, teacher=(6.0, 0.99), distilled=(14.0, 0.90), apt=(7.0, 0.95), floor=1.0, speedups=(33.0, 46.0)):
    def row(name, distance, accuracy, b1=1.0, batched=1.0):
        return {"name": name, "distance": distance, "attribute_accuracy": accuracy, "speedup_batch1": b1, "speedup_batched": batched}

    return {
        "rows": [row("teacher-25step-cfg", *teacher), row("distilled-1step", *distilled, 32.0, 45.0), row("apt-1step", *apt, *speedups),
                 row("apt-2step", 5.0, 0.97, 16.0, 25.0)],
        "real_vs_real_floor": floor,
    }


def by_line(lines):
    return {x["line"]: x for x in lines}


def test_a_report_that_meets_every_line():
    lines = check_bar(make_report())
    assert len(lines) == 8 and all(x["met"] for x in lines)
    assert format_bar(lines).startswith("bar (the paper's claim, docs/demo.md): 8 of 8 lines met")


def test_each_apt_line_fails_on_its_own():
    # 7.5 is 1.25x the teacher but more than half the distilled row's 14.0.
    lines = by_line(check_bar(make_report(apt=(7.5, 0.95))))
    assert not lines["apt-1step distance / distilled-1step's"]["met"]
    assert lines["apt-1step distance / teacher's"]["met"]
    # 7.9 against a distilled row of 20: under half, but 1.32x the teacher.
    lines = by_line(check_bar(make_report(distilled=(20.0, 0.9), apt=(7.9, 0.95))))
    assert lines["apt-1step distance / distilled-1step's"]["met"]
    assert not lines["apt-1step distance / teacher's"]["met"]
    assert lines["apt-1step distance / teacher's"]["value"] == pytest.approx(7.9 / 6.0, abs=1e-4)
    lines = by_line(check_bar(make_report(apt=(7.0, 0.88))))
    accuracy = lines["apt-1step attribute accuracy"]
    assert not accuracy["met"] and accuracy["threshold"] == pytest.approx(0.89)
    lines = by_line(check_bar(make_report(speedups=(29.9, 46.0))))
    assert not lines["apt-1step speed-up, batch 1"]["met"] and lines["apt-1step speed-up, batched"]["met"]


def test_the_benchmark_lines():
    lines = by_line(check_bar(make_report(teacher=(6.0, 0.79), distilled=(11.9, 0.9), floor=6.5)))
    assert not lines["teacher-25step-cfg attribute accuracy"]["met"]
    assert not lines["distilled-1step distance / teacher's"]["met"]
    assert not lines["real-vs-real floor / teacher's distance"]["met"]
    assert "NOT met  real-vs-real floor" in format_bar(list(lines.values()))
    # "Well below" the teacher: at most half its distance; the report's old N = 1000 (floor 5.0, teacher 6.2) is not.
    assert by_line(check_bar(make_report(floor=3.0)))["real-vs-real floor / teacher's distance"]["met"]
    assert not by_line(check_bar(make_report(floor=3.01)))["real-vs-real floor / teacher's distance"]["met"]
    assert not by_line(check_bar(make_report(teacher=(6.16, 0.997), floor=5.02)))["real-vs-real floor / teacher's distance"]["met"]


def test_thresholds_are_inclusive():
    # distilled exactly 2x, apt exactly half of it, 1.3x the teacher, 10 points below, 30x, the floor half the teacher's.
    lines = check_bar(make_report(teacher=(10.0, 0.95), distilled=(26.0, 0.9), apt=(13.0, 0.85), floor=5.0, speedups=(30.0, 30.0)))
    assert all(x["met"] for x in lines)


def test_the_demo_time_line_appears_with_the_demo_total():
    report = make_report()
    report["total_seconds"] = 1250.0
    line = by_line(check_bar(report))["demo wall time, seconds"]
    assert not line["met"] and line["threshold"] == 1200


def test_the_demo_time_line_is_left_out_when_a_stage_was_reused():
    # A rerun into the same folder reuses finished stages (stage_seconds None): its total times the evaluation only.
    report = make_report()
    report["total_seconds"], report["stage_seconds"] = 300.0, {"teacher": None, "apt_video": 250.0, "evaluation": 50.0}
    assert "demo wall time, seconds" not in by_line(check_bar(report))
    assert "teacher reused" in wall_time_note(report)
    report["stage_seconds"]["teacher"], report["total_seconds"] = 950.0, 1250.0  # every stage ran in this run
    assert not by_line(check_bar(report))["demo wall time, seconds"]["met"] and wall_time_note(report) == ""


def test_a_report_without_the_rows_names_them():
    report = make_report()
    report["rows"] = report["rows"][:1]
    with pytest.raises(KeyError, match="distilled-1step"):
        check_bar(report)
