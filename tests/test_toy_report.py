"""The demo report's batch-1 timing (apt.eval.toy_report.batch1_seconds)."""

import time

from apt.eval.toy_report import batch1_seconds


class _FakeGenerator:
    def __init__(self, name: str, seconds: float, log: list):
        self.name, self.seconds, self.log = name, seconds, log

    def generate_tensor(self, prompts, seeds, *, steps, cfg_scale):
        assert len(prompts) == len(seeds) == 1
        self.log.append(self.name)
        time.sleep(self.seconds)


def test_rows_are_timed_in_turn_and_each_gets_its_own_figure():
    log = []
    slow, fast = _FakeGenerator("slow", 0.02, log), _FakeGenerator("fast", 0.0, log)
    seconds = batch1_seconds([(slow, 25, 3.0), (fast, 1, 1.0)], ["a", "b", "c"], rounds=3, min_calls=2, min_seconds=0.05)
    assert len(seconds) == 2 and seconds[0] >= 0.02 > seconds[1]
    blocks = [name for i, name in enumerate(log) if i == 0 or log[i - 1] != name]
    assert blocks == ["slow", "fast"] * 4  # a warm-up turn, then three timed turns, alternating
