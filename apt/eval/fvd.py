"""Fréchet Video Distance, StyleGAN-V protocol, streaming and offline.

Protocol (Skorokhodov et al., "StyleGAN-V", CVPR 2022; reference code
`universome/stylegan-v` `src/metrics/frechet_video_distance.py` and `src/metrics/metric_utils.py`):

- Detector: the I3D (Kinetics-400) TorchScript port of the tf.hub model used by the original FVD
  (Unterthiner et al. 2018), file `i3d_torchscript.pt`, public copy
  https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1 (the `detector_url` of
  StyleGAN-V's `compute_fvd`). Loaded here with `torch.jit.load` from a local path only.
- Call convention, as StyleGAN-V's `compute_fvd` / `compute_feature_stats_for_dataset` use it:
  `detector(videos_BCTHW, rescale=True, resize=True, return_features=True)`, videos uint8 in
  [0, 255] (their dataset yields uint8; their generator path casts `(img * 127.5 + 128)` to uint8),
  layout (B, 3, T, H, W) (they permute (B, T, C, H, W) -> (B, C, T, H, W)). `return_features=True`
  returns the 400-d pre-softmax logits ("raw features before the softmax layer").
  What the two flags do inside the model is inferred, not read from the file: third-party ports
  call the same file with `rescale=False, resize=False` on [-1, 1] float input already at 224x224
  (universome/fvd-comparison `compare_models.py`, JunyaoHu/common_metrics_on_video_quality
  `fvd/styleganv/fvd.py`), matching tf.hub's I3D, which expects [-1, 1] at 224x224
  (google-research `frechet_video_distance.py` `preprocess`: bilinear resize, `2 * x / 255 - 1`).
  So `rescale=True` maps [0, 255] -> [-1, 1] and `resize=True` resizes to 224x224 inside; the
  exact internal resize filter is the file's own. We call it exactly as StyleGAN-V does.
- Clips: `num_frames` = 16 consecutive frames from frame `offset` = 0 (StyleGAN-V
  `load_n_consecutive=16`, no random offset for evaluation); a strided variant takes frames
  `offset + i * stride` (StyleGAN-V `subsample_factor`), e.g. stride 3 spans frames 0..45 of a
  49-frame clip; `stride="span"` picks the largest stride that fits each video. Videos too short
  for the clip are discarded (StyleGAN-V `discard_short_videos=True`) and listed in the result.
- Spatial preprocessing (ours, stated because implementations disagree here most): StyleGAN-V
  evaluates square datasets stored at their training resolution (`crop_video_dataset.py` resizes
  with PIL Lanczos). For 1280x720 video we centre-crop each frame to a square (720x720), resize it
  with PIL Lanczos to `resolution` = 256 (StyleGAN-V's 256^2 setting; also avoids the aliasing of
  a 720 -> 224 bilinear resize) and let the model's own `resize=True` take 256 -> 224.
  `crop="none"` squashes the full frame instead; `resolution=None` feeds frames at native size.
- Statistics: mean and covariance accumulated in float64 (`apt.eval.frechet.FeatureStats`);
  covariance normalised by 1/N as StyleGAN-V's `FeatureStats.get_mean_cov`; distance with scipy
  `sqrtm` as in `compute_fvd`. N = 2048 generated vs 2048 real clips by default; the first N
  decodable files in sorted order are used.
- Real-set statistics are cached once per (protocol, detector sha256, file list + sizes) in an
  .npz (float64). Corrupt or truncated files are reported and skipped, never a crash.

Nothing holds all clips: files are decoded one at a time (only the frames the clip needs), each
frame is cropped and resized as soon as it is decoded, and features are folded into running sums
batch by batch, so memory does not grow with N.

Legend: B batch, C = 3 channels, T frames, H height, W width, D = 400 feature dims.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

from apt.eval.frechet import (
    FeatureStats,
    cached_real_stats,
    frechet_distance,
    load_detector,
    report_table_markdown,
    run_facts,
    save_npz_atomic,
    set_facts,
)
from apt.eval.video_io import VideoDecodeError, iter_frames, video_info

I3D_FILENAME = "i3d_torchscript.pt"
I3D_PUBLIC_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
I3D_FEATURE_DIM = 400
# Exactly the kwargs of StyleGAN-V `compute_fvd` (src/metrics/frechet_video_distance.py).
I3D_KWARGS: dict[str, bool] = {"rescale": True, "resize": True, "return_features": True}
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi")


class ClipTooShortError(ValueError):
    """A video has fewer frames than the clip protocol needs (discarded, as StyleGAN-V does)."""


@dataclass(frozen=True)
class FVDProtocol:
    """Everything that changes an FVD number besides the two sets of videos."""

    num_frames: int = 16
    """Frames per clip fed to I3D (StyleGAN-V: 16)."""
    offset: int = 0
    """Index of the clip's first frame (StyleGAN-V evaluation: 0)."""
    stride: int | str = 1
    """Frame step inside a clip (1 = consecutive), or "span" = largest step that fits each video."""
    crop: str = "center"
    """"center": centre square crop before resizing; "none": keep the full frame (squashed)."""
    resolution: int | None = 256
    """Square side after PIL Lanczos resize (before I3D's own resize to 224); None = native size."""
    fps: float | None = 24.0
    """Expected frame rate; files at another rate are listed in the result (never resampled)."""
    num_videos: int = 2048
    """N: clips per set (first N decodable files in sorted order)."""

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.offset < 0:
            raise ValueError(f"offset must be >= 0, got {self.offset}")
        if not (self.stride == "span" or (isinstance(self.stride, int) and self.stride >= 1)):
            raise ValueError(f"stride must be an int >= 1 or 'span', got {self.stride!r}")
        if self.crop not in ("center", "none"):
            raise ValueError(f"crop must be 'center' or 'none', got {self.crop!r}")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"resolution must be >= 1 or None, got {self.resolution}")
        if self.num_videos < 2:
            raise ValueError(f"num_videos (N) must be >= 2 for a covariance, got {self.num_videos}")

    def describe_resize(self) -> str:
        crop = "centre square crop" if self.crop == "center" else "no crop (aspect squashed)"
        size = (
            f"PIL Lanczos to {self.resolution}x{self.resolution}"
            if self.resolution is not None
            else "no resize before the detector"
        )
        return f"{crop}; {size}; then I3D internal resize to 224x224 (resize=True)"


# --------------------------------------------------------------------------- clip selection


def spanning_stride(total_frames: int, num_frames: int, offset: int = 0) -> int:
    """Largest stride s with offset + (num_frames - 1) * s < total_frames (49, 16 -> 3)."""
    if num_frames == 1:
        return 1
    s = (total_frames - offset - 1) // (num_frames - 1)
    if s < 1:
        raise ClipTooShortError(
            f"{total_frames} frames cannot hold {num_frames} frames from offset {offset}"
        )
    return s


def clip_frame_indices(num_frames: int, *, offset: int = 0, stride: int = 1) -> list[int]:
    """Frame indices of one clip: offset, offset + stride, ..., offset + (num_frames - 1) * stride."""
    return [offset + i * stride for i in range(num_frames)]


def preprocess_frame(frame_HWC: np.ndarray, *, crop: str, resolution: int | None) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (R, R, 3): optional centre square crop, then PIL Lanczos resize."""
    if frame_HWC.dtype != np.uint8 or frame_HWC.ndim != 3 or frame_HWC.shape[-1] != 3:
        raise ValueError(f"frame must be uint8 (H, W, 3), got {frame_HWC.dtype} {frame_HWC.shape}")
    if crop == "center":
        H, W = frame_HWC.shape[:2]
        s = min(H, W)
        top, left = (H - s) // 2, (W - s) // 2
        frame_HWC = frame_HWC[top : top + s, left : left + s]
    if resolution is not None and frame_HWC.shape[:2] != (resolution, resolution):
        img = Image.fromarray(np.ascontiguousarray(frame_HWC))
        frame_HWC = np.asarray(img.resize((resolution, resolution), resample=Image.LANCZOS))
    return np.ascontiguousarray(frame_HWC)


def load_clip(path: str, protocol: FVDProtocol) -> tuple[np.ndarray, dict]:
    """Decode only the frames one clip needs; returns uint8 (3, T, R, R) and per-file facts.

    Raises VideoDecodeError (corrupt/truncated) or ClipTooShortError (fewer frames than needed).
    """
    info = video_info(path)
    if protocol.stride == "span":
        total = info.num_frames or sum(1 for _ in iter_frames(path))
        stride = spanning_stride(total, protocol.num_frames, protocol.offset)
    else:
        stride = int(protocol.stride)
    wanted = clip_frame_indices(protocol.num_frames, offset=protocol.offset, stride=stride)
    keep = set(wanted)
    frames: list[np.ndarray] = []
    n_decoded = 0
    for i, frame_HWC in enumerate(iter_frames(path, max_frames=wanted[-1] + 1)):
        n_decoded = i + 1
        if i in keep:
            frames.append(preprocess_frame(frame_HWC, crop=protocol.crop, resolution=protocol.resolution))
    if len(frames) < protocol.num_frames:
        raise ClipTooShortError(
            f"{n_decoded} frames decoded, clip needs frame {wanted[-1]} "
            f"(num_frames={protocol.num_frames}, offset={protocol.offset}, stride={stride})"
        )
    clip_CTHW = np.stack(frames).transpose(3, 0, 1, 2)
    facts = {"fps": info.fps, "stride": stride, "source_size": f"{info.width}x{info.height}"}
    return np.ascontiguousarray(clip_CTHW), facts


# --------------------------------------------------------------------------- detector


def file_sha256(path: str, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def load_i3d(path: str, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load the StyleGAN-V I3D TorchScript from a local file or directory (never downloads)."""
    return load_detector(path, filename=I3D_FILENAME, metric="FVD", public_url=I3D_PUBLIC_URL,
                         origin="StyleGAN-V, src/metrics/frechet_video_distance.py", device=device)


@torch.no_grad()
def i3d_features(detector: torch.nn.Module, clips_BCTHW: torch.Tensor) -> np.ndarray:
    """uint8 (B, 3, T, H, W) in [0, 255] -> float64 (B, 400) pre-softmax I3D logits."""
    if clips_BCTHW.dtype != torch.uint8 or clips_BCTHW.ndim != 5 or clips_BCTHW.shape[1] != 3:
        raise ValueError(f"clips must be uint8 (B, 3, T, H, W), got {clips_BCTHW.dtype} {tuple(clips_BCTHW.shape)}")
    feats_BD = detector(clips_BCTHW, **I3D_KWARGS)
    if feats_BD.ndim != 2 or feats_BD.shape[0] != clips_BCTHW.shape[0]:
        raise ValueError(f"detector returned {tuple(feats_BD.shape)}, expected (B, D)")
    return feats_BD.detach().cpu().double().numpy()


# --------------------------------------------------------------------------- file sets


def list_videos(source: str | Sequence[str]) -> list[str]:
    """Videos of a set: a directory (recursive, sorted), a .txt list (one path a line), or a list."""
    if not isinstance(source, str):
        return [str(p) for p in source]
    if os.path.isdir(source):
        found = []
        for root, _dirs, files in os.walk(source):
            found += [os.path.join(root, f) for f in files if f.lower().endswith(VIDEO_EXTENSIONS)]
        if not found:
            raise FileNotFoundError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {source!r}")
        return sorted(found)
    if os.path.isfile(source) and source.endswith(".txt"):
        base = os.path.dirname(os.path.abspath(source))
        with open(source) as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        return [ln if os.path.isabs(ln) else os.path.join(base, ln) for ln in lines]
    raise FileNotFoundError(f"{source!r} is neither a directory of videos nor a .txt file list")


@dataclass
class SetResult:
    """Feature statistics of one set of videos plus what happened to each file."""

    stats: FeatureStats
    skipped: list[dict] = field(default_factory=list)
    fps_mismatch: list[dict] = field(default_factory=list)
    strides: list[int] = field(default_factory=list)
    source_sizes: list[str] = field(default_factory=list)
    num_files_listed: int = 0


def _bounded_map(fn, items: Iterable, num_workers: int) -> Iterator:
    """map(fn, items) in order; with threads, at most 2 * num_workers results in flight."""
    if num_workers <= 0:
        for it in items:
            yield _call(fn, it)
        return
    with ThreadPoolExecutor(num_workers) as pool:
        window: deque[Future] = deque()
        for it in items:
            window.append(pool.submit(_call, fn, it))
            if len(window) >= 2 * num_workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _call(fn, item):
    try:
        return item, fn(item), None
    except (VideoDecodeError, ClipTooShortError, FileNotFoundError) as e:
        return item, None, e


def compute_set_stats(
    paths: Sequence[str],
    detector: torch.nn.Module,
    protocol: FVDProtocol,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
) -> SetResult:
    """Stream the first N decodable clips of `paths` through I3D into float64 running moments."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    result = SetResult(stats=FeatureStats(dim=I3D_FEATURE_DIM), num_files_listed=len(paths))
    batch: list[np.ndarray] = []
    n_target = protocol.num_videos

    def flush() -> None:
        clips_BCTHW = torch.from_numpy(np.stack(batch)).to(device)
        feats_BD = i3d_features(detector, clips_BCTHW)
        result.stats.update(feats_BD[: n_target - result.stats.n])
        batch.clear()

    def loader(path: str):
        return load_clip(path, protocol)

    t0 = time.time()
    # Stop submitting once enough clips are in hand (decoding is the expensive part).
    def pending_paths() -> Iterator[str]:
        for p in paths:
            if result.stats.n + len(batch) >= n_target:
                return
            yield p

    for path, loaded, err in _bounded_map(loader, pending_paths(), num_workers):
        if result.stats.n + len(batch) >= n_target:
            break
        if err is not None:
            result.skipped.append({"path": path, "reason": f"{type(err).__name__}: {err}"})
            warnings.warn(f"FVD: skipping {path}: {err}", stacklevel=2)
            continue
        clip_CTHW, facts = loaded
        if batch and batch[0].shape != clip_CTHW.shape:
            raise ValueError(
                f"clip {path} has shape {clip_CTHW.shape}, batch has {batch[0].shape}: "
                "videos of different sizes need a fixed `resolution`"
            )
        if protocol.fps is not None and abs(facts["fps"] - protocol.fps) > 1e-3:
            result.fps_mismatch.append({"path": path, "fps": facts["fps"]})
        if facts["stride"] not in result.strides:
            result.strides.append(facts["stride"])
        if facts["source_size"] not in result.source_sizes and len(result.source_sizes) < 16:
            result.source_sizes.append(facts["source_size"])
        batch.append(clip_CTHW)
        if len(batch) == batch_size:
            flush()
            if progress:
                print(f"  FVD features: {result.stats.n}/{n_target} clips, {time.time() - t0:.1f} s", flush=True)
    if batch:
        flush()
    if result.fps_mismatch:
        warnings.warn(
            f"FVD: {len(result.fps_mismatch)} videos are not at {protocol.fps} fps (first: "
            f"{result.fps_mismatch[0]}); frames are used as decoded, not resampled",
            stacklevel=2,
        )
    return result


# --------------------------------------------------------------------------- real-set cache


def _save_set(path: str, res: SetResult) -> None:
    meta = {"skipped": res.skipped, "fps_mismatch": res.fps_mismatch, "strides": res.strides,
            "source_sizes": res.source_sizes, "num_files_listed": res.num_files_listed}
    s = res.stats
    save_npz_atomic(path, sum_D=s.sum_D.astype(np.float64), sum_DD=s.sum_DD.astype(np.float64), n=s.n,
                    dim=s.dim, meta=json.dumps(meta))


def _load_set(path: str) -> SetResult:
    z = np.load(path)
    stats = FeatureStats(dim=int(z["dim"]), n=int(z["n"]), sum_D=z["sum_D"], sum_DD=z["sum_DD"])
    meta = json.loads(str(z["meta"]))
    return SetResult(stats=stats, **meta)


def real_set_stats(
    paths: Sequence[str],
    detector: torch.nn.Module,
    protocol: FVDProtocol,
    *,
    detector_sha256: str,
    cache_dir: str | None,
    **kw,
) -> tuple[SetResult, str | None, bool]:
    """Real-set statistics, read from / written to `cache_dir` (npz, float64). -> (set, cache file, hit)."""
    return cached_real_stats(
        cache_dir, prefix="fvd_real", paths=paths,
        key_fields={"protocol": asdict(protocol), "detector_sha256": detector_sha256, "i3d_kwargs": I3D_KWARGS,
                    "version": 1},
        compute=lambda: compute_set_stats(paths, detector, protocol, **kw), save=_save_set, load=_load_set,
    )


# --------------------------------------------------------------------------- FVD


def fvd_from_stats(gen: FeatureStats, real: FeatureStats) -> float:
    """Fréchet distance with 1/N covariances, as StyleGAN-V `FeatureStats.get_mean_cov`."""
    for name, s in (("generated", gen), ("real", real)):
        if s.n < 2:
            raise ValueError(f"FVD needs at least 2 {name} clips, got {s.n}")
    sig_gen = gen.sigma * (gen.n - 1) / gen.n
    sig_real = real.sigma * (real.n - 1) / real.n
    return frechet_distance(gen.mu, sig_gen, real.mu, sig_real)


def compute_fvd(
    gen: str | Sequence[str],
    real: str | Sequence[str],
    *,
    detector_path: str,
    protocol: FVDProtocol | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> dict:
    """FVD between two sets (directory, .txt list or list of paths); returns the full report dict."""
    protocol = protocol or FVDProtocol()
    t0 = time.time()
    if os.path.isdir(detector_path):
        detector_path = os.path.join(detector_path, I3D_FILENAME)
    detector = load_i3d(detector_path, device)
    sha = file_sha256(detector_path)
    kw = dict(batch_size=batch_size, device=device, num_workers=num_workers, progress=progress)
    real_res, cache_file, hit = real_set_stats(
        list_videos(real), detector, protocol, detector_sha256=sha, cache_dir=cache_dir, **kw
    )
    gen_res = compute_set_stats(list_videos(gen), detector, protocol, **kw)
    for name, res in (("generated", gen_res), ("real", real_res)):
        if res.stats.n < protocol.num_videos:
            warnings.warn(
                f"FVD: only {res.stats.n} {name} clips (N = {protocol.num_videos} requested); "
                "the number is biased upward at small N",
                stacklevel=2,
            )
    value = fvd_from_stats(gen_res.stats, real_res.stats)
    return {
        "metric": "fvd",
        "fvd": value,
        "protocol": "StyleGAN-V FVD (universome/stylegan-v src/metrics/frechet_video_distance.py)",
        "num_frames": protocol.num_frames,
        "clip_offset": protocol.offset,
        "clip_stride": protocol.stride,
        "clip_strides_used": {"generated": gen_res.strides, "real": real_res.strides},
        "crop": protocol.crop,
        "resolution": protocol.resolution,
        "resize": protocol.describe_resize(),
        "fps": protocol.fps,
        "N": protocol.num_videos,
        **set_facts(
            gen, real, num_generated=gen_res.stats.n, num_real=real_res.stats.n,
            source_sizes={"generated": gen_res.source_sizes, "real": real_res.source_sizes},
            detector_file=detector_path, detector_sha256=sha, public_source=I3D_PUBLIC_URL,
            kwargs=dict(I3D_KWARGS), input="uint8 (B, 3, T, H, W) in [0, 255]", feature_dim=I3D_FEATURE_DIM,
        ),
        "covariance": "1/N (StyleGAN-V FeatureStats.get_mean_cov), float64",
        "fps_mismatch": {"generated": gen_res.fps_mismatch, "real": real_res.fps_mismatch},
        **run_facts(skipped={"generated": gen_res.skipped, "real": real_res.skipped}, cache_file=cache_file,
                    cache_hit=hit, batch_size=batch_size, device=device, started=t0),
    }


def fvd_report_markdown(result: dict, title: str = "FVD") -> str:
    """A markdown table of one FVD result with its protocol facts."""
    return report_table_markdown(result, title=title, metric_rows=[
        ("FVD", f"{result['fvd']:.2f}"),
        ("N (generated / real)", f"{result['num_generated']} / {result['num_real']} (requested {result['N']})"),
        ("clip", f"{result['num_frames']} frames from frame {result['clip_offset']}, stride {result['clip_stride']}"),
        ("fps", str(result["fps"])),
        ("resize / crop", result["resize"]),
    ], detector_rows=[
        ("detector call", ", ".join(f"{k}={v}" for k, v in result["detector"]["kwargs"].items())),
    ])


# --------------------------------------------------------------------------- command line


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """The FVD options shared by eval/fvd.py and eval/benchmark_video.py (read by `fvd_from_args`)."""
    d = FVDProtocol()
    p.add_argument("--detector", required=True, help="local path of i3d_torchscript.pt (or its directory)")
    p.add_argument("--num-videos", type=int, default=d.num_videos, help="N clips per set")
    p.add_argument("--num-frames", type=int, default=d.num_frames)
    p.add_argument("--offset", type=int, default=d.offset, help="first frame of the clip")
    p.add_argument("--stride", default=str(d.stride), help="frame step in the clip, or 'span'")
    p.add_argument("--crop", choices=["center", "none"], default=d.crop)
    p.add_argument("--resolution", type=lambda s: None if s == "none" else int(s), default=d.resolution,
                   help="square side after the PIL Lanczos resize, or 'none'")
    p.add_argument("--fps", type=float, default=d.fps)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-workers", type=int, default=0, help="decoding threads")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/apt/fvd"),
                   help="real-set statistics cache ('none' to disable)")


def protocol_from_args(a: argparse.Namespace) -> FVDProtocol:
    """The `FVDProtocol` of the options added by `add_protocol_args`."""
    stride = a.stride if a.stride == "span" else int(a.stride)
    return FVDProtocol(num_frames=a.num_frames, offset=a.offset, stride=stride, crop=a.crop,
                       resolution=a.resolution, fps=a.fps, num_videos=a.num_videos)


def fvd_from_args(a: argparse.Namespace, gen: str) -> dict:
    """`compute_fvd(gen, a.real, ...)` with the options of `add_protocol_args` (progress printed)."""
    return compute_fvd(gen, a.real, detector_path=a.detector, protocol=protocol_from_args(a),
                       batch_size=a.batch_size, device=a.device, num_workers=a.num_workers,
                       cache_dir=None if a.cache_dir == "none" else a.cache_dir, progress=True)
