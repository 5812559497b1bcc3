"""Progress lines for log files (``apt.progress``): when they print and what they say."""

from __future__ import annotations

import io

from apt.progress import ProgressLog, format_seconds


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_line_names_step_total_pace_eta_and_the_stage_losses(monkeypatch):
    clock = iter([100.0, 130.0, 160.0, 160.5])
    monkeypatch.setattr("apt.progress.time.monotonic", lambda: next(clock))
    out = io.StringIO()  # not a terminal: a log file
    progress = ProgressLog("apt", 1000, 30.0, progress_bar=True, stream=out)
    progress.start(100)  # t = 100
    progress.update(160, {"loss_d": 0.69314, "loss_g": 0.7, "grad_norm_g": 3.0})  # t = 130: 60 steps in 30 s
    progress.update(200, {"loss_d": 0.5, "loss_g": 0.8, "data_skipped": 3.0})  # t = 160
    progress.update(201, {"loss_d": 0.5})  # t = 160.5: too soon, nothing printed
    lines = out.getvalue().splitlines()
    assert lines == [
        "[apt] training from step 100 to 1000 (a line every 30 s)",
        "[apt] step 160/1000 (16%)  0.5 s/step  ETA 7m00s  loss_d 0.6931  loss_g 0.7",
        "[apt] step 200/1000 (20%)  0.75 s/step  ETA 10m00s  loss_d 0.5  loss_g 0.8  data_skipped 3",
    ]


def test_silent_on_a_terminal_with_a_progress_bar_on_other_ranks_and_when_off():
    for stream, kw in ((_Terminal(), {"progress_bar": True}), (io.StringIO(), {"progress_bar": True, "rank": 1}),
                       (io.StringIO(), {"progress_bar": False, "rank": 0})):
        every = 0.0 if kw.get("progress_bar") is False else 1e-9  # 0 = never
        progress = ProgressLog("teacher", 10, every, stream=stream, **kw)
        progress.start(0)
        progress.update(5, {"loss": 1.0}, force=True)
        assert stream.getvalue() == ""
    stream = _Terminal()  # a terminal without the progress bar gets the lines
    progress = ProgressLog("teacher", 10, 1e-9, progress_bar=False, stream=stream)
    progress.start(0)
    progress.update(5, {"loss": 1.0}, force=True)
    assert stream.getvalue().splitlines()[-1].startswith("[teacher] step 5/10 (50%)")


def test_format_seconds():
    assert [format_seconds(s) for s in (7, 65, 3600 * 3 + 125)] == ["7s", "1m05s", "3h02m"]
