"""Streaming speed of a causal DiT with random weights: latency to the first chunk, chunks per second, memory.

    # GPU (docs/streaming.md's rows; bf16)
    python eval/stream_timing.py --shape wan-1.3b --device cuda --json reports/stream_wan13b_h100.json   # 832x480
    python eval/stream_timing.py --shape apt-8b --device cuda --json reports/stream_apt8b_h100.json      # 736x416
    # CPU smoke run
    python eval/stream_timing.py --shape tiny --device cpu

The DiT is built from a config (no downloads) in causal mode with one latent frame per chunk (4 video frames
for an 8x/4x VAE, AAPT's one forward per latent frame), an attention sink of 1 latent frame and a rolling
window (``--window``, default 20 latent frames: ~5 s of 16 fps video). Text: ``--text-tokens`` random
embeddings. Reported, batch 1: seconds to the first chunk (text keys and values included), the median
seconds of a chunk once the window is full and the frames per second it gives, the seconds of one
bidirectional one-step forward over a training-length clip (sink + window + 1 latent frames, the whole-clip
generator's first output), and the peak memory of a stream 1x and 16x that length (CUDA: max allocated).
The VAE decode of each chunk is not included (``apt.streaming.ChunkDecoder``; eval/benchmark_inference.py times
the decoder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from apt.models.backbone import TextCond  # noqa: E402
from apt.models.dit import DiT, DiTConfig  # noqa: E402
from apt.models.registry import FLAVOURS  # noqa: E402
from apt.perf.bench import environment, peak_memory_bytes, randomize_zero_init, reset_peak_memory, sync  # noqa: E402
from apt.streaming import ChunkStepper  # noqa: E402

# (DiT shape, (height, width) in pixels); latent = pixels / 8, 16 channels, patch 1x2x2.
SHAPES = {
    # Wan 2.1 1.3B's transformer shape (width 1536, 30 layers, 12 heads, FFN 8960) as a built-in DiT.
    "wan-1.3b": (DiTConfig(in_channels=16, patch_size=(1, 2, 2), hidden_dim=1536, depth=30, num_heads=12, mlp_ratio=8960 / 1536,
                           text_dim=4096, prediction="velocity", abs_pos_embed=False), (480, 832)),
    "apt-8b": (FLAVOURS["apt-8b"], (416, 736)),
    "tiny": (DiTConfig(in_channels=16, patch_size=(1, 2, 2), hidden_dim=64, depth=2, num_heads=2, text_dim=64, prediction="velocity",
                       abs_pos_embed=False), (64, 96)),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--window", type=int, default=20, help="rolling window, latent frames (the sink is 1 more)")
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--chunks", type=int, default=48, help="chunks streamed for the per-chunk time (the window fills first)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    shape, (height, width) = SHAPES[args.shape]
    torch.manual_seed(0)
    net = DiT(replace(shape, causal_chunk_frames=1, sink_chunks=1, window_chunks=args.window))
    randomize_zero_init(net)
    net = net.to(device, dtype).eval()
    latent = (16, height // 8, width // 8)
    text = TextCond(torch.randn(1, args.text_tokens, shape.text_dim, device=device, dtype=dtype),
                    torch.ones(1, args.text_tokens, dtype=torch.bool, device=device))
    train_chunks = net.config.max_chunks

    def stream(chunks: int, per_chunk: list[float] | None = None) -> float:
        """Seconds to the first chunk of a new stream; per-chunk seconds appended to ``per_chunk``."""
        t0 = time.perf_counter()
        stepper = ChunkStepper(net, text, height=latent[1], width=latent[2])
        prev, first = torch.zeros(1, latent[0], 1, *latent[1:], device=device, dtype=dtype), None
        for _ in range(chunks):
            t1 = time.perf_counter()
            prev, _ = stepper.step(torch.randn(1, latent[0], 1, *latent[1:], device=device, dtype=dtype), prev)
            sync(device)
            if first is None:
                first = time.perf_counter() - t0
            if per_chunk is not None:
                per_chunk.append(time.perf_counter() - t1)
        return first

    with torch.inference_mode():
        stream(2)  # warm-up
        firsts = [stream(1) for _ in range(5)]
        per_chunk: list[float] = []
        stream(args.chunks, per_chunk)
        steady = sorted(per_chunk[train_chunks:])[len(per_chunk[train_chunks:]) // 2]
        whole = DiT(replace(shape)).to(device, dtype).eval()  # the bidirectional model, one step over a training-length clip
        z = torch.randn(1, latent[0], train_chunks, *latent[1:], device=device, dtype=dtype)
        t1 = torch.ones(1, device=device, dtype=dtype)
        whole(z, t1, text)
        sync(device)
        t0 = time.perf_counter()
        whole(z, t1, text)
        sync(device)
        whole_seconds = time.perf_counter() - t0
        del whole
        peaks = {}
        for k in (1, 16):
            reset_peak_memory(device)
            stream(k * train_chunks)
            peaks[k] = peak_memory_bytes(device)
    first = sorted(firsts)[len(firsts) // 2]
    result = {"shape": args.shape, "height": height, "width": width, "latent": list(latent), "dtype": str(dtype),
              "tokens_per_chunk": (latent[1] // 2) * (latent[2] // 2), "window_latent_frames": args.window, "text_tokens": args.text_tokens,
              "first_chunk_seconds": first, "steady_chunk_seconds": steady, "fps": 4 / steady,
              "whole_training_clip_one_step_seconds": whole_seconds, "first_chunk_over_whole_clip": first / whole_seconds,
              "peak_bytes_1x": peaks[1], "peak_bytes_16x": peaks[16], "memory_16x_over_1x": peaks[16] / peaks[1],
              "environment": environment(device)}
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
