"""What an APT discriminator's logit follows among its generator's samples: shape, distractor, alignment.

    python experiments/d_probe.py runs/demo/apt_video/checkpoints/step-000200 [--num-samples 2000] [--num-real 1000]

Draws one-step samples of the checkpoint's EMA generator (prompts ``eval_prompts(n, seed=--seed)``, noise
seeds --noise-seed + i) and real clips (``make_sample(i, --seed)``), scores both with the checkpoint's D at
each --timesteps value (one t for the whole set; the logit is the mean over them) and prints one JSON line:

    d_real, d_fake                 mean logits (the training logs' margin is their difference)
    ambiguous_shape, distractor_visible, misaligned
                                   shares of the samples (``apt.toy.metrics.judge``,
                                   ``apt.toy.content.distractor_shown``), the real clips' next to them
    d_fake_by                      the samples' mean logit with and without each property
    auc_logit                      per property, P(logit of a sample without it > logit of one with it) (for
                                   the distractor, with > without): 0.5 means D's logit does not see it
    auc_logit_per_t                the same at each timestep alone
    auc_linear_probe               the same for a logistic regression on D's readout features (the heads'
                                   outputs, mean over the timesteps), 5-fold cross-validated: whether the
                                   information is in D's features even where the logit does not use it

docs/log/demo_tuning.md (fourteenth round) uses it: the demo's D follows the distractor, not the ambiguous shapes
that hold most of the one-step row's remaining distance.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from scipy.stats import rankdata

from apt.inference import load_discriminator, load_generator
from apt.toy.classifier import load_toy_classifier
from apt.toy.content import distractor_shown
from apt.toy.metrics import judge, real_batches
from apt.toy.report import generate_seeded
from apt.toy.world import eval_prompts

FOLDS = 5


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney); None if a class is empty."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def probe_auc(feats_ND: torch.Tensor, positive: np.ndarray, *, l2: float = 1e-2, seed: int = 0) -> float | None:
    """Cross-validated AUC of an L2-regularised logistic regression on standardised features (FOLDS folds)."""
    y = torch.from_numpy(positive.astype(np.float64))
    if y.sum() < FOLDS or (1 - y).sum() < FOLDS:
        return None
    x = feats_ND.double()
    fold_N = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) % FOLDS
    scores = torch.empty(len(y), dtype=torch.float64)
    for k in range(FOLDS):
        train, test = fold_N != k, fold_N == k
        mu, sd = x[train].mean(0), x[train].std(0).clamp_min(1e-8)
        xt = (x[train] - mu) / sd
        w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

        def closure(opt=opt, xt=xt, w=w, train=train):
            opt.zero_grad()
            logits = xt @ w[:-1] + w[-1]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[train]) + l2 * (w[:-1] ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            scores[test] = ((x[test] - mu) / sd) @ w[:-1] + w[-1]
    return auc(scores.numpy(), positive)


@torch.no_grad()
def d_scores(D, text_encoder, x_BCTHW: torch.Tensor, prompts: list[str], timesteps: list[float], batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (T, N), one row per timestep, and the readout features (N, K * D) averaged over the timesteps."""
    logits, feats = [], []
    for t in timesteps:
        row_l, row_f = [], []
        for i in range(0, len(prompts), batch):
            x, text = x_BCTHW[i : i + batch], text_encoder.encode(prompts[i : i + batch])
            t_B = torch.full((x.shape[0],), float(t))
            f = D.readout(x, t_B, text)
            row_f.append(f)
            row_l.append(D.logit(f))
        logits.append(torch.cat(row_l))
        feats.append(torch.cat(row_f))
    return torch.stack(logits), torch.stack(feats).mean(0)


def probe(checkpoint: str, *, num_samples: int = 2000, num_real: int = 1000, seed: int = 777, noise_seed: int = 50_000,
          timesteps: tuple[float, ...] = (0.2, 0.5, 0.8), classifier: str = "assets/toy_classifier") -> dict:
    D, text_encoder = load_discriminator(checkpoint)
    gen = load_generator(checkpoint)
    judge_net = load_toy_classifier(classifier)
    frames = gen.num_frames
    prompts = eval_prompts(num_samples, seed=seed, frames=frames)
    x_fake = generate_seeded(gen, prompts, [noise_seed + i for i in range(num_samples)], steps=1)
    x_real, captions_real = next(real_batches(frames, num_real, seed, batch_size=num_real))
    _, ok_N, ambiguous_N = judge(judge_net, x_fake, prompts)
    _, _, ambiguous_real = judge(judge_net, x_real, captions_real)
    shown_N = distractor_shown(x_fake, prompts)
    logits_fake_TN, feats_fake = d_scores(D, text_encoder, x_fake, prompts, list(timesteps))
    logits_real_TN, _ = d_scores(D, text_encoder, x_real, captions_real, list(timesteps))
    logit_N = logits_fake_TN.mean(0).numpy()
    # Each property with the direction in which a sample looks more real: clear shape, distractor shown, aligned.
    props = {"ambiguous_shape": (~ambiguous_N, ambiguous_N), "distractor_visible": (shown_N, ~shown_N), "misaligned": (ok_N, ~ok_N)}

    def group_mean(mask) -> float | None:
        return round(float(logit_N[mask].mean()), 3) if mask.any() else None

    return {
        "checkpoint": checkpoint, "n_fake": num_samples, "n_real": num_real, "seed": seed, "noise_seed": noise_seed, "timesteps": list(timesteps),
        "d_real": round(logits_real_TN.mean().item(), 3), "d_fake": round(float(logit_N.mean()), 3),
        "ambiguous_shape": float(ambiguous_N.mean()), "real_ambiguous_shape": float(ambiguous_real.mean()),
        "distractor_visible": float(shown_N.mean()), "real_distractor_visible": float(distractor_shown(x_real, captions_real).mean()),
        "misaligned": float(1 - ok_N.mean()),
        "d_fake_by": {name: {"more_real": group_mean(good), "less_real": group_mean(bad)} for name, (good, bad) in props.items()},
        "auc_logit": {name: _round(auc(logit_N, good)) for name, (good, _) in props.items()},
        "auc_logit_per_t": {name: [_round(auc(row.numpy(), good)) for row in logits_fake_TN] for name, (good, _) in props.items()},
        "auc_linear_probe": {name: _round(probe_auc(feats_fake, good)) for name, (good, _) in props.items()},
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="an APT checkpoint (or run) directory with discriminator.safetensors")
    ap.add_argument("--num-samples", type=int, default=2000, help="one-step samples of the EMA generator")
    ap.add_argument("--num-real", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=777, help="prompt seed of the samples and of the real clips")
    ap.add_argument("--noise-seed", type=int, default=50_000)
    ap.add_argument("--timesteps", type=float, nargs="+", default=[0.2, 0.5, 0.8], help="D's timestep inputs (the logit is their mean)")
    ap.add_argument("--classifier", default="assets/toy_classifier")
    args = ap.parse_args(argv)
    row = probe(args.checkpoint, num_samples=args.num_samples, num_real=args.num_real, seed=args.seed, noise_seed=args.noise_seed,
                timesteps=tuple(args.timesteps), classifier=args.classifier)
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
