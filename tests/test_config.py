import glob
from pathlib import Path

import pytest

from apt.cli import main
from apt.config import ConfigError, load_config

RECIPES = sorted(glob.glob("recipes/**/*.yaml", recursive=True))
RECIPES = [r for r in RECIPES if "/overlays/" not in r]


def test_defaults_and_override_precedence():
    c = load_config("recipes/demo/teacher.yaml", ["tiny"], ["train.max_steps=7", "data.batch_size=3"])
    assert c.model.flavour == "tiny"  # overlay over recipe
    assert c.train.max_steps == 7 and c.data.batch_size == 3  # CLI over overlay


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_stpes=5", "did you mean 'train.max_steps'"),
        ("modle.flavour=tiny", "did you mean 'model'"),
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=-3", "train.max_steps must be positive"),
        ("data.height=15", "not divisible by the patch size"),
        ("data.frames=3", "temporal patch size"),
        ("model.flavour=huge", "model.flavour 'huge' unknown"),
        ("apt.optimizer=sgd", "apt.optimizer"),
        ("apt.mismatch_weight=-1", "apt.mismatch_weight must be >= 0, got -1"),
        ("apt.text_contrast_weight=1", "apt.text_contrast_weight=1.0 needs apt.mismatch_weight > 0"),
        ("optim.schedule=linear", "optim.schedule must be constant or cosine, got 'linear'"),
        ("notakeyvalue", "key=value"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("recipes/demo/teacher.yaml", ["tiny"], [override])


SP = ["train.strategy=ddp", "train.devices=2", "train.sequence_parallel=2"]


@pytest.mark.parametrize(
    "recipe, overrides, message",
    [
        ("apt_video", ["train.sequence_parallel=0"], "train.sequence_parallel must be >= 1, got 0"),
        ("apt_video", [*SP, "train.devices=3"], "train.sequence_parallel=2 must divide train.devices=3"),
        ("apt_video", [*SP, "train.devices=4", "train.sequence_parallel=4"], "the 2 heads of model 'tiny' do not divide 4 ranks"),
        ("apt_video", [*SP, "train.strategy=auto"], "train.sequence_parallel=2 runs under train.strategy ddp, fsdp2, deepspeed_stage_1"),
        ("teacher", SP, "only the APT stage runs sequence-parallel; stage 'teacher'"),
        ("apt_video", [*SP, "model.source=diffusers", "model.family=flux", "model.path=x"], "only wan is wired"),
    ],
)
def test_sequence_parallel_errors_name_the_key(recipe, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(f"recipes/demo/{recipe}.yaml", ["tiny"], overrides)
    load_config("recipes/demo/apt_video.yaml", ["tiny"], SP)  # 2 heads over 2 ranks, 2 devices


def test_unknown_overlay_and_missing_recipe():
    with pytest.raises(ConfigError, match="unknown overlay 'tinyy'"):
        load_config("recipes/demo/teacher.yaml", ["tinyy"], [])
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config("recipes/nope.yaml", [], [])


def test_dry_run_prints_resolved_config(capsys):
    assert main(["fit", "recipes/demo/teacher.yaml", "tiny", "train.max_steps=9", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 9" in out and "flavour: tiny" in out


def test_help_lists_verbs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for verb in ("fit", "sample", "demo"):
        assert verb in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["data.shards=/no/such/shards"], "data.shards"),
        (["train.max_steps=-1"], "train.max_steps must be positive"),
        (["data.width=18"], "not divisible"),
    ],
)
def test_bad_input_fails_before_training_with_one_line(args, message, capsys, tmp_path):
    rc = main(["fit", "recipes/demo/teacher.yaml", "tiny", f"run_dir={tmp_path}", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "checkpoints").exists()


def test_empty_prompt_is_an_error(tiny_teacher, capsys, tmp_path):
    rc = main(["sample", str(tiny_teacher), "--prompt", "  ", "--out", str(tmp_path)])
    assert rc == 2 and "empty" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_loads_with_tiny_overlay(recipe):
    c = load_config(recipe, ["tiny"], [])
    assert c.model.flavour == "tiny"
    shape = (1, c.data.channels, c.data.frames, c.data.height, c.data.width)
    if c.model.source == "diffusers":  # the recipe's latent shape against the production architecture (meta device)
        from apt.models.adapters.sizes import production_adapter

        production_adapter(c.model.family).check_input_shape(shape)
        return
    from apt.models import build_dit

    build_dit(c.model.flavour).check_input_shape(shape)


OVERLAYS = sorted(p.stem for p in Path("recipes/overlays").glob("*.yaml"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_loads_on_a_recipe(overlay):
    """Each overlay on top of the APT video recipe (the stage every strategy runs) resolves and validates,
    and what it sets is in the resolved config."""
    from omegaconf import OmegaConf

    c = load_config("recipes/demo/apt_video.yaml", ["tiny", overlay], [])
    resolved = OmegaConf.structured(c)
    for key, value in _leaves(OmegaConf.to_container(OmegaConf.load(f"recipes/overlays/{overlay}.yaml"))):
        assert OmegaConf.select(resolved, key) == value, (overlay, key)


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_settings_that_a_stage_cannot_honour_are_refused():
    with pytest.raises(ConfigError, match="data.image_shards"):
        load_config("recipes/demo/apt_video.yaml", ["tiny"], ["data.image_shards=runs/x"])
    with pytest.raises(ConfigError, match="eval.every_steps"):
        load_config("recipes/demo/apt_video.yaml", ["tiny", "zero2"], ["eval.every_steps=10"])
    with pytest.raises(ConfigError, match="optim.grad_clip"):
        load_config("recipes/demo/distill.yaml", ["tiny"], ["optim.grad_clip=-1"])


def test_shards_of_the_wrong_frame_count_are_rejected(toy_shards, capsys, tmp_path):
    rc = main(["fit", "recipes/demo/teacher.yaml", "tiny", f"run_dir={tmp_path}", f"data.shards={toy_shards['video']}", "data.frames=8"])
    err = capsys.readouterr().err
    assert rc == 2 and "frames=4" in err and "data.frames=8" in err


def test_demo_text_terms_overrides_are_valid_config_for_their_stages():
    """``python -m apt demo --text-terms`` passes these per-stage overrides; each must load and land."""
    from apt.demo import TEXT_TERMS_OVERRIDES

    distill = load_config("recipes/demo/distill.yaml", [], TEXT_TERMS_OVERRIDES["distill"])
    assert distill.distill.cfg_scale == 5.0
    image = load_config("recipes/demo/apt_image.yaml", [], TEXT_TERMS_OVERRIDES["apt_image"])
    video = load_config("recipes/demo/apt_video.yaml", [], TEXT_TERMS_OVERRIDES["apt_video"])
    assert image.train.max_steps == 300 and video.train.max_steps == 100
    for c in (image, video):
        assert (c.apt.mismatch_weight, c.apt.text_contrast_weight, c.apt.d_warmup_steps) == (2.0, 10.0, 150)
    plain = load_config("recipes/demo/apt_video.yaml")
    assert plain.apt.mismatch_weight == plain.apt.text_contrast_weight == 0.0  # the default demo is the paper's objective
