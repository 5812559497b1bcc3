"""eval/stream_timing.py on CPU at its tiny shape: one row per shape, the JSON rewritten after each, a failing shape
recorded as an error row; the rolling cache keeps a 16x-long stream's memory at the 1x stream's."""

from __future__ import annotations

import json

from tests.eval_helpers import load_eval_script


def test_stream_timing_rows_json_and_errors(tmp_path):
    timing = load_eval_script("stream_timing")
    out = tmp_path / "timing.json"
    report = timing.main(["--shape", "tiny", "--device", "cpu", "--window", "4", "--chunks", "8", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    (row,) = report["rows"]
    assert row["shape"] == "tiny" and row["window_latent_frames"] == 4 and row["tokens_per_chunk"] == (64 // 8 // 2) * (96 // 8 // 2)
    assert row["first_chunk_seconds"] > 0 and row["steady_chunk_seconds"] > 0 and row["whole_training_clip_one_step_seconds"] > 0
    assert row["fps"] == 4 / row["steady_chunk_seconds"]
    assert row["peak_bytes_1x"] > 0 and row["memory_16x_over_1x"] <= 1.1  # fixed-size cache buffers: no growth with length
    bad = timing.main(["--shape", "tiny", "tiny", "--device", "cpu", "--window", "4", "--chunks", "3", "--json", str(out)])
    assert [r["error"] for r in bad["rows"]] == ["ValueError: --chunks must exceed the sink + window + 1 = 6 chunks of a full cache, got 3"] * 2
    assert len(json.loads(out.read_text())["rows"]) == 2
