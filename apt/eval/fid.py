"""Fréchet Inception Distance for 1024px PNG images, offline, torchmetrics + Inception TorchScript.

Protocol:
- Detector: Inception-v3 2015-12-05, the direct TorchScript translation of TensorFlow's
  `inception-2015-12-05.tgz` made for StyleGAN2-ADA and reused by clean-fid, file
  `inception-2015-12-05.pt`, public copy
  https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt
  (StyleGAN3 `metrics/frechet_inception_distance.py` ships the same network pickled at
  https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl).
  Loaded with `torch.jit.load` from a local path only; features = pool3, 2048-d.
- Call convention of that TorchScript (StyleGAN3 `compute_fid`: `detector_kwargs =
  dict(return_features=True)` on uint8 NCHW; clean-fid `cleanfid/inception_torchscript.py`
  `InceptionV3W`): `model(x_uint8_NCHW, return_features=True)` takes [0, 255] images of any size,
  resizes them to 299x299 internally (bilinear `affine_grid`/`grid_sample`, no antialiasing),
  normalises `(x - 128) / 128` and returns (N, 2048). Its submodule `model.layers` takes the
  already-normalised (N, 3, 299, 299) tensor; clean-fid calls `layers((x - 128) / 128)` after its
  own resize.
- Resize 1024 -> 299, the stated filter. Default `resize="clean"`: clean-fid's "clean" mode
  (Parmar et al., "On Aliased Resizing and Surprising Subtleties in GAN Evaluation", CVPR 2022;
  `cleanfid/resize.py` `make_resizer("PIL", False, "bicubic", (299, 299))`): PIL bicubic
  (antialiased) on each channel as float32, no re-quantisation, then `layers((x - 128) / 128)`.
  `resize="torchscript"`: the model's own internal bilinear resize on uint8 input (StyleGAN2-ADA /
  StyleGAN3 / clean-fid "legacy_tensorflow"), which aliases at 1024 -> 299. The report records which.
- Inputs: PNG only. JPEG compression shifts FID (clean-fid), so a JPEG in either set is a
  ValueError. Corrupt PNGs are listed in the result and skipped.
- Statistics: the wrapper is passed as `feature=` to `torchmetrics.image.fid.FrechetInceptionDistance`,
  which accumulates feature sums in float64; mean and unbiased covariance are formed from its
  states exactly as its `compute()` does (and as clean-fid's `np.cov`). The distance itself uses
  `frechet_distance_psd`: Tr((S_g S_r)^1/2) from the eigenvalues of the symmetric F^T S_r F with
  S_g = F F^T (pivoted Cholesky; same eigenvalues as S_g S_r), because torchmetrics' general
  `eigvals` of a 2048x2048 product took 87 s on this 2-core CPU and scipy `sqrtm` 30 s, while
  this takes ~2 s (less when N < 2048 and S_g is low rank); a test checks all three agree. Real-set sums are cached
  once per (resize mode, detector sha256, file list + sizes, N) in an .npz (float64). Images
  stream in batches; nothing holds the whole set.

Legend: N images, C = 3 channels, H height, W width.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from apt.eval.frechet import (
    cached_real_stats,
    load_detector,
    report_table_markdown,
    run_facts,
    save_npz_atomic,
    set_facts,
)
from apt.eval.fvd import file_sha256
from apt.eval.video_io import read_png

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_PUBLIC_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
INCEPTION_FEATURE_DIM = 2048
INCEPTION_SIZE = 299
RESIZE_MODES = {
    "clean": "PIL bicubic (antialiased) 299x299 on float32 channels, no quantisation (clean-fid 'clean')",
    "torchscript": "Inception TorchScript internal bilinear resize to 299x299 on uint8 (StyleGAN2-ADA/3, "
    "clean-fid 'legacy_tensorflow')",
}
IMAGE_EXTENSIONS = (".png",)
REJECTED_EXTENSIONS = (".jpg", ".jpeg", ".jfif")


def load_inception(path: str, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load `inception-2015-12-05.pt` (TorchScript) from a local file or directory; never downloads."""
    return load_detector(path, filename=INCEPTION_FILENAME, metric="FID", public_url=INCEPTION_PUBLIC_URL,
                         origin="StyleGAN2-ADA / clean-fid", device=device)


class InceptionFeatures(nn.Module):
    """Inception-v3 pool3 features for torchmetrics FID (`num_features` = 2048).

    resize="clean": input float32 (N, 3, 299, 299) in [0, 255], already resized by `preprocess_image`.
    resize="torchscript": input uint8 (N, 3, H, W) in [0, 255]; the model resizes.
    """

    num_features = INCEPTION_FEATURE_DIM

    def __init__(self, model: torch.jit.ScriptModule | nn.Module, resize: str = "clean") -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {sorted(RESIZE_MODES)}, got {resize!r}")
        self.model = model
        self.resize = resize

    @torch.no_grad()
    def forward(self, imgs_NCHW: torch.Tensor) -> torch.Tensor:
        N = imgs_NCHW.shape[0]
        if self.resize == "clean":
            if imgs_NCHW.shape[1:] != (3, INCEPTION_SIZE, INCEPTION_SIZE) or not imgs_NCHW.is_floating_point():
                raise ValueError(
                    f"clean mode expects float (N, 3, 299, 299), got {imgs_NCHW.dtype} {tuple(imgs_NCHW.shape)}"
                )
            feats = self.model.layers((imgs_NCHW.float() - 128.0) / 128.0)
        else:
            if imgs_NCHW.dtype != torch.uint8 or imgs_NCHW.shape[1] != 3:
                raise ValueError(
                    f"torchscript mode expects uint8 (N, 3, H, W), got {imgs_NCHW.dtype} {tuple(imgs_NCHW.shape)}"
                )
            feats = self.model(imgs_NCHW, return_features=True)
        return feats.reshape(N, INCEPTION_FEATURE_DIM).float()


def resize_clean(img_HWC: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (size, size, 3) in [0, 255]: PIL bicubic per channel, unquantised."""
    chans = [
        np.asarray(Image.fromarray(img_HWC[:, :, c].astype(np.float32)).resize((size, size), Image.BICUBIC))
        for c in range(3)
    ]
    return np.stack(chans, axis=-1).astype(np.float32)


def preprocess_image(img_HWC: np.ndarray, resize: str = "clean") -> torch.Tensor:
    """uint8 (H, W, 3) -> the detector input for one image: float (3, 299, 299) or uint8 (3, H, W)."""
    if img_HWC.dtype != np.uint8 or img_HWC.ndim != 3 or img_HWC.shape[-1] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {img_HWC.dtype} {img_HWC.shape}")
    if resize == "clean":
        return torch.from_numpy(resize_clean(img_HWC).transpose(2, 0, 1).copy())
    if resize == "torchscript":
        return torch.from_numpy(img_HWC.transpose(2, 0, 1).copy())
    raise ValueError(f"resize must be one of {sorted(RESIZE_MODES)}, got {resize!r}")


def list_images(source: str | Sequence[str]) -> list[str]:
    """PNGs of a set: a directory (recursive, sorted), a .txt list, or a list. JPEG is a ValueError."""
    if isinstance(source, str):
        if os.path.isdir(source):
            files: list[str] = []
            for root, _dirs, names in os.walk(source):
                files += [os.path.join(root, n) for n in names]
            files.sort()
        elif os.path.isfile(source) and source.endswith(".txt"):
            base = os.path.dirname(os.path.abspath(source))
            with open(source) as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
            files = [ln if os.path.isabs(ln) else os.path.join(base, ln) for ln in lines]
        else:
            raise FileNotFoundError(f"{source!r} is neither a directory of PNGs nor a .txt file list")
    else:
        files = [str(p) for p in source]
    jpegs = [f for f in files if f.lower().endswith(REJECTED_EXTENSIONS)]
    if jpegs:
        raise ValueError(
            f"{len(jpegs)} JPEG file(s) in {source if isinstance(source, str) else 'the list'} (first: {jpegs[0]}): "
            "FID here takes PNG only, since JPEG artifacts shift FID (clean-fid); re-export as PNG"
        )
    pngs = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not pngs:
        raise FileNotFoundError(f"no PNG images in {source if isinstance(source, str) else 'the list'}")
    return pngs


def frechet_distance_psd(mu1: torch.Tensor | np.ndarray, sigma1: torch.Tensor | np.ndarray,
                         mu2: torch.Tensor | np.ndarray, sigma2: torch.Tensor | np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2), float64, symmetric solvers only.

    Factor S1 = F F^T by pivoted Cholesky (LAPACK dpstrf, exact for PSD S1 of any rank r); then
    S1 S2 is similar to F^T S2 F (r x r, symmetric PSD), so Tr((S1 S2)^1/2) is the sum of square
    roots of its eigenvalues (round-off negatives clipped to 0).
    """
    from scipy.linalg.lapack import dpstrf

    mu1, mu2, sigma1, sigma2 = (
        np.asarray(torch.as_tensor(t).cpu(), dtype=np.float64) for t in (mu1, mu2, sigma1, sigma2)
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    c, piv, rank, info = dpstrf((sigma1 + sigma1.T) / 2, lower=1)
    if info < 0:
        raise ValueError(f"dpstrf failed (info={info}): covariance is not a valid matrix")
    F = np.empty((sigma1.shape[0], rank))
    F[piv - 1] = np.tril(c)[:, :rank]
    m = F.T @ sigma2 @ F
    ev = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(ev).sum())


def _moments(feat_sum: torch.Tensor, cov_sum: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance from torchmetrics' float64 sums (as its `compute()`)."""
    mean = feat_sum.double() / n
    cov = (cov_sum.double() - n * torch.outer(mean, mean)) / (n - 1)
    return mean, cov


def _make_metric(detector: InceptionFeatures, device: str | torch.device):
    from torchmetrics.image.fid import FrechetInceptionDistance

    # normalize only shapes torchmetrics' dummy input for modules without `num_features`.
    return FrechetInceptionDistance(feature=detector, reset_real_features=False, normalize=False).to(device)


def _feed(metric, paths: Sequence[str], *, real: bool, resize: str, batch_size: int,
          num_images: int | None, device: str | torch.device, expected_size: int | None) -> dict:
    """Stream PNGs into the metric; returns what happened (skipped files, sizes seen)."""
    skipped: list[dict] = []
    sizes: list[str] = []
    off_size = 0
    batch: list[torch.Tensor] = []
    n_done = 0

    def update() -> None:
        nonlocal n_done
        if len({tuple(b.shape) for b in batch}) > 1:
            shapes = sorted({tuple(b.shape) for b in batch})
            raise ValueError(f"resize={resize!r} needs same-size images in a batch, got {shapes}")
        metric.update(torch.stack(batch).to(device), real=real)
        n_done += len(batch)
        batch.clear()

    limit = len(paths) if num_images is None else num_images
    for path in paths:
        if n_done + len(batch) >= limit:
            break
        try:
            img_HWC = read_png(path)
        except ValueError:
            raise  # not a PNG (e.g. JPEG bytes under .png): a user error, not a corrupt file
        except OSError as e:
            skipped.append({"path": path, "reason": f"{type(e).__name__}: {e}"})
            warnings.warn(f"FID: skipping {path}: {e}", stacklevel=2)
            continue
        size = f"{img_HWC.shape[1]}x{img_HWC.shape[0]}"
        if size not in sizes and len(sizes) < 16:
            sizes.append(size)
        if expected_size is not None and img_HWC.shape[:2] != (expected_size, expected_size):
            off_size += 1
        batch.append(preprocess_image(img_HWC, resize))
        if len(batch) == batch_size:
            update()
    if batch:
        update()
    if off_size:
        warnings.warn(f"FID: {off_size} images are not {expected_size}x{expected_size} (sizes: {sizes})", stacklevel=2)
    return {"n": n_done, "skipped": skipped, "source_sizes": sizes, "not_expected_size": off_size}


def _save_real(path: str, metric, info: dict) -> None:
    save_npz_atomic(path, sum_D=metric.real_features_sum.double().cpu().numpy(),
                    sum_DD=metric.real_features_cov_sum.double().cpu().numpy(),
                    n=int(metric.real_features_num_samples), meta=json.dumps(info))


def _load_real(path: str, metric, device: str | torch.device) -> dict:
    z = np.load(path)
    metric.real_features_sum = torch.from_numpy(z["sum_D"]).double().to(device)
    metric.real_features_cov_sum = torch.from_numpy(z["sum_DD"]).double().to(device)
    metric.real_features_num_samples = torch.tensor(int(z["n"]), dtype=torch.long, device=device)
    return json.loads(str(z["meta"]))


def compute_fid(
    gen: str | Sequence[str],
    real: str | Sequence[str],
    *,
    inception_path: str,
    resize: str = "clean",
    num_images: int | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    expected_size: int | None = 1024,
) -> dict:
    """FID between two PNG sets (directory, .txt list or list of paths); returns the report dict.

    num_images: N per set (the first N decodable files in sorted order); None = all files.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {sorted(RESIZE_MODES)}, got {resize!r}")
    t0 = time.time()
    if os.path.isdir(inception_path):
        inception_path = os.path.join(inception_path, INCEPTION_FILENAME)
    detector = InceptionFeatures(load_inception(inception_path, device), resize=resize)
    sha = file_sha256(inception_path)
    metric = _make_metric(detector, device)
    real_paths, gen_paths = list_images(real), list_images(gen)
    feed = dict(resize=resize, batch_size=batch_size, num_images=num_images, device=device,
                expected_size=expected_size)

    real_info, cache_file, hit = cached_real_stats(
        cache_dir, prefix="fid_real", paths=real_paths,
        key_fields={"resize": resize, "detector_sha256": sha, "num_images": num_images, "version": 1},
        compute=lambda: _feed(metric, real_paths, real=True, **feed),
        save=lambda path, info: _save_real(path, metric, info),
        load=lambda path: _load_real(path, metric, device),
    )
    gen_info = _feed(metric, gen_paths, real=False, **feed)
    for name, info in (("generated", gen_info), ("real", real_info)):
        if info["n"] < 2:
            raise ValueError(f"FID needs at least 2 {name} images, got {info['n']}")
    mu_r, sig_r = _moments(metric.real_features_sum, metric.real_features_cov_sum,
                          int(metric.real_features_num_samples))
    mu_g, sig_g = _moments(metric.fake_features_sum, metric.fake_features_cov_sum,
                          int(metric.fake_features_num_samples))
    value = frechet_distance_psd(mu_g, sig_g, mu_r, sig_r)
    return {
        "metric": "fid",
        "fid": value,
        "protocol": "FID, Inception-v3 2015-12-05 TorchScript pool3 (StyleGAN2-ADA/clean-fid), torchmetrics",
        "resize": resize,
        "resize_filter": RESIZE_MODES[resize],
        "crop": "none",
        "expected_size": expected_size,
        "N": num_images,
        **set_facts(
            gen, real, num_generated=gen_info["n"], num_real=real_info["n"],
            source_sizes={"generated": gen_info["source_sizes"], "real": real_info["source_sizes"]},
            detector_file=inception_path, detector_sha256=sha, public_source=INCEPTION_PUBLIC_URL,
            call="layers((x - 128) / 128) on 299x299 float" if resize == "clean"
            else "model(x_uint8, return_features=True)",
            feature_dim=INCEPTION_FEATURE_DIM,
        ),
        "covariance": "1/(N-1) (torchmetrics, as clean-fid np.cov), float64 sums",
        "distance": "Tr sqrt via eigvalsh(F^T S_r F), S_g = F F^T pivoted Cholesky, float64 (frechet_distance_psd)",
        **run_facts(skipped={"generated": gen_info["skipped"], "real": real_info["skipped"]},
                    cache_file=cache_file, cache_hit=hit, batch_size=batch_size, device=device, started=t0),
    }


def fid_report_markdown(result: dict, title: str = "FID") -> str:
    """A markdown table of one FID result with its protocol facts."""
    return report_table_markdown(result, title=title, metric_rows=[
        ("FID", f"{result['fid']:.3f}"),
        ("N (generated / real)",
         f"{result['num_generated']} / {result['num_real']} (requested {result['N'] or 'all'})"),
        ("resize", result["resize_filter"]),
        ("source sizes", f"gen {result['source_sizes']['generated']}, real {result['source_sizes']['real']}"),
    ])


# --------------------------------------------------------------------------- command line


def add_fid_args(p: argparse.ArgumentParser) -> None:
    """The FID options shared by eval/fid.py and eval/benchmark_images.py (read by `fid_from_args`)."""
    p.add_argument("--inception", required=True, help="local path of inception-2015-12-05.pt (or its directory)")
    p.add_argument("--resize", choices=sorted(RESIZE_MODES), default="clean",
                   help="clean = PIL bicubic to 299 (default); torchscript = the model's own bilinear resize")
    p.add_argument("--num-images", type=int, default=None, help="N per set (default: all files)")
    p.add_argument("--expected-size", type=int, default=1024, help="warn when images are not this square size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/apt/fid"),
                   help="real-set statistics cache ('none' to disable)")
    p.add_argument("--clip-dir", default=None, help="local transformers CLIP directory (optional)")
    p.add_argument("--prompts", default=None, help=".txt/.json prompts for the CLIP score")


def fid_from_args(a: argparse.Namespace, gen: str) -> dict:
    """`compute_fid(gen, a.real, ...)` with the options of `add_fid_args`, plus a CLIP score if `a.clip_dir`.

    For the CLIP score, prompt i belongs to the i-th image in sorted order (cycling).
    """
    result = compute_fid(gen, a.real, inception_path=a.inception, resize=a.resize, num_images=a.num_images,
                         batch_size=a.batch_size, device=a.device, expected_size=a.expected_size,
                         cache_dir=None if a.cache_dir == "none" else a.cache_dir)
    if a.clip_dir:
        from apt.eval.clip_score import clip_score_files, load_prompts

        if not a.prompts:
            raise ValueError("--clip-dir needs --prompts (prompt i belongs to image i in sorted order)")
        prompts = load_prompts(a.prompts)
        paths = list_images(gen)[: result["num_generated"]]
        result["clip"] = clip_score_files(paths, [prompts[i % len(prompts)] for i in range(len(paths))],
                                          model_dir=a.clip_dir, batch_size=a.batch_size, device=a.device)
    return result
