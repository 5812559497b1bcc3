"""Training throughput of one APT update (one D step + one G step), with MFU.

    # CPU: demo width/depth with the production patching, small clips, float32
    python eval/benchmark_train_step.py --flavour demo --threads 1
    # GPU: the production width at 720p/49f; a few layers fit one GPU without sharding
    python eval/benchmark_train_step.py --flavour apt-8b --device cuda --depth 8 --json reports/train_step_h100.json

The step is the one training runs, ``apt.methods.apt.apt_step``, with plain torch optimisers: (1) D step:
one-step fakes from G without grad, D on [real, real + sigma n, fake] (one batched forward),
non-saturating loss + approximate R1, backward, RMSProp step; (2) G step: G forward, D frozen,
non-saturating G loss, backward through D into G, RMSProp step; (3) the EMA update. The D step is
timed alone (a step still in D's warm-up), the G step as the whole step's time minus it.
Activation checkpointing is on for G and D (``--no-checkpointing`` to turn off). Networks are built
from the flavour registry with random weights (16 latent channels, patch 1x2x2); real clips and
text embeddings are random tensors of the right shapes (pre-encoded data, as training reads it).

MFU = model FLOPs of the step (``apt.models.flops.apt_step_flops``: backward = 2x forward, no
recomputation) / (step time x peak FLOP/s). The peak is ``--peak-tflops`` (default 989, H100 SXM
bf16 dense, on CUDA); on CPU there is no peak figure, so MFU prints "n/a" unless you pass one.
HFU (hardware FLOPs utilisation) adds checkpoint recomputation and the attention backward's score
recomputation. FlopCounterMode counts the same step once (untimed) as a check.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from apt.config import AptConfig  # noqa: E402
from apt.ema import ema_update  # noqa: E402
from apt.methods.apt import AptProgress, apt_step, build_discriminator, make_optimizer  # noqa: E402
from apt.methods.update import OptimizerUpdate  # noqa: E402
from apt.models import TextCond, build_dit  # noqa: E402
from apt.models.flops import apt_step_flops, count_flops, visual_tokens  # noqa: E402
from apt.perf import apply_perf, perf_from_overrides  # noqa: E402
from apt.perf.bench import (  # noqa: E402
    H100_BF16_DENSE_TFLOPS,
    environment,
    peak_memory_bytes,
    randomize_zero_init,
    reset_peak_memory,
    time_call,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
READOUT_FRACTIONS = [16 / 36, 26 / 36, 1.0]  # APT: layers 16, 26, 36 of 36


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavour", default=None, help="tiny | demo | apt-8b (default: apt-8b on CUDA, demo on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="parameters and activations (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--video", default=None, help="frames,height,width in pixels (default 49,720,1280 on CUDA; 17,128,128 on CPU); 1,H,W = images")
    p.add_argument("--batch", type=int, default=1, help="clips per step (D sees 3x this)")
    p.add_argument("--text-tokens", type=int, default=None, help="default 256 on CUDA, 16 on CPU")
    p.add_argument("--depth", type=int, default=None, help="override the flavour's depth (the 8B model's G + D + optimiser states need sharding beyond ~12 layers on one 80 GB GPU)")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--checkpoint-policy", default="full", choices=["full", "attention", "attention_and_matmul"],
                   help="what checkpointed blocks recompute (apt.models.checkpointing; model.checkpoint_policy)")
    p.add_argument("--r1-sigma", type=float, default=0.1)
    p.add_argument("--peak-tflops", type=float, default=None, help=f"peak FLOP/s for MFU (default {H100_BF16_DENSE_TFLOPS:g} on CUDA = H100 bf16 dense; none on CPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--perf", nargs="*", default=[], metavar="KEY=VALUE", help="PerfConfig fields for G and D (compile, attention_backend, fused_qk_norm_rope)")
    p.add_argument("--no-flop-counter", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available() if a.device is None else a.device.startswith("cuda")
    a.device = a.device or ("cuda" if cuda else "cpu")
    a.flavour = a.flavour or ("apt-8b" if cuda else "demo")
    a.dtype = a.dtype or ("bf16" if cuda else "fp32")
    a.video = tuple(int(v) for v in (a.video or ("49,720,1280" if cuda else "17,128,128")).split(","))
    a.text_tokens = a.text_tokens or (256 if cuda else 16)
    if a.peak_tflops is None and cuda:
        a.peak_tflops = H100_BF16_DENSE_TFLOPS
    if (a.video[0] - 1) % 4:
        p.error(f"--video frames must be 4k + 1 (4x temporal VAE), got {a.video[0]}")
    return a


def apt_config(a: argparse.Namespace) -> AptConfig:
    """The paper's video-stage settings: RMSProp (alpha 0.9) at 3e-6, aR1 lambda 100, D's t-shift 12."""
    return AptConfig(lr_g=3e-6, lr_d=3e-6, optimizer="rmsprop", r1_lambda=100.0, r1_sigma=a.r1_sigma, d_timestep_shift=12.0,
                     readout_fractions=READOUT_FRACTIONS)


def build(a: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(G, D, optimiser G, optimiser D), random weights, paper optimiser (RMSProp alpha 0.9)."""
    overrides = dict(in_channels=16, patch_size=(1, 2, 2), text_dim=64 if a.flavour != "apt-8b" else 4096)
    if a.depth:
        overrides["depth"] = a.depth
    perf = perf_from_overrides(a.perf)
    nets = []
    for seed in (a.seed, a.seed + 1):
        torch.manual_seed(seed)
        with torch.device(device):
            net = build_dit(a.flavour, **overrides)
            randomize_zero_init(net)
        net = net.to(dtype).train()
        net.gradient_checkpointing, net.checkpoint_policy = not a.no_checkpointing, a.checkpoint_policy
        nets.append(apply_perf(net, perf))
    G, backbone = nets
    cfg = apt_config(a)
    D = build_discriminator(backbone, cfg).to(device, dtype)
    return G, D, make_optimizer(G.parameters(), cfg.lr_g, cfg), make_optimizer(D.parameters(), cfg.lr_d, cfg), perf


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    G, D, opt_g, opt_d, perf = build(a, device, dtype)
    frames, height, width = a.video
    latent = (16, (frames - 1) // 4 + 1, height // 8, width // 8)
    B = a.batch
    gen = torch.Generator(device).manual_seed(a.seed)
    x_real = torch.randn(B, *latent, generator=gen, device=device, dtype=dtype)
    text = TextCond(torch.randn(B, a.text_tokens, G.config.text_dim, generator=gen, device=device, dtype=dtype), torch.ones(B, a.text_tokens, dtype=torch.bool, device=device))
    cfg, times = apt_config(a), {}
    G_ema = copy.deepcopy(G).requires_grad_(False)  # training holds one too
    seeds = iter(range(10**9))

    def run(progress: AptProgress) -> None:
        """One ``apt_step`` on the fixed batch; ``progress`` decides whether it reaches the G step and the EMA."""
        apt_step(G, D, [(x_real, text)], update_g=OptimizerUpdate(opt_g, G), update_d=OptimizerUpdate(opt_d, D),
                 update_ema=lambda decay: ema_update(G_ema, G, decay), a=cfg, progress=progress, step_seed=next(seeds))

    d_only = AptProgress()  # d_updates stays below the warm-up: D steps only
    cfg.d_warmup_steps = 10**9
    reset_peak_memory(device)
    times["d_step"] = time_call(lambda: run(d_only), device=device, warmup=a.warmup, repeats=a.repeats)[0]
    cfg.d_warmup_steps = 0
    full = time_call(lambda: run(AptProgress()), device=device, warmup=a.warmup, repeats=a.repeats)[0]
    times["g_step"] = full - times["d_step"]
    step_seconds = times["d_step"] + times["g_step"]
    peak = peak_memory_bytes(device)

    shape = dict(frames=latent[1], height=latent[2], width=latent[3], text_tokens=a.text_tokens)
    flops = apt_step_flops(G.config, batch=B, readout_layers=D.layers, checkpointing=not a.no_checkpointing, checkpoint_policy=a.checkpoint_policy, **shape)
    counted = None
    if not a.no_flop_counter:
        try:
            with torch.compiler.set_stance("force_eager"):
                counted = float(count_flops(lambda: run(AptProgress()))[0])
        except torch.OutOfMemoryError:  # the counting pass needs ~16 GiB more than the timed steps (H100, apt-8b depth 8)
            torch.cuda.empty_cache()
            print("FlopCounterMode pass skipped: out of GPU memory (the step timings are unaffected)", file=sys.stderr)
    achieved = flops["model"] / step_seconds
    result = {
        "environment": environment(device),
        "settings": {
            "flavour": a.flavour, "depth": G.config.depth, "width": G.config.hidden_dim, "dtype": a.dtype, "batch": B,
            "pixels": list(a.video), "latent": list(latent), "visual_tokens": visual_tokens(G.config, **{k: shape[k] for k in ("frames", "height", "width")}),
            "text_tokens": a.text_tokens, "checkpointing": not a.no_checkpointing, "checkpoint_policy": a.checkpoint_policy, "readout_layers": D.layers,
            "params_G": sum(p.numel() for p in G.parameters()), "params_D": sum(p.numel() for p in D.parameters()),
            "perf": asdict(perf), "peak_tflops": a.peak_tflops, "warmup": a.warmup, "repeats": a.repeats,
            "command": " ".join(["python", *sys.argv]),
        },
        "seconds": {**times, "step": step_seconds},
        "flops": {**flops, "counted": counted},
        "achieved_model_tflops_per_s": achieved / 1e12,
        "mfu": achieved / (a.peak_tflops * 1e12) if a.peak_tflops else None,
        "hfu": flops["hardware"] / step_seconds / (a.peak_tflops * 1e12) if a.peak_tflops else None,
        "peak_memory_bytes": peak,
    }
    print_report(result)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {a.json}")
    return 0


def print_report(r: dict) -> None:
    env, s, f = r["environment"], r["settings"], r["flops"]
    cuda = env["device"] == "cuda"
    print(f"device: {env['device_name']} ({env['device']}) | torch {env['torch']} | CUDA {env['cuda']} | threads {env['torch_threads']}")
    print(f"G/D: {s['flavour']} depth {s['depth']} width {s['width']} ({s['params_G'] / 1e6:.4g}M / {s['params_D'] / 1e6:.4g}M params) {s['dtype']}, "
          f"checkpointing {s['checkpointing']}, readout layers {s['readout_layers']}, perf {s['perf']}")
    print(f"batch {s['batch']} clips {s['pixels'][0]}x{s['pixels'][1]}x{s['pixels'][2]} -> latent {'x'.join(map(str, s['latent']))}: "
          f"{s['visual_tokens']} visual + {s['text_tokens']} text tokens | median of {s['repeats']} after {s['warmup']} warm-up")
    sec = r["seconds"]
    print(f"time: D step {sec['d_step']:.4f} s + G step {sec['g_step']:.4f} s = {sec['step']:.4f} s per APT update")
    counted = f"{f['counted'] / 1e9:.4g}" if f["counted"] is not None else "-"
    print(f"FLOPs (GFLOP): model {f['model'] / 1e9:.4g} (D step {f['d_step'] / 1e9:.4g}, G step {f['g_step'] / 1e9:.4g}), "
          f"hardware {f['hardware'] / 1e9:.4g}, FlopCounterMode {counted}")
    rate = r["achieved_model_tflops_per_s"]
    print(f"achieved: {rate * 1e3:.4g} GFLOP/s (model FLOPs)" if not cuda else f"achieved: {rate:.4g} TFLOP/s (model FLOPs)")
    if r["mfu"] is None:
        print("MFU: n/a (no peak FLOP/s figure for this device; pass --peak-tflops)")
    else:
        print(f"MFU: {100 * r['mfu']:.1f}% | HFU: {100 * r['hfu']:.1f}% of {s['peak_tflops']:g} TFLOP/s")
    print(f"peak memory: {r['peak_memory_bytes'] / 2**30:.2f} GiB ({'max allocated' if cuda else 'process peak RSS'})")


if __name__ == "__main__":
    raise SystemExit(main())
