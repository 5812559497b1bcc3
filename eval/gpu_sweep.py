"""One prepared GPU sweep: every inference/training speed lever of docs/performance.md in one run.

    # one H100 / H200 (< 8 minutes; offline wheels for the extras: `make gpu-wheels` here, then
    # eval/gpu_sweep.sh on the GPU machine installs them from .whl/ and runs this script)
    python eval/gpu_sweep.py --out runs/gpu_sweep.json --time-limit 450
    # CPU rehearsal at tiny shapes (what tests/test_gpu_sweep.py runs): quantised kernels emulated
    python eval/gpu_sweep.py --tiny --out runs/gpu_sweep_tiny.json

Stages, in order (the JSON is rewritten after every measured row, so a run cut by a time limit
still reports everything before the cut; a stage that fails records its error and the sweep goes on):

1. ``environment``: device, capability, torch / CUDA / cuDNN / Triton / diffusers versions, which
   optional attention kernels import.
2. ``attention``: one attention call at the apt-8b 720p/49f shape (B 1, 24 heads, S = 46,800 + 256,
   head dim 128, bf16) per backend: SDPA with the DiT's all-True text mask (today's path), SDPA
   unmasked (auto, cuDNN, flash), FlashAttention-3 bf16 / FP8 and SageAttention; median time,
   TFLOP/s (4 S^2 D per call) and the relative error of the first ``--error-rows`` queries against
   fp32 attention.
3. ``linears``: the four block linear shapes (QKV, projection, MLP in / out at S tokens) in bf16 and
   FP8 (per-tensor / row-wise scales, with and without fast accumulation): time, TFLOP/s, error vs fp32.
4. ``dit``: the whole apt-8b DiT forward (one step at t = 1) per combination of switches (text
   padding, attention kernel, FP8 linears): time and output error vs the plain DiT; also a prompt of
   64 valid tokens padded to 256 (masked vs trimmed).
5. ``vae``: the Wan 2.1 VAE decode at 720p/49f: plain, folded padding, channels-last, both, chunked:
   time, peak memory, error vs plain.
6. ``train_step``: one APT update (``eval/benchmark_train_step.py``, apt-8b width at ``--train-depth``
   layers): the 2026-11-22 setting (full checkpointing, text mask), then without the mask per
   checkpoint policy (full, attention_and_matmul, attention): seconds and MFU (out of memory: recorded).
7. ``dit_compiled``: the DiT with ``torch.compile`` (+ fused QK-norm/RoPE), unquantised and with the
   fastest kernels: time and error vs plain (late: compiling 36 blocks takes the longest).
8. ``vae_compiled``: the decode with the decoder compiled (last: compile time is unknown).

``summary`` then lists the fastest DiT row, the fastest VAE row, their sum (separately measured
stages added, not one end-to-end run) and the targets (DiT <= 2.3 s, total <= 4 s, MFU >= 35%).
All weights are random (built from configs); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from apt.models import TextCond, build_dit  # noqa: E402
from apt.models.attention import attention, attention_backend  # noqa: E402
from apt.models.attention_kernels import EXTRAS  # noqa: E402
from apt.models.flops import dit_forward_flops  # noqa: E402
from apt.perf import PerfConfig, apply_perf  # noqa: E402
from apt.perf.bench import (  # noqa: E402
    environment,
    peak_memory_bytes,
    randomize_zero_init,
    relative_error,
    reset_peak_memory,
    time_call,
)
from apt.perf.fp8 import convert_to_fp8  # noqa: E402
from apt.perf.vae import apply_vae_perf, decode_latents  # noqa: E402

TARGETS = {"dit_seconds": 2.3, "total_seconds": 4.0, "mfu": 0.35}
FULL = dict(flavour="apt-8b", latent=(16, 13, 90, 160), text_tokens=256, text_dim=4096, dtype=torch.bfloat16, vae={}, train_video="49,720,1280")
TINY = dict(
    flavour="tiny", latent=(16, 2, 8, 8), text_tokens=8, text_dim=32, dtype=torch.float32, train_video="5,32,32",
    vae=dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]),
)
KERNELS = ("fa3", "fa3_fp8", "sage")

DIT_ROWS = [  # (name, perf overrides, valid text tokens: None = all), most informative first (a cut run drops the tail)
    ("plain", {}, None),
    ("trim", dict(text_padding="trim"), None),
    ("trim+fa3_fp8", dict(text_padding="trim", attention_backend="fa3_fp8"), None),
    ("trim+fa3", dict(text_padding="trim", attention_backend="fa3"), None),
    ("trim+sage", dict(text_padding="trim", attention_backend="sage"), None),
    ("trim+fa3_fp8+fp8_fast", dict(text_padding="trim", attention_backend="fa3_fp8", fp8=True, fp8_fast_accum=True), None),
    ("trim+fp8", dict(text_padding="trim", fp8=True), None),
    ("trim+fp8_row_fast", dict(text_padding="trim", fp8=True, fp8_scaling="row", fp8_fast_accum=True), None),
    ("trim+cudnn", dict(text_padding="trim", attention_backend="cudnn"), None),
    ("padded64_mask", {}, 64),
    ("padded64_trim", dict(text_padding="trim"), 64),
]
COMPILED_ROWS = [
    ("compile+trim", dict(text_padding="trim", compile=True, fused_qk_norm_rope=True)),
    ("compile+trim+fa3_fp8+fp8_fast", dict(text_padding="trim", attention_backend="fa3_fp8", fp8=True, fp8_fast_accum=True, compile=True, fused_qk_norm_rope=True)),
]
VAE_ROWS = [
    ("plain", {}),
    ("fold_padding", dict(vae_fold_padding=True)),
    ("channels_last", dict(vae_channels_last=True)),
    ("fold+channels_last", dict(vae_fold_padding=True, vae_channels_last=True)),
    ("fold+channels_last+chunk1", dict(vae_fold_padding=True, vae_channels_last=True, vae_chunk_frames=1)),
]
VAE_COMPILED_ROWS = [("fold+channels_last+compile", dict(vae_fold_padding=True, vae_channels_last=True, vae_compile=True))]
TRAIN_ROWS = [  # (name, checkpoint policy, perf overrides): the first is the 2026-11-22 measurement's setting
    ("full+mask", "full", []),
    ("full", "full", ["text_padding=trim"]),
    ("attention_and_matmul", "attention_and_matmul", ["text_padding=trim"]),
    ("attention", "attention", ["text_padding=trim"]),
]


class Sweep:
    """Holds the JSON report, rewrites it after every row, and keeps the time budget."""

    def __init__(self, a: argparse.Namespace):
        self.a, self.t0 = a, time.perf_counter()
        self.report = {"command": " ".join(["python", *sys.argv]), "tiny": a.tiny, "time_limit_s": a.time_limit, "targets": TARGETS, "stages": {}}
        self.out = Path(a.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.a.time_limit - (time.perf_counter() - self.t0)

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=1, default=str))
        os.replace(tmp, self.out)

    def row(self, stage: str, name: str, fn, *, needs_s: float) -> None:
        """Run one measurement; record its result, its error, or that the budget ran out."""
        rows = self.report["stages"].setdefault(stage, {})
        if self.left() < needs_s:
            rows[name] = {"skipped": f"time limit: {self.left():.0f} s left, ~{needs_s:.0f} s needed"}
        else:
            t = time.perf_counter()
            try:
                rows[name] = fn()
            except Exception as e:  # noqa: BLE001 - one failing lever must not stop the sweep
                rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]}
            rows[name]["wall_s"] = round(time.perf_counter() - t, 2)
            _free()
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {stage} / {name}: {json.dumps(rows[name], default=str)[:300]}", flush=True)
        self.write()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- 1. environment --------------------------------------------------------------------------------------
def stage_environment(s: Sweep, device: torch.device) -> None:
    env = environment(device)
    env["versions"] = {d: _version(d) for d in ("torch", "triton", "diffusers", "fa3-fwd", "sageattention", "nvidia-cudnn-frontend")}
    env["kernels_import"] = {}
    for name, (_, module, _) in EXTRAS.items():
        try:
            __import__(module)
            env["kernels_import"][name] = "ok"
        except Exception as e:  # noqa: BLE001
            env["kernels_import"][name] = f"{type(e).__name__}: {e}"[:300]
    s.report["stages"]["environment"] = env
    s.write()


# -- 2. attention kernels alone --------------------------------------------------------------------------
def stage_attention(s: Sweep, device: torch.device, shape: dict) -> None:
    from apt.models.registry import FLAVOURS

    c = FLAVOURS[shape["flavour"]]
    K, E = c.num_heads, c.hidden_dim // c.num_heads
    S = _tokens(c, shape["latent"]) + shape["text_tokens"]
    if s.a.attention_shape:
        K, S, E = (int(v) for v in s.a.attention_shape.split(","))
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, K, S, E, generator=g, device=device, dtype=shape["dtype"]) for _ in range(3))
    rows = min(s.a.error_rows, S)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION, torch.nn.attention.SDPBackend.MATH]):
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, :rows].float(), k.float(), v.float())
    flops = 4 * K * S * S * E
    mask = torch.ones(1, 1, 1, S, dtype=torch.bool, device=device)
    backends = [("sdpa_masked", "auto", mask), ("sdpa_auto", "auto", None)]
    backends += [(f"sdpa_{b}", b, None) for b in (("cudnn", "flash") if device.type == "cuda" else ("math", "flash"))]
    backends += [(b, b, None) for b in KERNELS]
    s.report["stages"]["attention_shape"] = {"B": 1, "heads": K, "tokens": S, "head_dim": E, "dtype": str(shape["dtype"]), "error_rows": rows}

    for name, backend, m in backends:
        def run(backend=backend, m=m):
            with torch.no_grad(), attention_backend(backend), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sec, _, out = time_call(lambda: attention(q, k, v, m), device=device, warmup=1, repeats=s.a.repeats)
            return {"seconds": sec, "tflops_per_s": flops / sec / 1e12, "rel_error_vs_fp32": relative_error(out[:, :, :rows], ref)}

        s.row("attention", name, run, needs_s=5)


PATCH = (1, 2, 2)  # the sweep's DiT patching (apt-8b's own; the tiny flavour is rebuilt with it)


def _tokens(c, latent) -> int:
    _, T, H, W = latent
    pt, ph, pw = PATCH
    return (T // pt) * (H // ph) * (W // pw)


# -- 3. linear layers --------------------------------------------------------------------------------------
def stage_linears(s: Sweep, device: torch.device, shape: dict) -> None:
    from apt.models.registry import FLAVOURS

    c = FLAVOURS[shape["flavour"]]
    D, H = c.hidden_dim, int(c.hidden_dim * c.mlp_ratio)
    M = _tokens(c, shape["latent"]) + shape["text_tokens"]
    emulate = device.type != "cuda"
    for layer_name, (k_in, n_out) in {"qkv": (D, 3 * D), "proj": (D, D), "mlp_in": (D, H), "mlp_out": (H, D)}.items():
        torch.manual_seed(0)
        with torch.device(device):
            base = torch.nn.Linear(k_in, n_out).to(shape["dtype"])
            x = torch.randn(M, k_in, dtype=shape["dtype"])
        rows = min(s.a.error_rows, M)
        ref = x[:rows].float() @ base.weight.float().T + base.bias.float()
        variants = {"bf16": None, "fp8_tensor": ("tensor", False), "fp8_row": ("row", False), "fp8_tensor_fast": ("tensor", True), "fp8_row_fast": ("row", True)}
        for vname, opt in variants.items():
            def run(opt=opt, base=base, x=x, k_in=k_in, n_out=n_out, rows=rows, ref=ref):
                layer = copy.deepcopy(base)
                if opt is not None:
                    convert_to_fp8(layer, emulate=emulate, scaling=opt[0], fast_accum=opt[1], filter=lambda n, m: isinstance(m, torch.nn.Linear))
                with torch.no_grad():
                    sec, _, out = time_call(lambda: layer(x), device=device, warmup=1, repeats=s.a.repeats)
                return {"M": M, "K": k_in, "N": n_out, "seconds": sec, "tflops_per_s": 2 * M * k_in * n_out / sec / 1e12,
                        "rel_error_vs_fp32": relative_error(out[:rows], ref), "emulated": emulate and opt is not None}

            s.row("linears", f"{layer_name}/{vname}", run, needs_s=3)
        del base, x


# -- 4 / 7. the whole DiT -------------------------------------------------------------------------------------
def build_inputs(c, shape: dict, device: torch.device, valid: int | None):
    g = torch.Generator(device).manual_seed(1)
    z = torch.randn(1, *shape["latent"], generator=g, device=device, dtype=shape["dtype"])
    L = shape["text_tokens"]
    emb = torch.randn(1, L, c.text_dim, generator=g, device=device, dtype=shape["dtype"])
    mask = torch.zeros(1, L, dtype=torch.bool, device=device)
    mask[:, : (L if valid is None else min(valid, L))] = True
    return z, TextCond(emb, mask)


def stage_dit(s: Sweep, device: torch.device, shape: dict, rows: list, stage: str, base: torch.nn.Module, plain: dict) -> None:
    c = base.config
    for name, overrides, *rest in rows:
        valid = rest[0] if rest else None
        if valid is not None and s.a.tiny:
            valid = max(1, shape["text_tokens"] // 4)

        def run(name=name, overrides=overrides, valid=valid):
            z, text = build_inputs(c, shape, device, valid)
            t1 = torch.ones(1, device=device)
            perf = PerfConfig(compile_backend=s.a.compile_backend, **overrides)
            net = copy.deepcopy(base)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # CPU emulation notices
                net = apply_perf(net, perf)
            warmup = 2 if perf.compile else 1
            reset_peak_memory(device)
            with torch.no_grad():
                sec, _, out = time_call(lambda: net(z, t1, text), device=device, warmup=warmup, repeats=s.a.repeats)
            key = "padded" if valid is not None else "full"
            if name in ("plain", "padded64_mask"):
                plain[key] = out
            L = int(text.mask_BL.sum()) if perf.text_padding != "mask" else shape["text_tokens"]
            flops = dit_forward_flops(c, batch=1, frames=shape["latent"][1], height=shape["latent"][2], width=shape["latent"][3], text_tokens=L).total
            row = {"perf": {k: v for k, v in asdict(perf).items() if v != getattr(PerfConfig(), k)}, "valid_text_tokens": int(text.mask_BL.sum()),
                   "seconds": sec, "tflops_per_s": flops / sec / 1e12, "peak_memory_gib": peak_memory_bytes(device) / 2**30}
            if key in plain and name not in ("plain", "padded64_mask"):
                row["rel_error_vs_plain"] = relative_error(out, plain[key])
            return row

        s.row(stage, name, run, needs_s=s.a.dit_row_s * (4 if "compile" in overrides else 1))


# -- 5. VAE decode -------------------------------------------------------------------------------------------
def stage_vae(s: Sweep, device: torch.device, shape: dict, rows: list, stage: str) -> None:
    from diffusers import AutoencoderKLWan

    g = torch.Generator(device).manual_seed(2)
    z = torch.randn(1, *shape["latent"], generator=g, device=device, dtype=shape["dtype"])
    plain = {}
    if stage != "vae":
        rows = [VAE_ROWS[0], *rows]  # the reference decode again (the plain stage's output is not kept)
    for name, overrides in rows:
        def run(name=name, overrides=overrides):
            torch.manual_seed(0)
            with torch.device(device):
                vae = AutoencoderKLWan(**shape["vae"]).to(shape["dtype"]).eval()
            perf = PerfConfig(compile_backend=s.a.compile_backend, **overrides)
            apply_vae_perf(vae, perf)
            reset_peak_memory(device)
            with torch.no_grad():
                sec, _, out = time_call(lambda: decode_latents(vae, z, chunk_frames=perf.vae_chunk_frames), device=device,
                                        warmup=2 if perf.vae_compile else 1, repeats=1)
            row = {"seconds": sec, "peak_memory_gib": peak_memory_bytes(device) / 2**30, "frames": out.shape[2]}
            if name == "plain":
                plain["out"] = out
            else:
                row["rel_error_vs_plain"] = relative_error(out, plain["out"])
            return row

        s.row(stage, name, run, needs_s=s.a.vae_row_s * (3 if "vae_compile" in overrides else 1))


# -- 6. APT training step ------------------------------------------------------------------------------------
def stage_train_step(s: Sweep, device: torch.device, shape: dict) -> None:
    spec = importlib.util.spec_from_file_location("benchmark_train_step", Path(__file__).with_name("benchmark_train_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tmp = s.out.with_name(s.out.stem + "_train_step.json")
    for name, policy, perf in TRAIN_ROWS:
        def run(policy=policy, perf=perf):
            argv = ["--flavour", shape["flavour"], "--device", device.type, "--video", shape["train_video"], "--text-tokens", str(shape["text_tokens"]),
                    "--checkpoint-policy", policy, "--no-flop-counter", "--warmup", "1", "--repeats", "1", "--json", str(tmp), "--perf", *perf]
            if not s.a.tiny:
                argv += ["--depth", str(s.a.train_depth)]
            bench.main(argv)
            r = json.loads(tmp.read_text())
            return {"depth": r["settings"]["depth"], "policy": policy, "perf": perf, "seconds": r["seconds"], "mfu": r["mfu"], "hfu": r["hfu"],
                    "achieved_model_tflops_per_s": r["achieved_model_tflops_per_s"], "peak_memory_gib": r["peak_memory_bytes"] / 2**30}

        s.row("train_step", name, run, needs_s=s.a.train_row_s)
    tmp.unlink(missing_ok=True)


def summarize(s: Sweep) -> None:
    st = s.report["stages"]

    def best(stage: str):
        ok = {k: v for k, v in st.get(stage, {}).items() if isinstance(v, dict) and "seconds" in v and not k.startswith("padded")}
        return min(ok.items(), key=lambda kv: kv[1]["seconds"]) if ok else None

    dit = [b for b in (best("dit"), best("dit_compiled")) if b]
    dit = min(dit, key=lambda kv: kv[1]["seconds"]) if dit else None
    vae = [b for b in (best("vae"), best("vae_compiled")) if b]
    vae = min(vae, key=lambda kv: kv[1]["seconds"]) if vae else None
    mfu = {k: v.get("mfu") for k, v in st.get("train_step", {}).items() if isinstance(v, dict)}
    summary = {"fastest_dit": dit and {"row": dit[0], "seconds": dit[1]["seconds"]}, "fastest_vae": vae and {"row": vae[0], "seconds": vae[1]["seconds"]}, "mfu": mfu}
    if dit and vae:
        summary["dit_plus_vae_seconds"] = dit[1]["seconds"] + vae[1]["seconds"]  # separately measured stages added
    if not s.a.tiny and dit:
        summary["meets"] = {
            "dit": dit[1]["seconds"] <= TARGETS["dit_seconds"],
            "total_without_text": bool(vae) and summary.get("dit_plus_vae_seconds", 1e9) <= TARGETS["total_seconds"],
            "mfu": any(v is not None and v >= TARGETS["mfu"] for v in mfu.values()),
        }
    s.report["summary"] = summary
    s.write()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON report (rewritten after every row)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (rehearsal); quantised kernels emulated")
    p.add_argument("--device", default=None, help="default: cuda if available (tiny: cpu)")
    p.add_argument("--time-limit", type=float, default=450.0, help="seconds; rows that would not fit are recorded as skipped")
    p.add_argument("--stages", default="environment,attention,linears,dit,vae,train_step,dit_compiled,vae_compiled")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per row after the warm-up (median)")
    p.add_argument("--error-rows", type=int, default=512, help="queries / rows compared against fp32")
    p.add_argument("--attention-shape", default=None, help="heads,tokens,head_dim of the attention stage (default: the DiT's)")
    p.add_argument("--train-depth", type=int, default=4, help="layers of the apt-8b-wide G and D in the train-step stage")
    p.add_argument("--compile-backend", default=None, help="default inductor (tiny: eager)")
    p.add_argument("--dit-row-s", type=float, default=None, help="time a DiT row needs (default 25 on GPU, 1 tiny)")
    p.add_argument("--vae-row-s", type=float, default=None, help="default 15 on GPU, 2 tiny")
    p.add_argument("--train-row-s", type=float, default=None, help="default 40 on GPU, 5 tiny")
    a = p.parse_args(argv)
    a.device = a.device or ("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    a.compile_backend = a.compile_backend or ("eager" if a.tiny else "inductor")
    for key, gpu, tiny in (("dit_row_s", 25.0, 1.0), ("vae_row_s", 15.0, 2.0), ("train_row_s", 40.0, 5.0)):
        if getattr(a, key) is None:
            setattr(a, key, tiny if a.tiny else gpu)
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    s = Sweep(a)
    device, shape = torch.device(a.device), dict(TINY if a.tiny else FULL)
    if device.type == "cpu" and not a.tiny:
        raise SystemExit("the full-size sweep needs a GPU; use --tiny for the CPU rehearsal")
    stages = a.stages.split(",")
    base, plain = None, {}
    for stage in stages:
        print(f"== {stage} ({s.left():.0f} s left)", flush=True)
        if stage == "environment":
            stage_environment(s, device)
        elif stage == "attention":
            stage_attention(s, device, shape)
        elif stage == "linears":
            stage_linears(s, device, shape)
        elif stage in ("dit", "dit_compiled"):
            if base is None:
                torch.manual_seed(0)
                with torch.device(device):
                    base = build_dit(shape["flavour"], text_dim=shape["text_dim"], in_channels=16, patch_size=PATCH).to(shape["dtype"])
                    randomize_zero_init(base)
                base.eval()
            rows = DIT_ROWS if stage == "dit" else [(n, o) for n, o in COMPILED_ROWS]
            if stage == "dit_compiled" and "full" not in plain:
                rows = [DIT_ROWS[0], *rows]
            stage_dit(s, device, shape, rows, stage, base, plain)
        elif stage in ("vae", "vae_compiled"):
            base = None  # free the DiT's memory for the decode; rebuilt if a later stage needs it
            plain.clear()
            _free()
            stage_vae(s, device, shape, VAE_ROWS if stage == "vae" else VAE_COMPILED_ROWS, stage)
        elif stage == "train_step":
            base = None
            _free()
            stage_train_step(s, device, shape)
        else:
            raise SystemExit(f"unknown stage {stage!r}")
    summarize(s)
    print(json.dumps(s.report["summary"], indent=1, default=str))
    return s.report


if __name__ == "__main__":
    main()
