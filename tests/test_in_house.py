"""An in-house network from a recipe (``model.source: python``), defined OUTSIDE the apt package (a package
written to a temporary directory put on sys.path), with a design unlike the built-in DiT
(tests/in_house_nets.py): protocol errors in one line, weights from safetensors / torch files, and the
whole chain -- teacher -> distillation -> APT -> one-step sampling -> export -> rebuild from the export.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from apt.checkpoint import latest_checkpoint
from apt.cli import main
from apt.config import ConfigError, load_config
from apt.inference import load_generator
from apt.models.factory import build_backbone, load_backbone
from tests.in_house_nets import PACKAGE, write_package

torch.set_num_threads(1)
TEXT_DIM = 64  # toy-t5
PROMPTS = ["a red circle moving left on a black background"]


@pytest.fixture(scope="module")
def in_house(tmp_path_factory):
    """The package's parent directory, on sys.path for the module's tests."""
    root = tmp_path_factory.mktemp("user_code")
    write_package(root)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def python_config(target: str = "build", *extra: str, recipe: str = "recipes/demo/teacher.yaml"):
    return load_config(recipe, ["tiny"], ["model.source=python", f"model.target={PACKAGE}:{target}", *extra])


@pytest.mark.parametrize("target, extra, message", [
    ("NoBlocks", [], "has no `blocks`: the backbone protocol needs its transformer blocks in execution order as an nn.ModuleList"),
    ("TransposedTokens", [], "visual_tokens(output of blocks[0]) returned (1, 32, 64); expected (1, N, hidden_dim=32) for a batch of 1"),
    ("FirstFrameOnly", [], "forward returned (1, 3, 1, 16, 16) for an input of shape (1, 3, 4, 16, 16); the velocity must have the input's shape"),
    ("five_heads", [], "hidden_dim 32 does not divide into config.num_heads=5 readout heads"),
    ("not_a_module", [], "returned a str, not an nn.Module"),
    ("build", ["model.kwargs.text_dim=16"], "and text (1, 4, 64) (text.encoder width) failed: RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    ("build", ["model.kwargs.widht=16"], "called with model.kwargs {'widht': 16}: "),
])
def test_protocol_errors_are_one_line_naming_the_fault(in_house, target, extra, message):
    with pytest.raises(ValueError) as e:
        build_backbone(python_config(target, *extra), text_dim=TEXT_DIM)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"model.target '{PACKAGE}:{target}'")


@pytest.mark.parametrize("target, message", [
    ("nope_pkg.nets:build", "cannot import nope_pkg.nets (No module named 'nope_pkg'); put the directory that holds it on PYTHONPATH"),
    (f"{PACKAGE}", "must look like 'package.module:callable'"),
    (f"{PACKAGE}:missing", f"{PACKAGE} has no attribute 'missing'"),
])
def test_bad_targets_fail_when_the_config_loads(in_house, target, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("recipes/demo/teacher.yaml", ["tiny"], ["model.source=python", f"model.target={target}"])


def test_weights_from_safetensors_file_directory_and_torch_file(in_house, tmp_path):
    c = python_config()
    torch.manual_seed(0)
    net = build_backbone(c, text_dim=TEXT_DIM)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    save_file(state, str(tmp_path / "one.safetensors"))
    (tmp_path / "dir").mkdir()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[::2]}, str(tmp_path / "dir" / "part-1.safetensors"))
    save_file({k: state[k] for k in keys[1::2]}, str(tmp_path / "dir" / "part-2.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "weights.pt")
    for path in ("one.safetensors", "dir", "weights.pt"):
        loaded = load_backbone(c, str(tmp_path / path), "net_ema", text_dim=TEXT_DIM)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items()), path
    # model.path: the teacher's weights when the network is built
    built = build_backbone(python_config("build", f"model.path={tmp_path / 'one.safetensors'}"), text_dim=TEXT_DIM)
    assert all(torch.equal(built.state_dict()[k], v) for k, v in state.items())
    # a pickled object is refused (weights_only=True), a wrong key is named
    torch.save({"state_dict": state, "extra": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="cannot be read with torch.load\\(weights_only=True\\)"):
        load_backbone(c, str(tmp_path / "pickled.pt"), "net_ema", text_dim=TEXT_DIM)
    save_file({**state, "stray.weight": torch.zeros(1)}, str(tmp_path / "stray.safetensors"))
    with pytest.raises(ValueError, match="keys 1 unexpected \\(first 'stray.weight'\\)"):
        load_backbone(c, str(tmp_path / "stray.safetensors"), "net_ema", text_dim=TEXT_DIM)


@pytest.mark.integration
def test_teacher_distill_apt_sample_export_for_an_in_house_network(in_house, toy_shards, tmp_path):
    from apt.export_python import export_python, load_exported

    overlay = tmp_path / "in_house.yaml"
    overlay.write_text(f"model:\n  source: python\n  target: {PACKAGE}:build\n  kwargs: {{dim: 32, depth: 3, heads: 4}}\n")
    common = ["tiny", str(overlay), f"data.shards={toy_shards['video']}"]
    teacher, distill, run = tmp_path / "teacher", tmp_path / "distill", tmp_path / "apt"
    assert main(["fit", "recipes/demo/teacher.yaml", *common, f"run_dir={teacher}", f"data.image_shards={toy_shards['image']}"]) == 0
    assert main(["fit", "recipes/demo/distill.yaml", *common, f"run_dir={distill}", f"distill.teacher={teacher}", f"data.image_shards={toy_shards['image']}"]) == 0
    assert main(["fit", "recipes/demo/apt_video.yaml", *common, f"run_dir={run}", f"apt.generator={distill}", f"apt.teacher={teacher}", "apt.d_warmup_steps=1"]) == 0
    last = latest_checkpoint(run)
    assert last.name == "step-000002" and (last / "generator_ema.safetensors").exists()
    # sampling through the CLI and the library
    assert main(["sample", str(run), "--prompt", PROMPTS[0], "--out", str(tmp_path / "samples")]) == 0
    assert any((tmp_path / "samples").iterdir())
    gen = load_generator(run)
    assert type(gen.net).__name__ == "CrossNet"
    x = gen.generate_tensor(PROMPTS, [0])
    # export: safetensors + the target and kwargs; the network rebuilt from the export gives the same sample
    out = export_python(run, tmp_path / "export")
    meta = json.loads((out / "apt_model.json").read_text())
    assert meta["target"] == f"{PACKAGE}:build" and meta["kwargs"] == {"dim": 32, "depth": 3, "heads": 4}
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    rebuilt = load_exported(out)
    gen.net = rebuilt.eval()
    assert torch.equal(gen.generate_tensor(PROMPTS, [0]), x)
    assert main(["export", str(run), "--out", str(tmp_path / "export-cli")]) == 0
    assert (tmp_path / "export-cli" / "apt_model.json").exists()
    # a LoRA generator on the in-house network (its own layer names), merged into an export that rebuilds alike
    pytest.importorskip("peft")
    lora_run = tmp_path / "apt-lora"
    assert main(["fit", "recipes/demo/apt_video.yaml", *common, f"run_dir={lora_run}", f"apt.generator={distill}", f"apt.teacher={teacher}",
                 "apt.d_warmup_steps=1", "lora.rank=2", "lora.target_modules=[q,kv,out]"]) == 0
    assert main(["export", str(lora_run), "--merge", "--out", str(tmp_path / "lora-merged")]) == 0
    gen = load_generator(lora_run)
    x = gen.generate_tensor(PROMPTS, [0])
    gen.net = load_exported(tmp_path / "lora-merged").eval()
    assert torch.equal(gen.generate_tensor(PROMPTS, [0]), x)


DOC = "docs/byo_model.md"
BROKEN = '''

class NoBlocks(MyBackbone):
    blocks = None


class AllTokens(MyBackbone):
    def visual_tokens(self, block_output):
        return block_output.transpose(1, 2)


class Downsampled(MyBackbone):
    def forward(self, x_BCTHW, t_B, text):
        return super().forward(x_BCTHW, t_B, text)[..., ::2, ::2]


def six_heads(**kwargs):
    net = MyBackbone(**kwargs)
    net.config.num_heads = 6
    return net
'''


def test_the_docs_example_runs_from_a_recipe_and_its_error_table_is_exact(tmp_path, monkeypatch):
    """docs/byo_model.md §1: its ``my_pkg/nets.py`` code block, written outside apt, builds from a recipe; every
    error in its table is what the broken variants (named in the table) raise, word for word."""
    import re
    from pathlib import Path

    text = Path(DOC).read_text()
    code = re.search(r"```python\n(# my_pkg/nets\.py.*?)```", text, re.S).group(1)
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "nets.py").write_text(code + BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    section = text[text.index("**The errors a user meets**"):]
    documented = re.findall(r"^\| [^|]+ \| `((?:ConfigError|ValueError): .*)` \|$", section, re.M)
    assert len(documented) == 9
    base = ["model.source=python", "data.channels=4", "data.frames=1", "data.height=8", "data.width=8", "model.kwargs.text_dim=64", "distill.teacher=x"]
    got = []
    net = build_backbone(load_config("recipes/demo/distill.yaml", [], [*base, "model.target=my_pkg.nets:build"]), text_dim=TEXT_DIM)
    assert type(net).__name__ == "MyBackbone"
    for target, extra in [("my_pkg.netz:build", []), ("my_pkg.nets", []), ("my_pkg.nets:biuld", []), ("my_pkg.nets:build", ["model.kwargs.dims=8"]),
                          ("my_pkg.nets:NoBlocks", []), ("my_pkg.nets:AllTokens", []), ("my_pkg.nets:Downsampled", []), ("my_pkg.nets:six_heads", []),
                          ("my_pkg.nets:build", ["model.kwargs.text_dim=16"])]:
        try:
            build_backbone(load_config("recipes/demo/distill.yaml", [], [*base, f"model.target={target}", *extra]), text_dim=TEXT_DIM)
        except ValueError as e:  # ConfigError is a ValueError
            got.append(f"{'ConfigError' if isinstance(e, ConfigError) else 'ValueError'}: {e}")
    assert got == [d.replace("\\|", "|") for d in documented]
    for name in [m for m in sys.modules if m == "my_pkg" or m.startswith("my_pkg.")]:
        del sys.modules[name]
