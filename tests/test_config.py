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
        ("model.clean_context=true", "model.clean_context needs causal mode (model.causal_chunk_frames > 0)"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("recipes/demo/teacher.yaml", ["tiny"], [override])


@pytest.mark.parametrize(
    "recipe, overrides, message",
    [
        ("stream_apt", ["stream.dmd_weight=-1"], "stream.dmd_weight must be >= 0 (0 = off), got -1"),
        ("stream_apt", ["stream.dmd_weight=1", "stream.fake_score_steps=0"], "stream.fake_score_steps must be positive, got 0"),
        ("stream_distill", ["stream.dmd_weight=1"], "distribution matching is an option of stage stream_apt, not 'stream_distill'"),
        ("stream_apt", ["stream.dmd_weight=0", "stream.dmd_teacher=assets/demo_teacher"],
         "stream.dmd_teacher=assets/demo_teacher is the teacher of distribution matching, which is off (stream.dmd_weight=0)"),
    ],
)
def test_distribution_matching_errors_name_the_key(recipe, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(f"recipes/demo/{recipe}.yaml", ["tiny"], overrides)
    for strategy in ("auto", "ddp", "fsdp2", "deepspeed_stage_2", "deepspeed_stage_3"):  # every strategy of the stage
        where = ["train.devices=2"] if strategy != "auto" else []
        load_config("recipes/demo/stream_apt.yaml", ["tiny"], ["stream.dmd_weight=1", f"train.strategy={strategy}", *where])


@pytest.mark.parametrize(
    "recipe, overrides, message",
    [
        ("distill", ["model.init=assets/demo_teacher"], "model.init=assets/demo_teacher starts a teacher stage from a checkpoint; stage 'distill'"),
        ("stream_teacher", ["model.init=assets/demo_teacher"], "stage 'stream_teacher' loads its networks from its own keys (stream.init)"),
    ],
)
def test_teacher_init_errors_name_the_key(recipe, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(f"recipes/demo/{recipe}.yaml", ["tiny"], overrides)


def test_teacher_forced_stages_take_clips_longer_than_the_cache():
    """A clip past sink + window + 1 chunks is one forward in which every chunk sees what its stream shows it."""
    for recipe in ("stream_teacher", "stream_distill"):
        c = load_config(f"recipes/demo/{recipe}.yaml", ["tiny"], ["data.frames=16", "model.sink_chunks=2", "model.window_chunks=1"])
        assert c.data.frames > (c.model.sink_chunks + c.model.window_chunks + 1) * c.model.causal_chunk_frames
    with pytest.raises(ConfigError, match="must be a whole number of 6-frame chunks"):
        load_config("recipes/demo/stream_apt.yaml", ["tiny"], ["stream.window_frames=3", "data.frames=18", "model.causal_chunk_frames=6"])


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
OVERLAY_RECIPES = {"clean_stream": "recipes/demo/stream_apt.yaml"}
"""The recipe an overlay is for, where it is not the APT video recipe (the stage every strategy runs)."""


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_loads_on_a_recipe(overlay):
    """Each overlay on top of its recipe resolves and validates, and what it sets is in the resolved config."""
    from omegaconf import OmegaConf

    c = load_config(OVERLAY_RECIPES.get(overlay, "recipes/demo/apt_video.yaml"), ["tiny", overlay], [])
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
    with pytest.raises(ConfigError, match="stream.forcing must be 'student' or 'teacher', got 'self'"):
        load_config("recipes/demo/stream_apt.yaml", ["tiny"], ["stream.forcing=self"])
    with pytest.raises(ConfigError, match="stream.forcing=teacher takes neither"):
        load_config("recipes/demo/stream_apt.yaml", ["tiny"], ["stream.forcing=teacher", "stream.grad_chunks=2"])
    assert load_config("recipes/demo/stream_apt.yaml", ["tiny"], ["stream.forcing=teacher"]).stream.forcing == "teacher"


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


def _numeric_fields(obj, prefix: str = ""):
    """(key, default) of every int / float / list-of-numbers field of the config, however deep."""
    from dataclasses import fields, is_dataclass

    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            yield from _numeric_fields(value, f"{prefix}{f.name}.")
        elif (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
                isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value)):
            yield f"{prefix}{f.name}", value


NUMERIC = sorted(_numeric_fields(__import__("apt.config", fromlist=["Config"]).Config()))
# Fields where 0 is out of range too (counts and sizes that must be positive, scales that divide, learning rates).
ZERO_IS_OUT = ["text.max_length", "data.frames", "data.height", "data.width", "data.channels", "data.batch_size",
               "data.image_batch_size", "data.max_consecutive_skipped", "flow.train_shift", "flow.sample_steps",
               "flow.sample_shift", "optim.lr", "train.max_steps", "train.devices", "train.accumulate_grad_batches",
               "train.sequence_parallel", "distill.num_steps", "distill.shift", "apt.lr_g",
               "apt.lr_d", "apt.r1_sigma", "apt.d_timestep_shift", "apt.d_steps_per_g_step", "apt.collapse_patience",
               "apt.readout_fractions", "train.ema_decay", "apt.ema_decay", "eval.num_samples", "stream.fake_score_steps",
               "stream.lr_fake_score"]
# Fields with an upper bound: a value just past it.
ABOVE = {"text.dropout": 1.0, "data.max_skipped_fraction": 1.5, "optim.betas": 1.0, "train.ema_decay": 1.0, "apt.ema_decay": 1.0,
         "apt.rmsprop_alpha": 1.0, "apt.adam_betas": 1.0, "apt.readout_fractions": 1.5}


@pytest.fixture(scope="module")
def tiny_config():
    return load_config("recipes/demo/teacher.yaml", ["tiny"], [])


@pytest.mark.parametrize("key, value", NUMERIC, ids=[k for k, _ in NUMERIC])
def test_every_numeric_field_refuses_an_out_of_range_value_by_name(key, value, tiny_config):
    """Every numeric field of the config (found by walking the dataclasses, so a new field is covered) refuses
    -1, and 0 / a value past its upper bound where those are out of range, with a ConfigError naming the key
    (a list: its first element changed)."""
    import copy

    from apt.config import check_config

    section, name = key.split(".")
    for bad in [-1] + [0] * (key in ZERO_IS_OUT) + ([ABOVE[key]] if key in ABOVE else []):
        c = copy.deepcopy(tiny_config)
        setattr(getattr(c, section), name, [bad, *value[1:]] if isinstance(value, list) else type(value)(bad))
        with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}\b") as e:
            check_config(c)
        assert str(bad) in str(e.value) or str(float(bad)) in str(e.value), (key, bad, str(e.value))


def test_the_numeric_walk_sees_every_section():
    assert {k.split(".")[0] for k, _ in NUMERIC} == {"model", "text", "data", "flow", "optim", "train", "distill", "apt", "stream", "eval", "perf", "lora"}
    assert set(ZERO_IS_OUT) | set(ABOVE) <= {k for k, _ in NUMERIC}


def test_recipe_syntax_errors_and_directories_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 3\n   seed: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: YAML syntax error at line \d+, column \d+"):
        load_config(str(bad), [], [])
    with pytest.raises(ConfigError, match="is a directory; give a recipe YAML file"):
        load_config("recipes/demo", [], [])


def test_an_empty_override_is_the_empty_string():
    """``key=`` (nothing after '=') sets '' as ``key=''`` does (docs: ``data.image_shards=`` turns the image batches off)."""
    for item in ("data.image_shards=", "data.image_shards=''"):
        assert load_config("recipes/demo/teacher.yaml", ["tiny"], [item]).data.image_shards == ""
    with pytest.raises(ConfigError, match="train.max_steps"):  # not a string: refused by name
        load_config("recipes/demo/teacher.yaml", ["tiny"], ["train.max_steps="])


def test_dry_run_may_come_before_the_overrides(capsys):
    assert main(["fit", "recipes/demo/teacher.yaml", "--dry-run", "tiny", "train.max_steps=9"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 9" in out and "flavour: tiny" in out


@pytest.mark.parametrize("args, message", [
    (["text.max_length=0"], "text.max_length must be positive, got 0"),
    (["optim.lr=-0.001"], "optim.lr must be positive, got -0.001"),
    (["optim.warmup_steps=-5"], "optim.warmup_steps must be >= 0, got -5"),
    (["train.keep_checkpoints=-1"], "train.keep_checkpoints must be >= 0 (0 = keep all), got -1"),
])
def test_bad_values_fail_before_anything_is_written(args, message, capsys, tmp_path):
    run = tmp_path / "run"
    rc = main(["fit", "recipes/demo/teacher.yaml", "tiny", f"run_dir={run}", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"error: {message}"
    assert not run.exists()


def test_weights_that_do_not_fit_fail_before_the_run_dir_is_written(tiny_teacher, toy_shards, capsys, tmp_path):
    """The networks are built (and their weights loaded) before config.yaml or anything else goes into run_dir."""
    run = tmp_path / "run"
    rc = main(["fit", "recipes/demo/distill.yaml", "tiny", f"run_dir={run}", f"data.shards={toy_shards['video']}", "data.image_shards=",
               f"distill.teacher={tiny_teacher}", "model.flavour=demo"])
    assert rc == 2 and "do not fit model flavour 'demo'" in capsys.readouterr().err
    assert not run.exists()


def test_resume_auto_on_a_missing_run_dir_says_it_starts_a_new_run(capsys, tmp_path):
    from apt.train import resume_path

    c = load_config("recipes/demo/teacher.yaml", ["tiny"], [f"run_dir={tmp_path / 'typo'}", "resume=auto"])
    assert resume_path(c) == (None, [])
    assert capsys.readouterr().err.strip() == f"resume=auto: {tmp_path / 'typo'} does not exist; starting a new run there"


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--frames", "0"], "--frames must be >= 1, got 0"),
    (["--cfg-scale", "-1"], "--cfg-scale must be >= 0"),
    (["--prompt", "a red circle " * 2000], "--prompt 2 is 6000 tokens (26000 characters); this model reads at most text.max_length=32 tokens"),
])
def test_sample_arguments_are_checked_by_name(tiny_teacher, args, message, capsys, tmp_path):
    rc = main(["sample", str(tiny_teacher), "--prompt", "a red circle", *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


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
