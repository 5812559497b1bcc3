"""``python -m apt demo``: the embedded demo, end to end on CPU.

toy shards -> teacher (shipped, made by recipes/demo/teacher.yaml) -> consistency distillation ->
APT image stage -> APT video stage -> evaluation table (``runs/demo/report.json``) and a side-by-side
grid of the four rows for the same prompts and seeds. Each stage is skipped when its run already
finished, so an interrupted demo continues where it stopped. ``--text-terms`` runs the same chain with
``TEXT_TERMS_OVERRIDES`` (terms that are not in the paper) into ``runs/demo-text-terms``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from apt.checkpoint import latest_checkpoint, list_checkpoints
from apt.config import ADVERSARIAL_STAGES, load_config

TEACHER_ASSET = "assets/demo_teacher"
# ``--text-terms``: NOT the paper's objective. Stage 1 at CFG 5, and both APT stages with a matching-aware D
# term and a G-side text term (apt.mismatch_weight, apt.text_contrast_weight in apt/config.py), the image stage
# 300 updates; docs/log/demo_tuning.md, twelfth round. The video stage stops at 100 updates: with these terms
# validation is best at update 50 and worse after 100 (thirteenth round). Per stage: extra overrides.
TEXT_TERMS = ["apt.mismatch_weight=2.0", "apt.d_warmup_steps=150", "apt.text_contrast_weight=10.0"]
TEXT_TERMS_OVERRIDES = {
    "distill": ["distill.cfg_scale=5.0"],
    "apt_image": [*TEXT_TERMS, "train.max_steps=300", "train.ckpt_every_steps=50"],
    "apt_video": [*TEXT_TERMS, "train.max_steps=100"],
}
DATA = {"video": ("runs/data/toy-video", 4, 20000, 0), "image": ("runs/data/toy-image", 1, 10000, 1)}
# Seconds per stage of `make demo` (docs/demo.md, 2026-12-05, the 2-core CPU machine): the demo's ETA is these for the
# stages left, scaled by this machine's pace on the stages done so far.
REFERENCE_SECONDS = {"distill": 524, "apt_image": 72, "apt_video": 201, "evaluation": 260}


def demo_eta(stage_seconds: dict[str, float | None], left: list[str]) -> str:
    """'ETA of the demo ~13m' from REFERENCE_SECONDS (the stages in ``left`` and the evaluation)."""
    from apt.progress import format_seconds

    done = {k: v for k, v in stage_seconds.items() if v is not None and k in REFERENCE_SECONDS}
    pace = sum(done.values()) / sum(REFERENCE_SECONDS[k] for k in done) if done else 1.0
    return f"ETA of the demo ~{format_seconds(pace * sum(REFERENCE_SECONDS[k] for k in [*left, 'evaluation']))}"


def ensure_shards(quick: bool) -> dict[str, str]:
    from apt.toy.shards import write_toy_shards

    out = {}
    for key, (path, frames, n, seed) in DATA.items():
        if quick:
            path, n = path + "-quick", 512
        if not (Path(path) / "manifest.json").exists():
            print(f"[demo] writing {n} toy {'clips' if frames > 1 else 'images'} to {path}")
            write_toy_shards(path, num_samples=n, frames=frames, seed=seed)
        out[key] = path
    return out


def run_stage(recipe: str, run_dir: Path, overrides: list[str], overlays: list[str], seconds: dict[str, float | None], header: str = "") -> Path:
    """Fit a stage unless its run already reached max_steps; returns the run dir. Records the stage's wall time in
    ``seconds[run_dir.name]`` (None when it was already done; a resumed stage counts only this run's part).
    ``header``: 'stage 2/3 ...' and the demo's ETA, printed first."""
    from apt.train import fit

    c = load_config(recipe, overlays, [f"run_dir={run_dir}", "resume=auto", *overrides])
    latest = latest_checkpoint(run_dir)
    if latest is not None and int(latest.name.split("-")[1]) >= c.train.max_steps:
        print(f"[demo] {header}{c.stage} stage already done: {latest}")
        seconds[run_dir.name] = None
        return run_dir
    steps = f"{c.train.max_steps} {'generator updates' if c.stage in ADVERSARIAL_STAGES else 'steps'}"
    print(f"[demo] {header}{c.stage} stage, {steps}: {recipe} -> {run_dir}", flush=True)
    t0 = time.perf_counter()
    fit(c)
    seconds[run_dir.name] = round(time.perf_counter() - t0, 1)
    print(f"[demo] {c.stage} stage took {seconds[run_dir.name]:.0f} s")
    return run_dir


def run_demo(out: str | None = None, *, quick: bool = False, text_terms: bool = False) -> dict:
    """The chain and its report; ``text_terms`` runs it with ``TEXT_TERMS_OVERRIDES`` (not the paper's objective),
    by default into its own folder so that neither variant resumes the other's finished stages."""
    from apt.toy.bar import check_bar
    from apt.toy.report import REPORT_SAMPLES, evaluate_rows, print_table

    out = out or ("runs/demo-text-terms" if text_terms else "runs/demo")

    t_start = time.perf_counter()
    out_dir = Path(out)
    shards = ensure_shards(quick)
    overlays = ["tiny"] if quick else []
    extra = TEXT_TERMS_OVERRIDES if text_terms else {}
    teacher = TEACHER_ASSET
    stage_seconds: dict[str, float | None] = {}
    stages = ["teacher"] * quick + ["distill", "apt_image", "apt_video"]

    def header(name: str) -> str:  # 'stage 2/3, ETA of the demo ~15m: ' (no ETA for --quick: the times are the full demo's)
        i = stages.index(name)
        return f"stage {i + 1}/{len(stages)}{'' if quick else ', ' + demo_eta(stage_seconds, stages[i:])}: "

    if quick:  # a tiny teacher of our own (the shipped one is the demo flavour)
        teacher = str(run_stage("recipes/demo/teacher.yaml", out_dir / "teacher", [f"data.shards={shards['video']}", f"data.image_shards={shards['image']}"], overlays, stage_seconds, header("teacher")))
    elif not (Path(teacher) / "net_ema.safetensors").exists():
        raise FileNotFoundError(f"shipped demo teacher missing: {teacher}/net_ema.safetensors (train it: python -m apt fit recipes/demo/teacher.yaml)")
    distill = run_stage("recipes/demo/distill.yaml", out_dir / "distill", [f"distill.teacher={teacher}", f"data.shards={shards['video']}", f"data.image_shards={shards['image']}", *extra.get("distill", [])], overlays, stage_seconds, header("distill"))
    apt_image = run_stage("recipes/demo/apt_image.yaml", out_dir / "apt_image", [f"apt.generator={distill}", f"apt.teacher={teacher}", f"data.shards={shards['image']}", *extra.get("apt_image", [])], overlays, stage_seconds, header("apt_image"))
    apt_video = run_stage("recipes/demo/apt_video.yaml", out_dir / "apt_video", [f"apt.generator={apt_image}", f"apt.teacher={teacher}", f"data.shards={shards['video']}", *extra.get("apt_video", [])], overlays, stage_seconds, header("apt_video"))
    print(f"[demo] evaluation{'' if quick else ', ' + demo_eta(stage_seconds, [])}", flush=True)
    train_seconds = time.perf_counter() - t_start

    report = evaluate_rows(
        teacher=teacher,
        distilled=latest_checkpoint(distill),
        apt_candidates=list_checkpoints(apt_video),
        out_dir=out_dir,
        num_samples=64 if quick else REPORT_SAMPLES,
        torch_threads=torch.get_num_threads(),
    )
    report["train_seconds"] = round(train_seconds, 1)
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    report["stage_seconds"] = {**stage_seconds, "evaluation": round(report["total_seconds"] - train_seconds, 1)}
    report["bar"] = check_bar(report)  # derived from the figures above; stored for readers of the json
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    print_table(report)
    if quick:
        print("[demo] --quick: tiny models trained for seconds, a smoke test of the chain; the bar above is for the full demo")
    print(f"[demo] report: {out_dir / 'report.json'}; side-by-side: {out_dir / 'side_by_side.png'}; total {report['total_seconds']:.0f} s")
    return report
