"""The lr multiplier of the teacher and distillation stages (optim.warmup_steps, optim.schedule)."""

import math

import pytest

from apt.lit.base import lr_factor


def test_constant_after_a_linear_warmup():
    assert [lr_factor(s, 4, 100, "constant") for s in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert lr_factor(0, 0, 100, "constant") == 1.0


def test_cosine_reaches_zero_at_max_steps():
    assert lr_factor(0, 0, 100, "cosine") == 1.0
    assert lr_factor(50, 0, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 0, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(200, 0, 100, "cosine") == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    # after a warm-up of 10 the half cosine spans the remaining 90 steps
    assert lr_factor(9, 10, 100, "cosine") == 1.0
    assert lr_factor(40, 10, 100, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))


def test_cosine_over_the_last_decay_steps_only():
    """optim.decay_steps (warmup-stable-decay): constant until max_steps - decay_steps, then the half cosine."""
    assert [lr_factor(s, 10, 100, "cosine", decay_steps=40) for s in (9, 10, 59, 60)] == [1.0, 1.0, 1.0, 1.0]
    assert lr_factor(80, 10, 100, "cosine", decay_steps=40) == pytest.approx(0.5)
    assert lr_factor(70, 10, 100, "cosine", decay_steps=40) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(100, 10, 100, "cosine", decay_steps=40) == pytest.approx(0.0, abs=1e-12)
    # decay_steps spanning everything after the warm-up is the plain cosine
    assert lr_factor(40, 10, 100, "cosine", decay_steps=90) == pytest.approx(lr_factor(40, 10, 100, "cosine"))
    assert lr_factor(99, 10, 100, "constant", decay_steps=40) == 1.0  # constant ignores it


def test_decay_steps_longer_than_the_run_is_the_plain_cosine():
    """A shortened run (e.g. the teacher recipe with the tiny overlay) decays over every step after the warm-up."""
    for step in (9, 10, 40, 99, 100):
        assert lr_factor(step, 10, 100, "cosine", decay_steps=6000) == pytest.approx(lr_factor(step, 10, 100, "cosine"))


def test_negative_decay_steps_is_refused():
    from apt.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="optim.decay_steps"):
        load_config("recipes/demo/teacher.yaml", overrides=["optim.decay_steps=-1"])
