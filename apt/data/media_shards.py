"""Videos/images + captions -> WebDataset pixel shards (the schema of ``apt.data.shards``).

Input: a folder (every image/video file; its caption in a sidecar ``<stem>.txt``, or
``<stem>.json`` with a "caption" key) or a list file: ``.jsonl`` (one ``{"path": ..., "caption":
...}`` per line) or ``.csv`` (header with ``path`` and ``caption`` columns); relative paths are
resolved against the list file's directory.

Policy (``MediaPolicy``, every field configurable; defaults = the APT video stage: 49 frames at
24 fps, 1280x720):

- time: the clip starts at ``start_seconds``; frame k is the source frame nearest to
  ``start + k / fps`` (frames are dropped or repeated to reach ``fps``; no interpolation). A video
  shorter than ``frames / fps`` seconds is skipped ("too short").
- space: each frame is resized (PIL bicubic, antialiased) so that it covers ``height x width``
  with its aspect ratio kept, then centre-cropped.
- images: with ``frames == 1`` an image is one frame; a video gives its frame at ``start``. With
  ``frames > 1`` images are skipped ("image, but clips need N frames").
- corrupt, unreadable, unsupported or caption-less files are skipped and listed with the reason
  in ``report.json``; nothing is skipped silently.

Output per sample: ``pixels.npy`` uint8 (T, H, W, 3) and ``json`` (caption, frames, height,
width, fps, source path, source size, source fps, index) — readable by ``train_loader`` and by
``apt.data.latent_shards.encode_latent_shards``. Shards are written under ``.part`` names and
renamed when complete; ``manifest.json`` and ``report.json`` are written last.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")
SHARD_PATTERN = "media-%06d.tar"


@dataclass
class MediaPolicy:
    frames: int = 49
    """Frames per clip (1 = images)."""
    fps: float = 24.0
    """Output frame rate: frame k is the source frame nearest to start + k / fps."""
    height: int = 720
    width: int = 1280
    start_seconds: float = 0.0
    """Where clips start in the source video."""

    def __post_init__(self):
        if self.frames < 1 or self.fps <= 0 or self.height < 1 or self.width < 1 or self.start_seconds < 0:
            raise ValueError(f"bad media policy {asdict(self)}: frames, fps, height, width must be positive, start >= 0")


class SkipMedia(Exception):
    """This file cannot become a sample; the message is the reason listed in the report."""


def resize_cover_crop(img: Image.Image, height: int, width: int) -> np.ndarray:
    """Resize so the image covers height x width (aspect kept), then centre-crop; uint8 (H, W, 3)."""
    img = img.convert("RGB")
    w, h = img.size
    scale = max(width / w, height / h)
    rw, rh = max(width, round(w * scale)), max(height, round(h * scale))
    img = img.resize((rw, rh), Image.BICUBIC)
    left, top = (rw - width) // 2, (rh - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.uint8)


def read_image(path: str, policy: MediaPolicy) -> tuple[np.ndarray, dict]:
    if policy.frames != 1:
        raise SkipMedia(f"image, but clips need {policy.frames} frames")
    try:
        with Image.open(path) as img:
            img.load()
            size = img.size
            frame = resize_cover_crop(img, policy.height, policy.width)
    except Exception as e:  # noqa: BLE001 - any unreadable image is skipped and reported
        raise SkipMedia(f"unreadable image: {type(e).__name__}: {e}") from None
    return frame[None], {"source_size": list(size), "source_fps": None}


def read_video(path: str, policy: MediaPolicy) -> tuple[np.ndarray, dict]:
    """Decode only what the clip needs: frames nearest to start + k / fps, k < frames."""
    import av

    targets = [policy.start_seconds + k / policy.fps for k in range(policy.frames)]
    out: list[np.ndarray] = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise SkipMedia("no video stream")
            stream = container.streams.video[0]
            src_fps = float(stream.average_rate) if stream.average_rate else None
            size = [stream.codec_context.width, stream.codec_context.height]
            prev = None  # (time, frame) of the previous decoded frame
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else i / (src_fps or policy.fps)
                while len(out) < policy.frames and t >= targets[len(out)] - 1e-6:
                    tk = targets[len(out)]
                    pick = prev if prev is not None and tk - prev[0] < t - tk else (t, frame)
                    out.append(resize_cover_crop(pick[1].to_image(), policy.height, policy.width))
                if len(out) == policy.frames:
                    break
                prev = (t, frame)
    except SkipMedia:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt / unsupported container or codec
        raise SkipMedia(f"undecodable video: {type(e).__name__}: {e}") from None
    if len(out) < policy.frames:
        need = policy.start_seconds + (policy.frames - 1) / policy.fps
        raise SkipMedia(f"too short: {len(out)} of {policy.frames} frames at {policy.fps:g} fps (needs {need:.2f} s from {policy.start_seconds:g} s)")
    return np.stack(out), {"source_size": size, "source_fps": src_fps}


def read_media(path: str, policy: MediaPolicy) -> tuple[np.ndarray, dict]:
    ext = Path(path).suffix.lower()
    if not os.path.isfile(path):
        raise SkipMedia("file not found")
    if ext in IMAGE_EXTS:
        return read_image(path, policy)
    if ext in VIDEO_EXTS:
        if policy.frames == 1:
            clip, meta = read_video(path, MediaPolicy(1, policy.fps, policy.height, policy.width, policy.start_seconds))
            return clip, meta
        return read_video(path, policy)
    raise SkipMedia(f"unsupported file type {ext or '(none)'}")


# ---------------------------------------------------------------- inputs


def _sidecar_caption(path: Path) -> str | None:
    txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
    if txt.exists():
        return txt.read_text().strip()
    if js.exists():
        try:
            return str(json.loads(js.read_text()).get("caption", "")).strip()
        except json.JSONDecodeError:
            return None
    return None


def list_media(source: str | os.PathLike) -> list[tuple[str, str | None]]:
    """(path, caption) pairs from a folder or a .jsonl / .csv list file (caption None = missing)."""
    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS + VIDEO_EXTS)
        return [(str(p), _sidecar_caption(p)) for p in files]
    if not src.exists():
        raise FileNotFoundError(f"media source not found: {src}")
    rows: list[dict] = []
    if src.suffix == ".jsonl":
        for n, line in enumerate(src.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{src}:{n}: not JSON: {e}") from None
    elif src.suffix == ".csv":
        with open(src, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "path" not in reader.fieldnames or "caption" not in reader.fieldnames:
                raise ValueError(f"{src}: CSV needs a header with 'path' and 'caption' columns, got {reader.fieldnames}")
            rows = list(reader)
    else:
        raise ValueError(f"media source {src} must be a folder, a .jsonl or a .csv list")
    out = []
    for n, row in enumerate(rows, 1):
        if "path" not in row:
            raise ValueError(f"{src}: entry {n} has no 'path'")
        p = Path(row["path"])
        out.append((str(p if p.is_absolute() else src.parent / p), (row.get("caption") or "").strip() or None))
    return out


# ---------------------------------------------------------------- writing


def _atomic_json(obj: dict, path: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".json.part")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def iter_samples(items: list[tuple[str, str | None]], policy: MediaPolicy, skipped: list[dict], *, progress: bool = True) -> Iterator[tuple[str, str, np.ndarray, dict]]:
    for path, caption in tqdm(items, desc="media", disable=not progress):
        if not caption:
            skipped.append({"path": path, "reason": "no caption"})
            continue
        try:
            clip, meta = read_media(path, policy)
        except SkipMedia as e:
            skipped.append({"path": path, "reason": str(e)})
            continue
        yield path, caption, clip, meta


def write_media_shards(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    policy: MediaPolicy | None = None,
    *,
    samples_per_shard: int = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write shards of ``pixels.npy`` + ``json`` under out_dir; returns the report (also report.json)."""
    policy = policy or MediaPolicy()
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    stale = sorted(str(p) for p in Path(out_dir).glob("*.tar")) + [p for p in (os.path.join(out_dir, "manifest.json"),) if os.path.exists(p)]
    if stale and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {len(stale)} shard/manifest files; choose an empty directory or pass overwrite")
    for p in stale:
        os.remove(p)
    items = list_media(source)
    skipped: list[dict] = []
    written = 0

    def _finish(part_name: str) -> None:
        os.replace(part_name, part_name[: -len(".part")])

    with wds.ShardWriter(os.path.join(out_dir, SHARD_PATTERN + ".part"), maxcount=samples_per_shard, post=_finish, verbose=0, mtime=0.0) as sink:
        for path, caption, clip, meta in iter_samples(items, policy, skipped, progress=progress):
            T, H, W, _ = clip.shape
            info = {"caption": caption, "frames": T, "height": H, "width": W, "fps": policy.fps, "source": path, "index": written, **meta}
            sink.write({"__key__": f"{written:09d}", "pixels.npy": clip, "json": info})
            written += 1
        num_shards = sink.shard if written else 0
    if written == 0:
        for p in Path(out_dir).glob("*.tar*"):
            p.unlink()
    shards = [SHARD_PATTERN % i for i in range(num_shards)]
    report = {"source": str(source), "written": written, "skipped": skipped, "num_skipped": len(skipped), "policy": asdict(policy), "shards": shards}
    manifest = {"kind": "pixels", "num_samples": written, "num_shards": num_shards, "samples_per_shard": samples_per_shard,
                "frames": policy.frames, "height": policy.height, "width": policy.width, "fps": policy.fps, "shards": shards}
    _atomic_json(report, os.path.join(out_dir, "report.json"))
    if written:
        _atomic_json(manifest, os.path.join(out_dir, "manifest.json"))
    return report
