"""Teacher ODE pairs files (apt.ode_pairs): round trip and clear errors."""

import pytest
import torch
from safetensors.torch import save_file

from apt.ode_pairs import load_pairs, save_pairs


def test_pairs_round_trip(tmp_path):
    z, x = torch.randn(3, 3, 1, 4, 4), torch.randn(3, 3, 1, 4, 4)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    save_pairs(tmp_path / "p.safetensors", z, x, prompts, {"steps": 25})
    z2, x2, prompts2 = load_pairs(tmp_path / "p.safetensors")
    assert torch.equal(z2, z) and torch.equal(x2, x) and prompts2 == prompts
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary file left


def test_pairs_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pairs file at .*missing.safetensors"):
        load_pairs(tmp_path / "missing.safetensors")
    save_file({"z": torch.zeros(2, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="bad.safetensors is not a pairs file"):
        load_pairs(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="2 prompts do not match"):
        save_pairs(tmp_path / "p.safetensors", torch.zeros(3, 1), torch.zeros(3, 1), ["a", "b"], {})
