"""Streaming speed of a causal DiT with random weights: latency to the first chunk, chunks per second, memory.

    # GPU (docs/streaming.md's rows; bf16): 832x480 and 736x416, one row each, the JSON rewritten after each
    python eval/stream_timing.py --shape wan-1.3b apt-8b --device cuda --json runs/stream_timing.json
    # CPU smoke run (what tests/test_stream_timing.py runs)
    python eval/stream_timing.py --shape tiny --device cpu --window 4 --chunks 8

The DiT is built from a config (no downloads) in causal mode with one latent frame per chunk (4 video frames
for an 8x/4x VAE, AAPT's one forward per latent frame), an attention sink of 1 latent frame and a rolling
window (``--window``, default 20 latent frames: ~5 s of 16 fps video). Text: ``--text-tokens`` random
embeddings. Reported, batch 1: seconds to the first chunk (text keys and values included), the median
seconds of a chunk once the window is full and the frames per second it gives, the seconds of one
bidirectional one-step forward over a training-length clip (sink + window + 1 latent frames, the whole-clip
generator's first output), and the peak memory of a stream 1x and 16x that length beyond the weights (CUDA: max
allocated less what was allocated before; CPU: the bytes of the tensors the stream creates,
``apt.eval.tensor_memory.PeakTensorMemory``). A shape that fails (out of
memory) is recorded as an error row and the next one runs.
The VAE decode of each chunk is not included (``apt.streaming.ChunkDecoder``; eval/benchmark_inference.py times
the decoder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from apt.eval.tensor_memory import PeakTensorMemory  # noqa: E402
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


def build(config: DiTConfig, device: torch.device, dtype: torch.dtype) -> DiT:
    """A DiT with random weights, built on ``device`` (an 8B model never passes through CPU memory) and cast to ``dtype``."""
    with torch.device(device):
        net = DiT(config)
        randomize_zero_init(net)
    return net.to(dtype).eval()


@torch.inference_mode()
def whole_clip_seconds(shape: DiTConfig, latent: tuple[int, int, int], frames: int, text: TextCond, device: torch.device,
                       dtype: torch.dtype) -> float:
    """Seconds of one bidirectional forward (one step) over ``frames`` latent frames: the whole-clip generator's first output."""
    whole = build(shape, device, dtype)
    z = torch.randn(1, latent[0], frames, *latent[1:], device=device, dtype=dtype)
    t1 = torch.ones(1, device=device, dtype=dtype)
    whole(z, t1, text)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    whole(z, t1, text)
    sync(device)
    return time.perf_counter() - t0


def measure(shape_name: str, device: torch.device, dtype: torch.dtype, *, window: int, text_tokens: int, chunks: int) -> dict:
    """One shape's row (the module docstring lists what is measured)."""
    shape, (height, width) = SHAPES[shape_name]
    torch.manual_seed(0)
    latent = (16, height // 8, width // 8)
    train_chunks = 1 + window + 1  # sink + window + 1: a full cache, the training-length clip timed whole below
    if chunks <= train_chunks:  # before any model is built or timed
        raise ValueError(f"--chunks must exceed the sink + window + 1 = {train_chunks} chunks of a full cache, got {chunks}")
    text = TextCond(torch.randn(1, text_tokens, shape.text_dim, device=device, dtype=dtype),
                    torch.ones(1, text_tokens, dtype=torch.bool, device=device))
    whole_seconds = whole_clip_seconds(shape, latent, train_chunks, text, device, dtype)
    net = build(replace(shape, causal_chunk_frames=1, sink_chunks=1, window_chunks=window), device, dtype)

    def stream(n: int, per_chunk: list[float] | None = None) -> float:
        """Seconds to the first chunk of a new stream; per-chunk seconds appended to ``per_chunk``."""
        t0 = time.perf_counter()
        stepper = ChunkStepper(net, text, height=latent[1], width=latent[2])
        prev, first = torch.zeros(1, latent[0], 1, *latent[1:], device=device, dtype=dtype), None
        for _ in range(n):
            t1 = time.perf_counter()
            prev, _ = stepper.step(torch.randn(1, latent[0], 1, *latent[1:], device=device, dtype=dtype), prev)
            sync(device)
            if first is None:
                first = time.perf_counter() - t0
            if per_chunk is not None:
                per_chunk.append(time.perf_counter() - t1)
        return first

    def peak_bytes(n: int) -> int:
        """Peak memory of an n-chunk stream beyond the weights: CUDA's max allocated less what was allocated before;
        on CPU the bytes of the tensors it creates."""
        if device.type == "cuda":
            before = torch.cuda.memory_allocated(device)
            reset_peak_memory(device)
            stream(n)
            return peak_memory_bytes(device) - before
        with PeakTensorMemory() as m:
            stream(n)
        return m.peak

    with torch.inference_mode():
        stream(2)  # warm-up
        firsts = [stream(1) for _ in range(5)]
        per_chunk: list[float] = []
        stream(chunks, per_chunk)
        steady = statistics.median(per_chunk[train_chunks:])
        peaks = {k: peak_bytes(k * train_chunks) for k in (1, 16)}
    first = statistics.median(firsts)
    return {"shape": shape_name, "height": height, "width": width, "latent": list(latent), "dtype": str(dtype),
            "tokens_per_chunk": (latent[1] // 2) * (latent[2] // 2), "window_latent_frames": window, "text_tokens": text_tokens,
            "first_chunk_seconds": first, "steady_chunk_seconds": steady, "fps": 4 / steady,
            "whole_training_clip_one_step_seconds": whole_seconds, "first_chunk_over_whole_clip": first / whole_seconds,
            "peak_bytes_1x": peaks[1], "peak_bytes_16x": peaks[16], "memory_16x_over_1x": peaks[16] / peaks[1]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs="+", default=["tiny"], choices=sorted(SHAPES), help="one row per shape, in order")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--window", type=int, default=20, help="rolling window, latent frames (the sink is 1 more)")
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--chunks", type=int, default=48, help="chunks streamed for the per-chunk time (the window fills first)")
    p.add_argument("--json", default=None, help="rewritten after every shape, so a run cut short keeps the rows before the cut")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    report = {"command": " ".join(["python", "eval/stream_timing.py", *(sys.argv[1:] if argv is None else argv)]),
              "environment": environment(device), "rows": []}
    for name in args.shape:
        try:
            row = measure(name, device, dtype, window=args.window, text_tokens=args.text_tokens, chunks=args.chunks)
        except Exception as e:  # noqa: BLE001 - a shape that fails (out of memory) is recorded, the next one runs
            row = {"shape": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]}
        report["rows"].append(row)
        print(json.dumps(row, indent=1), flush=True)
        if args.json:
            out = Path(args.json)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=1, default=str))
            os.replace(tmp, out)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


if __name__ == "__main__":
    main()
