"""Parameters trained and bytes held per network, full fine-tune vs LoRA generator (docs/byo_model.md §5).

    python eval/lora_memory.py --recipes --rank 64            # production recipes, counted on the meta device
    python eval/lora_memory.py --toy --ranks 4 16             # the demo flavour, measured (3 steps of each stage)

``--recipes``: every production transformer (``apt.models.adapters.sizes.PRODUCTION``, plus the built-in
``apt-8b`` flavour) is built on the meta device (no memory, no weights); LoRA adapters of ``--rank`` on the
default targets (attention projections, ``apt.lora.DEFAULT_TARGETS``) are injected on meta too, and the
parameters counted. Bytes use pure bf16 (2 bytes per value, as the paper trains): a trained tensor holds
value + gradient + optimiser state (AdamW in distillation: 2 states; RMSProp in APT: 1), a frozen one its
value only. Networks: distillation = student, its EMA, the frozen teacher; APT = G, its EMA, D (backbone +
readout heads, always fully trained). With LoRA the student / G hold the shared base once, the teacher is
that same base (0 extra bytes) and the EMA is the EMA adapters. Activations, text encoder and VAE excluded.

``--toy``: the demo flavour (recipes/demo/distill.yaml, apt_video.yaml at batch 64), one subprocess per
configuration: three optimiser steps, then the bytes of the tensors each network holds (parameters,
gradients, optimiser state; shared storages counted once) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GIB = 1024**3


# -- production recipes, meta device --------------------------------------------------------------------
def meta_counts(name: str, rank: int) -> dict:
    from apt import lora
    from apt.config import LoraConfig
    from apt.models.adapters.sizes import production_adapter, readout_head_params
    from apt.models.registry import build_dit

    if name == "apt-8b":
        with torch.device("meta"):
            net = build_dit("apt-8b")
        source = "builtin"
    else:
        net, source = production_adapter(name), "diffusers"
    P = sum(p.numel() for p in net.parameters())
    heads = readout_head_params(net.hidden_dim)
    with torch.device("meta"):
        lora.add_adapters(net, LoraConfig(rank=rank), source, adapters=(lora.TRAINED,))
    A = sum(p.numel() for p in lora.adapter_parameters(net))
    return {"recipe": name, "params": P, "readout_heads": heads, "lora_params": A, "rank": rank}


def stage_bytes(c: dict) -> dict:
    """Bytes per network (pure bf16) and trained parameters, full vs LoRA, distillation and APT."""
    P, A, H = c["params"], c["lora_params"], c["readout_heads"]
    adamw, rmsprop = 2 + 2 + 4, 2 + 2 + 2  # value + grad + optimiser state(s), bf16
    return {
        "distill_full": {"trained": P, "student": adamw * P, "ema": 2 * P, "teacher": 2 * P},
        "distill_lora": {"trained": A, "student": 2 * P + adamw * A, "ema": 2 * A, "teacher": 0},
        "apt_full": {"trained": P + P + H, "G": rmsprop * P, "ema": 2 * P, "D": rmsprop * (P + H)},
        "apt_lora": {"trained": A + P + H, "G": 2 * P + rmsprop * A, "ema": 2 * A, "D": rmsprop * (P + H)},
    }


def print_recipes(rank: int) -> list[dict]:
    names = ["sd3", "flux", "wan", "cogvideox", "ltx", "hunyuan", "apt-8b"]
    rows = []
    print(f"| recipe | params | LoRA r={rank} params (% of G) | distill, full: student / EMA / teacher = total | distill, LoRA: student / EMA / teacher = total "
          f"| APT G trained, full / LoRA | APT, full: G / EMA / D = total | APT, LoRA: G / EMA / D = total |")
    print("| --- " * 8 + "|")
    for n in names:
        c = meta_counts(n, rank)
        b = stage_bytes(c)
        rows.append({**c, **b})

        def nets(d: dict, keys: tuple[str, ...]) -> str:
            return " / ".join(f"{d[k] / GIB:.1f}" for k in keys) + f" = {sum(d[k] for k in keys) / GIB:.1f} GiB"

        print(f"| {n} | {c['params'] / 1e9:.2f} B | {c['lora_params'] / 1e6:.1f} M ({100 * c['lora_params'] / c['params']:.2f} %) "
              f"| {nets(b['distill_full'], ('student', 'ema', 'teacher'))} | {nets(b['distill_lora'], ('student', 'ema', 'teacher'))} "
              f"| {c['params'] / 1e9:.2f} B / {c['lora_params'] / 1e6:.1f} M | {nets(b['apt_full'], ('G', 'ema', 'D'))} | {nets(b['apt_lora'], ('G', 'ema', 'D'))} |")
    return rows


# -- the toy, measured ----------------------------------------------------------------------------------
def held_bytes(module, optimizers) -> dict[str, int]:
    """Bytes of parameters + gradients + optimiser state per network attribute; a storage shared by several
    networks is counted once, for the first that holds it (order: net/generator, then the others)."""
    from apt import lora

    seen: set[int] = set()
    state = {id(p): s for opt in optimizers for p, s in opt.state.items()}

    def count(t: torch.Tensor | None) -> int:
        if t is None or t.untyped_storage().data_ptr() in seen:
            return 0
        seen.add(t.untyped_storage().data_ptr())
        return t.untyped_storage().nbytes()

    out = {}
    attrs = ["net", "generator", "net_ema", "generator_ema", "teacher", "discriminator"]
    for attr in attrs:
        net = getattr(module, attr, None)
        if isinstance(net, lora.WithoutAdapters):
            net = net.net
        if not isinstance(net, torch.nn.Module):
            continue
        total = 0
        for p in net.parameters():
            total += count(p) + count(p.grad)
            total += sum(count(v) for v in state.get(id(p), {}).values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        out[attr] = total
    return out


def run_one(stage: str, rank: int, init: str, teacher: str) -> dict:
    """Three optimiser steps of one stage at the demo recipe's batch, then what each network holds."""
    from apt.config import load_config
    from apt.methods.update import OptimizerUpdate
    from apt.train import STAGES
    from tests.distributed_helpers.apt_steps import global_batch

    recipe = {"distill": "recipes/demo/distill.yaml", "apt": "recipes/demo/apt_video.yaml"}[stage]
    overrides = [f"lora.rank={rank}", "apt.d_warmup_steps=0", f"distill.teacher={teacher}", f"apt.generator={init}", f"apt.teacher={teacher}"]
    c = load_config(recipe, [], overrides)
    torch.manual_seed(0)
    module = STAGES[stage](c)
    batch = global_batch(c.data.batch_size, 4)
    if stage == "distill":
        opt = module.configure_optimizers()["optimizer"]
        optimizers = [opt]
        for _ in range(3):
            opt.zero_grad()
            module.part_loss(batch).backward()
            opt.step()
    else:
        optimizers = list(module.configure_optimizers())
        for _ in range(3):
            module.run_step([batch], update_g=OptimizerUpdate(optimizers[0], module.generator), update_d=OptimizerUpdate(optimizers[1], module.discriminator))
    held = held_bytes(module, optimizers)
    trained = {attr: sum(p.numel() for p in getattr(module, attr).parameters() if p.requires_grad)
               for attr in ("net", "generator", "discriminator") if isinstance(getattr(module, attr, None), torch.nn.Module)}
    return {"stage": stage, "rank": rank, "held_bytes": held, "trained_params": trained,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", action="store_true")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--teacher", default="assets/demo_teacher")
    ap.add_argument("--init", default="assets/demo_teacher", help="APT generator init (memory does not depend on its weights)")
    ap.add_argument("--one", nargs=2, metavar=("STAGE", "RANK"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.init, args.teacher)))
        return 0
    results = {}
    if args.recipes:
        results["recipes"] = print_recipes(args.rank)
    if args.toy:
        done = json.loads(Path(args.out).read_text()).get("toy", []) if args.out and Path(args.out).exists() else []
        toy = []
        for stage in ("distill", "apt"):
            for rank in (0, *args.ranks):
                prior = [r for r in done if (r["stage"], r["rank"]) == (stage, rank)]  # an interrupted run continues
                if not prior:
                    cmd = [sys.executable, __file__, "--one", stage, str(rank), "--init", args.init, "--teacher", args.teacher]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                    prior = [json.loads(out.strip().splitlines()[-1])]
                toy.append(prior[0])
                if args.out:
                    Path(args.out).write_text(json.dumps({**results, "toy": toy}, indent=1))
        print("\n| stage | generator | trained params (generator / D) | held per network (params + grads + optimiser state) | peak RSS |")
        print("| --- | --- | --- | --- | --- |")
        for r in toy:
            held = ", ".join(f"{k} {v / 1024**2:.2f} MiB" for k, v in r["held_bytes"].items())
            trained = " / ".join(f"{v:,}" for v in r["trained_params"].values())
            print(f"| {r['stage']} | {'full' if r['rank'] == 0 else 'LoRA r=' + str(r['rank'])} | {trained} | {held} | {r['peak_rss_mib']:.0f} MiB |")
        results["toy"] = toy
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
