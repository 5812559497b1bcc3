"""Pre-encoded latent shards: pixel shards -> VAE latents (+ text embeddings), and their train loader.

Schema (one tar member group per sample, same keys as the pixel shard it came from):
    latent.npy   float32/float16 (C, T', H', W') latents, normalised as the family's pipeline does
                 (``apt.codecs.LatentCodec``)
    text.npy     float32/float16 (L', D) the caption's token embeddings (optional); trailing rows that
                 are exactly zero are not stored (L' <= L): the loader zero-fills them back
    mask.npy     bool (L,) the tokens the transformer attends to (optional, with text.npy)
    pooled.npy   float (P,) pooled text vector (optional; SD3/FLUX/Hunyuan ``pooled_projections``)
    json         the pixel shard's json + latent_shape, latent_dtype, vae, text_encoder, text_convention

``text_convention`` names how the text was encoded (``apt.text.text_convention``: a family pipeline's
fixed-length convention, or apt's own); it is recorded per sample and in ``manifest.json``, and a run
refuses shards encoded under a convention other than its own (``check_text_convention``).

Encoding (``encode_latent_shards``) is resumable and splittable: input shard i becomes
``latent-<i>.tar``, written by the process with ``i % world_size == rank`` under a ``.part``
name and renamed when complete, so a killed run redoes at most one shard per process and a
restart skips every finished shard. ``manifest.json`` is written once all shards exist.

Loading (``latent_train_loader``): the same signature and determinism as
``apt.data.shards.train_loader`` (a pure function of shards, seed, rank, batch size and workers;
``skip_batches`` resumes exactly); batches are ``x`` float32 (B, C, T', H', W'), ``caption``,
``key``, ``labels``, plus ``text_emb`` (B, L, D) / ``text_mask`` (B, L) and ``text_pooled`` (B, P)
when the shards carry them (a pipeline convention's texts all have its fixed L; apt's own are padded
to the batch's longest, its convention).

Legend: B batch, C latent channels, T'/H'/W' latent frames/height/width, L tokens, D text width.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader
from tqdm import tqdm

from apt.data.faults import DataFaults
from apt.data.shards import pixels_to_tensor, resolve_shards, train_loader

LATENT_PATTERN = "latent-%06d.tar"
DTYPES = {"float32": np.float32, "float16": np.float16}


def first_latent_shape(urls: Sequence[str]) -> tuple[int, ...] | None:
    """Shape (C, T', H', W') of the first shard's first latent; None when the shards hold pixels
    (peeks at the first few members of the first shard, reading only the latent's .npy header)."""
    try:
        with tarfile.open(urls[0]) as tar:
            for i, member in enumerate(tar):
                if member.name.endswith(".latent.npy"):  # the .npy header alone, not the array
                    f = tar.extractfile(member)
                    fmt = np.lib.format
                    read_header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
                    return tuple(read_header(f)[0])
                if member.name.endswith(".pixels.npy") or i > 8:
                    return None
    except (tarfile.TarError, OSError, IndexError):
        return None
    return None


def is_latent_shards(urls: Sequence[str]) -> bool:
    """True when the first shard holds ``latent.npy`` members."""
    return first_latent_shape(urls) is not None


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _read_pixel_shard(url: str) -> Iterator[dict]:
    """(key, pixels uint8 THWC, meta) of every sample of one pixel shard, in order."""
    for raw in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
        yield {"key": raw["__key__"], "pixels": np.load(io.BytesIO(raw["pixels.npy"]), allow_pickle=False), "meta": json.loads(raw["json"])}


def encode_shard(url: str, out_path: str, codec, text_encoder=None, *, dtype: str = "float32", device: str = "cpu") -> int:
    """Encode one pixel shard into one latent shard (atomic: .part then rename); returns samples written."""
    np_dtype = DTYPES[dtype]
    part = out_path + ".part"
    n = 0
    with wds.TarWriter(part, mtime=0.0) as sink:
        for s in _read_pixel_shard(url):
            caption = s["meta"].get("caption", "")
            x = pixels_to_tensor(s["pixels"])[None].to(device)  # (1, 3, T, H, W) in [-1, 1]
            z = codec.encode(x)[0].cpu().numpy().astype(np_dtype)
            meta = {**s["meta"], "latent_shape": list(z.shape), "latent_dtype": dtype, "vae": codec.name}
            sample = {"__key__": s["key"], "latent.npy": z}
            if text_encoder is not None:
                cond = text_encoder.encode([caption])
                emb, mask = cond.emb_BLD[0].cpu(), cond.mask_BL[0].cpu()
                if text_encoder.convention.startswith("apt/"):  # apt's own: the caption's tokens only
                    emb, mask = emb[: int(mask.sum())], mask[: int(mask.sum())]
                nonzero = emb.ne(0).any(dim=-1).nonzero()
                sample["text.npy"] = emb[: int(nonzero[-1]) + 1 if len(nonzero) else 0].numpy().astype(np_dtype)
                sample["mask.npy"] = mask.numpy().astype(bool)
                if cond.pooled_BP is not None:
                    sample["pooled.npy"] = cond.pooled_BP[0].cpu().numpy().astype(np_dtype)
                meta["text_encoder"] = getattr(text_encoder, "name", type(text_encoder).__name__)
                meta["text_convention"] = text_encoder.convention
            sample["json"] = meta
            sink.write(sample)
            n += 1
    os.replace(part, out_path)
    return n


def encode_latent_shards(
    in_shards: str | Sequence[str],
    out_dir: str,
    codec,
    text_encoder=None,
    *,
    rank: int = 0,
    world_size: int = 1,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Encode this rank's share of the pixel shards; skip those already written. Returns a summary."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    urls = resolve_shards(in_shards)
    os.makedirs(out_dir, exist_ok=True)
    outs = [os.path.join(out_dir, LATENT_PATTERN % i) for i in range(len(urls))]
    mine = [i for i in range(len(urls)) if i % world_size == rank]
    done = [i for i in mine if os.path.exists(outs[i])]
    written = 0
    for i in tqdm([i for i in mine if i not in done], desc=f"latents rank {rank}/{world_size}", disable=not progress):
        written += encode_shard(urls[i], outs[i], codec, text_encoder, dtype=dtype, device=device)
    complete = all(os.path.exists(o) for o in outs)
    if complete:
        manifest = {"kind": "latent", "num_shards": len(outs), "shards": [os.path.basename(o) for o in outs], "source": list(urls),
                    "vae": codec.name, "text_encoder": getattr(text_encoder, "name", None),
                    "text_convention": None if text_encoder is None else text_encoder.convention, "dtype": dtype}
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".json.part")
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(tmp, os.path.join(out_dir, "manifest.json"))
    return {"rank": rank, "world_size": world_size, "shards": len(mine), "skipped_existing": len(done), "samples_written": written, "complete": complete}


# ---------------------------------------------------------------- reading
UNRECORDED = "apt (unrecorded: shards written before apt recorded text conventions)"


def shard_text_convention(shards: str | Sequence[str]) -> str | None:
    """The text convention latent shards were encoded with: their manifest's, else the first sample's
    json; None when they hold no text embeddings (captions only, or pixel shards)."""
    from apt.data.shards import resolve_shards

    if isinstance(shards, str) and os.path.isfile(os.path.join(shards, "manifest.json")):
        with open(os.path.join(shards, "manifest.json")) as f:
            manifest = json.load(f)
        if manifest.get("kind") == "latent":
            if manifest.get("text_encoder") is None:
                return None
            return manifest.get("text_convention") or UNRECORDED
    urls = resolve_shards(shards)
    meta, has_text = None, False
    try:
        with tarfile.open(urls[0]) as tar:
            for i, member in enumerate(tar):
                if member.name.endswith(".json") and meta is None:
                    meta = json.loads(tar.extractfile(member).read())
                has_text = has_text or member.name.endswith(".text.npy")
                if (meta is not None and has_text) or i > 8:
                    break
    except (tarfile.TarError, OSError, IndexError, ValueError):
        return None
    if not has_text:
        return None
    return (meta or {}).get("text_convention") or UNRECORDED


def check_text_convention(shards: str | Sequence[str], expected: str) -> None:
    """Refuse latent shards whose text was encoded under another convention than the run's (a teacher
    conditioned on one convention and trained on another is off its own distribution)."""
    found = shard_text_convention(shards)
    if found == UNRECORDED and expected.startswith("apt/"):
        return  # before conventions were recorded every shard was encoded under apt's own
    if found is not None and found != expected:
        raise ValueError(
            f"{shards} holds text encoded under the convention {found!r} but this run encodes text as {expected!r} "
            f"(text.encoder, text.max_length); re-encode the shards with data/encode_latents.py --text-encoder and "
            f"--max-length matching the run, or set text.encoder/text.max_length to the shards' convention"
        )


def _decode_latent(src: Iterator[dict], counter: DataFaults) -> Iterator[dict]:
    for raw in src:
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
        reason = "missing_member"  # what failed, for the counts (apt.data.faults.REASONS)
        try:
            latent_npy, meta_json = raw["latent.npy"], raw["json"]
            reason = "bad_json"
            meta = json.loads(meta_json)
            reason = "bad_array"
            out = {"x": np.load(io.BytesIO(latent_npy), allow_pickle=False), "key": key}
            if "text.npy" in raw:
                out["text"] = np.load(io.BytesIO(raw["text.npy"]), allow_pickle=False)
                out["mask"] = np.load(io.BytesIO(raw["mask.npy"]), allow_pickle=False) if "mask.npy" in raw else np.ones(len(out["text"]), bool)
            if "pooled.npy" in raw:
                out["pooled"] = np.load(io.BytesIO(raw["pooled.npy"]), allow_pickle=False)
            reason = "bad_shape"
            if out["x"].ndim != 4:
                raise ValueError(f"latent must be (C, T, H, W), got {out['x'].shape}")
        except Exception as e:  # noqa: BLE001 - any undecodable sample is corrupt
            counter.skip(reason, url, f"sample {key} in {url}: {type(e).__name__}: {e}")
            continue
        counter.ok()
        caption = meta.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"sample {key} in shard {url} has an empty caption")
        out["caption"], out["labels"] = caption, meta.get("labels", {})
        yield out


def collate_latents(samples: list[dict]) -> dict:
    shapes = {s["x"].shape for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"latents in one batch have different shapes {sorted(shapes)}: keys {[s['key'] for s in samples]}")
    batch = {
        "x": torch.from_numpy(np.stack([s["x"] for s in samples]).astype(np.float32)),
        "caption": [s["caption"] for s in samples],
        "labels": [s["labels"] for s in samples],
        "key": [s["key"] for s in samples],
    }
    if all("text" in s for s in samples):
        L = max(1, max(max(len(s["text"]), len(s["mask"])) for s in samples))
        D = samples[0]["text"].shape[-1]
        emb, mask = torch.zeros(len(samples), L, D), torch.zeros(len(samples), L, dtype=torch.bool)
        for i, s in enumerate(samples):
            emb[i, : len(s["text"])] = torch.from_numpy(s["text"].astype(np.float32))
            mask[i, : len(s["mask"])] = torch.from_numpy(s["mask"].astype(bool))
        batch["text_emb"], batch["text_mask"] = emb, mask
    if all("pooled" in s for s in samples):
        batch["text_pooled"] = torch.from_numpy(np.stack([s["pooled"] for s in samples]).astype(np.float32))
    return batch


def latent_train_loader(
    shards: str | Sequence[str],
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    skip_batches: int = 0,
    shuffle_buffer: int = 1000,
    **faults,
) -> DataLoader:
    """Infinite, shuffled, resampled latent batches for ``rank``: ``apt.data.shards.train_loader``
    (same determinism, exact skip-resume and corrupt-data bounds ``faults``) with the latent decoder and collation."""
    return train_loader(shards, batch_size, seed, rank, world_size, num_workers, skip_batches, shuffle_buffer,
                        decode=_decode_latent, collate=collate_latents, **faults)
