"""The demo report's batch-1 timing (apt.toy.report.batch1_seconds, text_encode_seconds)."""

import time

from apt.toy.report import batch1_seconds, text_encode_seconds


class _FakeEncoder:
    def __init__(self, log: list):
        self.cached, self.log = set(), log

    def encode(self, captions, *, cache=True):
        self.log.append(("encode", tuple(captions), cache))
        if cache:
            self.cached.update(captions)


class _FakeGenerator:
    def __init__(self, name: str, seconds: float, log: list):
        self.name, self.seconds, self.log = name, seconds, log
        self.text_encoder = _FakeEncoder(log)

    def generate_tensor(self, prompts, seeds, *, steps, cfg_scale):
        assert len(prompts) == len(seeds) == 1
        assert prompts[0] in self.text_encoder.cached, "a timed call met a caption its encoder had not cached"
        self.log.append(self.name)
        time.sleep(self.seconds)


def test_rows_are_timed_in_turn_and_each_gets_its_own_figure():
    log = []
    slow, fast = _FakeGenerator("slow", 0.02, log), _FakeGenerator("fast", 0.0, log)
    seconds = batch1_seconds([(slow, 25, 3.0), (fast, 1, 1.0)], ["a", "b", "c"], rounds=3, min_calls=2, min_seconds=0.05)
    assert len(seconds) == 2 and seconds[0] >= 0.02 > seconds[1]
    calls = [e for e in log if isinstance(e, str)]
    blocks = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]
    assert blocks == ["slow", "fast"] * 4  # a warm-up turn, then three timed turns, alternating


def test_a_row_figure_is_the_median_call_so_occasional_stalls_do_not_move_it():
    class _Stalling(_FakeGenerator):  # every fourth call stalls 40 ms, like a shared machine's hiccup
        calls = 0

        def generate_tensor(self, prompts, seeds, *, steps, cfg_scale):
            super().generate_tensor(prompts, seeds, steps=steps, cfg_scale=cfg_scale)
            self.calls += 1
            if self.calls % 4 == 0:
                time.sleep(0.04)

    (seconds,) = batch1_seconds([(_Stalling("row", 0.002, []), 1, 1.0)], ["a"], rounds=3, min_calls=8, min_seconds=0.0)
    assert 0.002 <= seconds < 0.01  # the mean call is >= 0.012 s


def test_every_row_has_the_prompts_encoded_before_its_first_call():
    log = []
    rows = [(_FakeGenerator("teacher", 0.0, log), 25, 3.0), (_FakeGenerator("one-step", 0.0, log), 1, 1.0)]
    batch1_seconds(rows, ["a", "b", "c", "d"], rounds=2, min_calls=3, min_seconds=0.0)
    first_call = next(i for i, e in enumerate(log) if isinstance(e, str))
    assert log[:first_call] == [("encode", ("a", "b", "c", "d"), True)] * 2


def test_text_encode_seconds_bypasses_the_cache():
    log = []
    enc = _FakeEncoder(log)
    assert text_encode_seconds(enc, ["a", "b"], calls=4) >= 0
    assert len(log) == 5 and all(cache is False for _, _, cache in log) and not enc.cached
