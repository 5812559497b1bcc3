"""One-step inference speed: text encoding, DiT forward at t = 1, VAE decode; per stage.

    # GPU (the paper's setting: 2 s 1280x720 24 fps = 49 frames, and 1024px images; bf16)
    python eval/benchmark_inference.py --flavour apt-8b --device cuda --json reports/speed_h100.json
    python eval/benchmark_inference.py --flavour apt-8b --device cuda --perf compile=true fp8=true
    # CPU (demo width/depth with the production patching, small sizes, float32)
    python eval/benchmark_inference.py --flavour demo --threads 1

Everything is built from configs with random weights (no downloads): the DiT from the flavour
registry (16 latent channels, patch 1x2x2), a diffusers ``AutoencoderKLWan`` (the Wan 2.1 VAE
config on GPU, a tiny config on CPU: 8x spatial / 4x temporal compression either way, so a
4k + 1-frame clip has k + 1 latent frames) and a text encoder (the toy T5 of ``apt.text`` on CPU;
on GPU a T5-XXL-shaped encoder run on random token ids, i.e. without tokenisation).

Reported per stage: median wall time of ``--repeats`` calls after ``--warmup`` (device synced),
FLOPs counted analytically (DiT: ``apt.models.flops``) and by ``FlopCounterMode`` (one extra,
untimed call, eager), achieved TFLOP/s, peak memory (CUDA: max allocated per stage; CPU: the
process's peak RSS so far) and, for the paper's exact setting on CUDA, the ratio to the paper's
single-H100 figures (text 0.28 s, DiT 2.65 s, VAE 3.10 s, total 6.03 s) and our targets.
Speed switches: ``--perf key=value`` (``apt.config.PerfConfig``), applied by ``apt.perf.apply_perf``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from apt.models import TextCond, build_dit  # noqa: E402
from apt.models.flops import count_flops, dit_forward_flops, visual_tokens  # noqa: E402
from apt.perf import apply_perf, perf_from_overrides  # noqa: E402
from apt.perf.bench import (  # noqa: E402
    PAPER_1xH100_SECONDS,
    environment,
    peak_memory_bytes,
    randomize_zero_init,
    relative_error,
    reset_peak_memory,
    time_call,
)
from apt.perf.vae import decode_latents  # noqa: E402

TARGETS_SECONDS = {"dit": 2.3, "total": 4.0}  # the speed targets: one H100, 720p/49f, one step (docs/performance.md)
PAPER_VIDEO = (49, 720, 1280)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Tiny Wan-layout VAE for CPU runs: same 8x / 4x compression and causal decoder, base width 8.
TINY_WAN_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True])
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavour", default=None, help="tiny | demo | apt-8b (default: apt-8b on CUDA, demo on CPU)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--modes", default="video,image", help="comma list of video,image")
    p.add_argument("--video", default=None, help="frames,height,width in pixels (default 49,720,1280 on CUDA; 17,128,128 on CPU)")
    p.add_argument("--image", default=None, help="height,width in pixels (default 1024,1024 on CUDA; 128,128 on CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vae", default=None, choices=["wan2.1", "tiny"], help="VAE config (default wan2.1 on CUDA, tiny on CPU)")
    p.add_argument("--text-encoder", default=None, choices=["t5-xxl", "toy-t5"], help="default t5-xxl on CUDA, toy-t5 on CPU")
    p.add_argument("--text-tokens", type=int, default=256, help="token count fed to the t5-xxl-shaped encoder")
    p.add_argument("--depth", type=int, default=None, help="override the flavour's depth (quick runs)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--perf", nargs="*", default=[], metavar="KEY=VALUE", help="PerfConfig fields, e.g. compile=true fp8=true")
    p.add_argument("--compare-plain", action="store_true", help="also run a plain copy of the DiT and report the output's relative error")
    p.add_argument("--no-flop-counter", action="store_true", help="skip the FlopCounterMode pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results table here")
    p.add_argument("--analytic-only", action="store_true", help="print analytic FLOPs, the paper-implied rates and the multi-GPU model; run nothing")
    p.add_argument("--num-gpus", default="1,2,4,8", help="GPU counts for the --analytic-only scaling model")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available() if a.device is None else a.device.startswith("cuda")
    big = cuda or a.analytic_only  # production shapes
    a.device = a.device or ("cuda" if cuda else "cpu")
    a.flavour = a.flavour or ("apt-8b" if big else "demo")
    a.dtype = a.dtype or ("bf16" if cuda else "fp32")
    a.vae = a.vae or ("wan2.1" if cuda else "tiny")
    a.text_encoder = a.text_encoder or ("t5-xxl" if cuda else "toy-t5")
    a.video = tuple(int(v) for v in (a.video or ("49,720,1280" if big else "17,128,128")).split(","))
    a.image = tuple(int(v) for v in (a.image or ("1024,1024" if big else "128,128")).split(","))
    if a.device.startswith("cuda") and not torch.cuda.is_available() and not a.analytic_only:
        p.error("--device cuda but torch.cuda.is_available() is False")
    if (a.video[0] - 1) % 4:
        p.error(f"--video frames must be 4k + 1 for a 4x temporal VAE, got {a.video[0]}")
    return a


# -- building --------------------------------------------------------------------------------------
def build_text_encoder(a: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(encode() -> TextCond, text dim, token count, description)."""
    if a.text_encoder == "toy-t5":
        from apt.text import TextEncoder

        enc = TextEncoder.load("toy-t5")  # stays on CPU: its tokenizer output is a CPU tensor
        prompts = ["a red circle moves left on a blue background"] * a.batch

        def encode() -> TextCond:
            enc._cache.clear()  # time the encoder, not the per-caption cache
            return enc.encode(prompts).to(device, dtype)

        return encode, enc.dim, encode().emb_BLD.shape[1], "toy-t5 (apt.text: tokenizer + 2-layer T5, width 64)"
    from transformers import T5Config, T5EncoderModel

    with torch.device(device), _default_dtype(dtype):
        model = T5EncoderModel(T5Config(**T5_XXL)).eval()
    ids = torch.randint(0, T5_XXL["vocab_size"], (a.batch, a.text_tokens), device=device, generator=torch.Generator(device).manual_seed(a.seed))
    mask = torch.ones_like(ids, dtype=torch.bool)

    def encode() -> TextCond:
        return TextCond(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)

    return encode, T5_XXL["d_model"], a.text_tokens, f"T5-XXL-shaped encoder (random weights) on {a.text_tokens} random token ids, no tokeniser"


def build_vae(a: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan

    config = {} if a.vae == "wan2.1" else TINY_WAN_VAE  # AutoencoderKLWan's defaults are the Wan 2.1 VAE
    torch.manual_seed(a.seed)
    with torch.device(device), _default_dtype(dtype):
        vae = AutoencoderKLWan(**config).eval()
    return vae, f"AutoencoderKLWan({'Wan 2.1 config' if not config else config}), random weights"


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build parameters directly in ``dtype`` (an 8B model in fp32 first would need 32 GB)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_net(a: argparse.Namespace, text_dim: int, device: torch.device, dtype: torch.dtype):
    overrides = dict(text_dim=text_dim, in_channels=16, patch_size=(1, 2, 2))
    if a.depth:
        overrides["depth"] = a.depth
    torch.manual_seed(a.seed)
    with torch.device(device), _default_dtype(dtype):
        net = build_dit(a.flavour, **overrides)
        randomize_zero_init(net)
    return net.eval()


# -- measuring -------------------------------------------------------------------------------------
def counted_flops(fn) -> float | None:
    """FlopCounterMode over one eager call (compiled regions forced eager so every op is seen)."""
    with torch.compiler.set_stance("force_eager"):
        return float(count_flops(fn)[0])


def run_mode(a, mode: str, *, encode, text_tokens: int, net, plain_net, vae, device, dtype, perf) -> dict:
    frames, height, width = a.video if mode == "video" else (1, *a.image)
    t_z, h_z, w_z = (frames - 1) // 4 + 1, height // 8, width // 8
    g = torch.Generator(device).manual_seed(a.seed)
    z = torch.randn(a.batch, 16, t_z, h_z, w_z, generator=g, device=device, dtype=dtype)
    t1 = torch.ones(a.batch, device=device)
    text = encode()
    latents_mean = torch.tensor(vae.config.latents_mean, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    latents_std = torch.tensor(vae.config.latents_std, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    base_net = getattr(net, "module", net)  # the CUDA-graph wrapper keeps the network in .module

    def dit():
        return z - net(z, t1, text)  # G(z, c) = z - v(z, c, 1): one step

    def decode(x0):
        return decode_latents(vae, x0 * latents_std + latents_mean, chunk_frames=perf.vae_chunk_frames)

    stages = {}
    with torch.no_grad():
        x0 = dit()
        for name, fn in (("text", encode), ("dit", dit), ("vae", lambda: decode(x0))):
            reset_peak_memory(device)
            seconds, times, _ = time_call(fn, device=device, warmup=a.warmup, repeats=a.repeats)
            stages[name] = {"seconds": seconds, "all_seconds": times, "peak_memory_bytes": peak_memory_bytes(device)}
        analytic = dit_forward_flops(base_net.config, batch=a.batch, frames=t_z, height=h_z, width=w_z, text_tokens=text_tokens)
        stages["dit"]["flops_analytic"] = analytic.total
        stages["dit"]["flops_analytic_attention"] = analytic.attention
        if not a.no_flop_counter:
            stages["text"]["flops_counted"] = counted_flops(encode)
            stages["dit"]["flops_counted"] = counted_flops(lambda: z - base_net(z, t1, text))
            stages["vae"]["flops_counted"] = counted_flops(lambda: decode(x0))
        if plain_net is not None:
            stages["dit"]["relative_error_vs_plain"] = relative_error(dit(), z - plain_net(z, t1, text))
    for s in stages.values():
        flops = s.get("flops_analytic", s.get("flops_counted"))
        s["tflops_per_s"] = flops / s["seconds"] / 1e12 if flops else None
    total = sum(s["seconds"] for s in stages.values())
    paper_setting = mode == "video" and a.flavour == "apt-8b" and (frames, height, width) == PAPER_VIDEO and a.batch == 1 and not a.depth
    row = {
        "mode": mode, "pixels": [frames, height, width], "latent": [16, t_z, h_z, w_z],
        "visual_tokens": visual_tokens(base_net.config, frames=t_z, height=h_z, width=w_z), "text_tokens": text_tokens,
        "stages": stages, "total_seconds": total, "paper_setting": paper_setting,
    }
    if paper_setting and device.type == "cuda":
        row["ratio_to_paper"] = {k: (stages[k]["seconds"] if k != "total" else total) / v for k, v in PAPER_1xH100_SECONDS.items()}
        row["meets_targets"] = {"dit": stages["dit"]["seconds"] <= TARGETS_SECONDS["dit"], "total": total <= TARGETS_SECONDS["total"]}
    return row


# -- analytic (no run) -----------------------------------------------------------------------------
def analytic_report(a: argparse.Namespace) -> dict:
    """Analytic DiT FLOPs at the benchmark shapes, the rate the paper's 2.65 s implies, the rate our
    target needs, and the multi-GPU scaling model on the paper's single-H100 stage times."""
    from apt.models.registry import FLAVOURS
    from apt.perf.bench import H100_BF16_DENSE_TFLOPS, PAPER_8xH100_TOTAL_SECONDS
    from apt.perf.scaling import multi_gpu_estimate

    c = replace(FLAVOURS[a.flavour], in_channels=16, patch_size=(1, 2, 2), **({"depth": a.depth} if a.depth else {}))
    out: dict = {"flavour": a.flavour, "text_tokens": a.text_tokens, "rows": []}
    print(f"analytic forward FLOPs of {a.flavour} (depth {c.depth}, width {c.hidden_dim}), {a.text_tokens} text tokens, batch {a.batch} (computed, not measured)")
    for mode, (frames, height, width) in (("video", a.video), ("image", (1, *a.image))):
        t_z, h_z, w_z = (frames - 1) // 4 + 1, height // 8, width // 8
        f = dit_forward_flops(c, batch=a.batch, frames=t_z, height=h_z, width=w_z, text_tokens=a.text_tokens)
        n = visual_tokens(c, frames=t_z, height=h_z, width=w_z)
        out["rows"].append({"mode": mode, "pixels": [frames, height, width], "visual_tokens": n, "flops": f.total, "attention_flops": f.attention})
        print(f"  {mode} {frames}x{height}x{width}: {n} visual tokens, {f.total / 1e15:.4g} PFLOP ({100 * f.attention / f.total:.0f}% attention)")
    video = out["rows"][0]
    paper_rate = video["flops"] / PAPER_1xH100_SECONDS["dit"]
    target_rate = video["flops"] / TARGETS_SECONDS["dit"]
    print(f"paper's DiT 2.65 s on one H100 implies {paper_rate / 1e12:.0f} TFLOP/s = {100 * paper_rate / 1e12 / H100_BF16_DENSE_TFLOPS:.0f}% of {H100_BF16_DENSE_TFLOPS:g} (bf16 dense)")
    print(f"our target DiT <= {TARGETS_SECONDS['dit']} s needs {target_rate / 1e12:.0f} TFLOP/s = {100 * target_rate / 1e12 / H100_BF16_DENSE_TFLOPS:.0f}% of bf16 peak")
    out.update(paper_implied_tflops=paper_rate / 1e12, target_tflops=target_rate / 1e12)
    frames, height, width = a.video
    seq = video["visual_tokens"] + a.text_tokens
    print(f"multi-GPU model (apt.perf.scaling) on the paper's 1-H100 stage times, S = {seq}, NVLink 450 GB/s per direction, VAE tile halo 8 latent px:")
    print(f"  {'GPUs':>4} {'text s':>7} {'DiT s':>7} {'(comm s)':>9} {'VAE s':>7} {'grid':>5} {'total s':>8}")
    out["multi_gpu"] = []
    for n in (int(v) for v in a.num_gpus.split(",")):
        e = multi_gpu_estimate(num_gpus=n, text_s=PAPER_1xH100_SECONDS["text"], dit_s=PAPER_1xH100_SECONDS["dit"], vae_s=PAPER_1xH100_SECONDS["vae"],
                               seq_len=seq, width=c.hidden_dim, layers=c.depth, latent_hw=(height // 8, width // 8))
        out["multi_gpu"].append(e)
        print(f"  {n:>4} {e['text_s']:>7.3f} {e['dit_s']:>7.3f} {e['dit_comm_s']:>9.4f} {e['vae_s']:>7.3f} {e['vae_tile_grid']:>5} {e['total_s']:>8.3f}")
    print(f"  (paper, 8 H100, measured by its authors: {PAPER_8xH100_TOTAL_SECONDS} s total)")
    return out


# -- reporting -------------------------------------------------------------------------------------
def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def print_table(result: dict) -> None:
    env, s = result["environment"], result["settings"]
    cuda = env["device"] == "cuda"
    unit, prefix = (1e12, "T") if cuda else (1e9, "G")
    mem = "peak alloc GiB" if cuda else "peak RSS GiB"
    print(f"device: {env['device_name']} ({env['device']}) | torch {env['torch']} | CUDA {env['cuda']} | threads {env['torch_threads']}")
    print(f"model: {s['flavour']} ({s['params'] / 1e6:.4g}M params, depth {s['depth']}, width {s['width']}) {s['dtype']} | "
          f"text: {s['text_encoder']} | vae: {s['vae']}")
    print(f"perf: {s['perf']} | batch {s['batch']} | median of {s['repeats']} after {s['warmup']} warm-up")
    for row in result["rows"]:
        f, h, w = row["pixels"]
        print(f"\n{row['mode']} {f}x{h}x{w} -> latent {'x'.join(map(str, row['latent']))}, {row['visual_tokens']} visual + {row['text_tokens']} text tokens")
        print(f"{'stage':<6} {'seconds':>9} {prefix + 'FLOP analytic':>15} {prefix + 'FLOP counted':>14} {prefix + 'FLOP/s':>9} {mem:>14} {'paper s':>8} {'ratio':>6}")
        paper = row.get("ratio_to_paper")
        for name, st in row["stages"].items():
            ratio = _fmt(paper[name], ".2f") if paper else "n/a"
            analytic = st.get("flops_analytic") and st["flops_analytic"] / unit
            counted = st.get("flops_counted") and st["flops_counted"] / unit
            rate = st["tflops_per_s"] and st["tflops_per_s"] * 1e12 / unit
            print(f"{name:<6} {st['seconds']:>9.4f} {_fmt(analytic, '>15.4g'):>15} {_fmt(counted, '>14.4g'):>14} {_fmt(rate, '>9.4g'):>9} "
                  f"{st['peak_memory_bytes'] / 2**30:>14.2f} {PAPER_1xH100_SECONDS[name]:>8.2f} {ratio:>6}")
        ratio = _fmt(paper["total"], ".2f") if paper else "n/a"
        print(f"{'total':<6} {row['total_seconds']:>9.4f} {'':>15} {'':>14} {'':>9} {'':>14} {PAPER_1xH100_SECONDS['total']:>8.2f} {ratio:>6}")
        if "relative_error_vs_plain" in row["stages"]["dit"]:
            print(f"DiT output relative error vs the plain path: {row['stages']['dit']['relative_error_vs_plain']:.3g}")
        if "meets_targets" in row:
            print(f"targets (DiT <= {TARGETS_SECONDS['dit']} s, total <= {TARGETS_SECONDS['total']} s): {row['meets_targets']}")
        elif not row["paper_setting"]:
            print("ratio n/a: not the paper's setting (apt-8b, 49x720x1280, batch 1, one H100)")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.analytic_only:
        result = analytic_report(a)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(result, indent=2))
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    perf = perf_from_overrides(a.perf)
    encode, text_dim, text_tokens, text_desc = build_text_encoder(a, device, dtype)
    vae, vae_desc = build_vae(a, device, dtype)
    net = build_net(a, text_dim, device, dtype)
    plain_net = copy.deepcopy(net) if a.compare_plain else None
    params = sum(p.numel() for p in net.parameters())
    net = apply_perf(net, perf)
    base = getattr(net, "module", net)
    result = {
        "environment": environment(device),
        "settings": {
            "flavour": a.flavour, "depth": base.config.depth, "width": base.config.hidden_dim, "params": params, "dtype": a.dtype,
            "batch": a.batch, "warmup": a.warmup, "repeats": a.repeats, "text_encoder": text_desc, "vae": vae_desc, "perf": asdict(perf),
            "command": " ".join(["python", *sys.argv]),
        },
        "paper_1xH100_seconds": PAPER_1xH100_SECONDS, "targets_seconds": TARGETS_SECONDS,
        "rows": [run_mode(a, m, encode=encode, text_tokens=text_tokens, net=net, plain_net=plain_net, vae=vae, device=device, dtype=dtype, perf=perf)
                 for m in a.modes.split(",")],
    }
    print_table(result)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
