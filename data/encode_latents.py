"""Pre-encode pixel shards into latent shards (+ text embeddings): resumable, split over processes.

    python data/encode_latents.py --shards shards/raw720 --out shards/wan720 \
        --vae models/Wan2.1-T2V-14B-Diffusers/vae --text-encoder models/Wan2.1-T2V-14B-Diffusers --max-length 512
    # 8 processes on one machine, or one rank of a multi-node job:
    python data/encode_latents.py ... --num-procs 8
    python data/encode_latents.py ... --rank 3 --world-size 16

Input shard i becomes OUT/latent-<i>.tar (written atomically); re-running skips finished shards.
--transformer checks the VAE against the transformer (latent channels, resolution vs VAE factor
x patch, frames vs temporal stride) before encoding anything. Without --text-encoder only the
captions are kept (encoded on the fly in training). --text-encoder is what the run's ``text.encoder``
is: for a diffusers model, the pipeline directory, whose text encoders run as its pipeline runs them
(apt.text_pipeline); --max-length must be the run's ``text.max_length`` (each shard records its text
convention, and a run refuses shards encoded under another one).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def _load(args):
    import torch

    from apt.codecs import LatentCodec

    codec = LatentCodec.load(args.vae, dtype=getattr(torch, args.vae_dtype)).to(args.device)
    if args.tiling:
        codec.enable_tiling()
    text_encoder = None
    if args.text_encoder:
        from apt.text import TextEncoder

        text_encoder = TextEncoder.load(args.text_encoder, max_length=args.max_length or default_max_length(args.text_encoder))
        text_encoder.name = args.text_encoder
    return codec, text_encoder


def default_max_length(text_encoder: str) -> int:
    """The pipeline's ``max_sequence_length`` for a pipeline directory, else TextConfig's default."""
    from apt.config import TextConfig
    from apt.models.adapters import adapter_class
    from apt.text_pipeline import pipeline_family

    family = pipeline_family(text_encoder) if os.path.isdir(text_encoder) else None
    return TextConfig.max_length if family is None else adapter_class(family).text.max_length


def preflight(args) -> None:
    """Geometry checks against the first sample and, if given, the transformer (fail before encoding)."""
    from apt.codecs import LatentCodec, check_codec_fits
    from apt.data.latent_shards import _read_pixel_shard
    from apt.data.shards import resolve_shards

    first = next(_read_pixel_shard(resolve_shards(args.shards)[0]))
    T, H, W, _ = first["pixels"].shape
    codec = LatentCodec.load(args.vae)
    if args.transformer:
        from apt.models.adapters import adapter_class, family_of_dir

        backbone = adapter_class(family_of_dir(args.transformer)).from_config_dir(args.transformer)
        check_codec_fits(codec, backbone, num_frames=T, height=H, width=W)
    else:
        codec.check_frames(T)
        codec.check_resolution(H, W)


def run_rank(args, rank: int, world_size: int) -> dict:
    import torch

    from apt.data.latent_shards import encode_latent_shards

    if args.threads:
        torch.set_num_threads(args.threads)
    codec, text_encoder = _load(args)
    return encode_latent_shards(args.shards, args.out, codec, text_encoder, rank=rank, world_size=world_size, dtype=args.dtype, device=args.device, progress=not args.no_progress)


def _worker(args, rank, world_size, queue):
    queue.put(run_rank(args, rank, world_size))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="pixel shards (directory, brace pattern or .tar)")
    p.add_argument("--out", required=True, help="output directory for latent-%%06d.tar")
    p.add_argument("--vae", required=True, help="local diffusers VAE directory")
    p.add_argument("--transformer", default="", help="local diffusers transformer directory to check the VAE against")
    p.add_argument("--text-encoder", default="", help="the run's text.encoder: a diffusers pipeline dir, 'toy-t5' or an encoder dir; empty = keep captions only")
    p.add_argument("--max-length", type=int, default=0, help="the run's text.max_length (0 = the pipeline's default: Wan 512, SD3 256, FLUX 512, CogVideoX 226, LTX 128, HunyuanVideo 256)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored dtype of latents and text")
    p.add_argument("--vae-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiling", action="store_true", help="VAE tiling (lower memory at high resolution)")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--num-procs", type=int, default=1, help="spawn this many local processes (ranks 0..N-1 of N)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = torch default)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    preflight(args)
    if args.num_procs > 1:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(args, r, args.num_procs, queue)) for r in range(args.num_procs)]
        for proc in procs:
            proc.start()
        for proc in procs:  # results are small dicts: joining before draining the queue cannot deadlock
            proc.join()
        if any(proc.exitcode for proc in procs):
            raise SystemExit(f"encode_latents: a worker failed (exit codes {[proc.exitcode for proc in procs]}); re-run to resume")
        results = [queue.get(timeout=10) for _ in procs]
    else:
        results = [run_rank(args, args.rank, args.world_size)]
    print(json.dumps(sorted(results, key=lambda r: r["rank"])))
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
