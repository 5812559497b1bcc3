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

        net = production_adapter(c.model.family)
        net.check_input_shape(shape)
        assert c.text.max_length == net.text.max_length  # the teacher's own text length (its pipeline's max_sequence_length)
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
    from apt.toy.demo import TEXT_TERMS_OVERRIDES

    distill = load_config("recipes/demo/distill.yaml", [], TEXT_TERMS_OVERRIDES["distill"])
    assert distill.distill.cfg_scale == 5.0
    image = load_config("recipes/demo/apt_image.yaml", [], TEXT_TERMS_OVERRIDES["apt_image"])
    video = load_config("recipes/demo/apt_video.yaml", [], TEXT_TERMS_OVERRIDES["apt_video"])
    assert image.train.max_steps == 300 and video.train.max_steps == 100
    for c in (image, video):
        assert (c.apt.mismatch_weight, c.apt.text_contrast_weight, c.apt.d_warmup_steps) == (2.0, 10.0, 150)
    plain = load_config("recipes/demo/apt_video.yaml")
    assert plain.apt.mismatch_weight == plain.apt.text_contrast_weight == 0.0  # the default demo is the paper's objective


WAN = "recipes/video/wan-1280x720-24fps.yaml"


@pytest.mark.parametrize(
    "recipe, overrides, message",
    [
        (WAN, ["eval.every_steps=50"], "eval.every_steps=50: the in-training evaluation scores the toy world with the toy classifier, "
                                       "not the samples of model.source=diffusers"),
        (WAN, ["eval.every_steps=50", "eval.classifier=assets/toy_classifier"], "not the samples of model.source=diffusers"),
        ("recipes/demo/apt_video.yaml", ["eval.every_steps=50", "eval.classifier=''"], "eval.every_steps=50 needs eval.classifier"),
        ("recipes/demo/apt_video.yaml", ["eval.every_steps=-1"], "eval.every_steps must be >= 0"),
        ("recipes/demo/teacher.yaml", ["train.sample_prompts_file=prompts.txt"],
         "train.sample_prompts (8 prompts) and train.sample_prompts_file (prompts.txt) are both set"),
        ("recipes/demo/teacher.yaml", ["train.num_sample_prompts=-1"], "train.num_sample_prompts must be >= 0"),
    ],
)
def test_sample_prompt_and_eval_errors_name_the_key(recipe, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(recipe, ["tiny"], overrides)


def test_only_the_demo_recipes_ask_for_the_toy_classifier():
    assert load_config(None).eval.classifier == ""
    for recipe in RECIPES:
        c = load_config(recipe)
        assert c.eval.classifier == ("assets/toy_classifier" if recipe.startswith("recipes/demo/") else ""), recipe
    assert load_config("recipes/demo/apt_video.yaml", [], ["eval.every_steps=50"]).eval.every_steps == 50


def test_sample_prompts_come_from_the_recipe():
    """The demo recipes list the toy prompts their sample grids always showed; the others real-world prompts."""
    from apt.prompts import sample_prompts
    from apt.toy.world import eval_prompts

    for recipe in RECIPES:
        c = load_config(recipe)
        prompts = sample_prompts(c)
        assert len(prompts) >= 4 and all(p.strip() for p in prompts), recipe
        if recipe.startswith("recipes/demo/"):
            assert prompts == eval_prompts(8, seed=1234, frames=c.data.frames), recipe
        else:
            assert not any(" background" in p for p in prompts), recipe  # no toy caption in a production recipe
        assert sample_prompts(load_config(recipe, ["tiny"])) == prompts[:2]  # the tiny overlay caps them


def test_sample_prompts_file_one_per_line(tmp_path):
    from apt.prompts import sample_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("a cat on a sofa\n\n  a dog in the park  \n")
    c = load_config(WAN, [], ["train.sample_prompts=[]", f"train.sample_prompts_file={path}"])
    assert sample_prompts(c) == ["a cat on a sofa", "a dog in the park"]
    path.write_text("\n \n")
    with pytest.raises(ConfigError, match=f"train.sample_prompts_file: {path} holds no prompt"):
        sample_prompts(c)
    c.train.sample_prompts_file = str(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match=f"train.sample_prompts_file: {tmp_path / 'missing.txt'} is not a file"):
        sample_prompts(c)


def test_no_sample_prompts_means_no_sample_media_and_a_warning():
    from apt.prompts import sample_prompts

    c = load_config(None)
    with pytest.warns(UserWarning, match="train.sample_prompts and train.sample_prompts_file are not set: this run writes no sample media"):
        assert sample_prompts(c) == []


def test_a_missing_prompts_file_fails_before_training(toy_shards, capsys, tmp_path):
    missing = tmp_path / "nope.txt"
    rc = main(["fit", "recipes/demo/teacher.yaml", "tiny", f"run_dir={tmp_path / 'run'}", f"data.shards={toy_shards['video']}",
               f"data.image_shards={toy_shards['image']}", "train.sample_prompts=[]", f"train.sample_prompts_file={missing}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"error: train.sample_prompts_file: {missing} is not a file (a text file, one prompt per line)"
    assert not (tmp_path / "run" / "checkpoints").exists()
