"""Train one toy transformer by flow matching on procedural shape videos (CPU, resumable).

Wan's convention: x_t = (1 - sigma) * x0 + sigma * noise, target velocity = noise - x0, model
timestep = sigma * 1000. Text is dropped (replaced by the empty prompt, all zeros) with
probability 0.1 so the model supports classifier-free guidance. An EMA of the weights is what
gets shipped (FP16 safetensors + config in families/toy_weights/<size>/).

    python scripts/train_toy.py --size large --steps 2000 --threads 2
    python scripts/train_toy.py --size small --steps 2000 --threads 1
    python scripts/train_toy.py --plot                      # docs/toy-training-loss.png from the logs
    python scripts/train_toy.py --eval --guidance 4 --shift 3 --sample-steps 20 --seeds 1
        # sample every prompt of the vocabulary with the shipped weights (plain diffusers UniPC loop
        # with CFG, independent of flowblend's runtime) and score with toy/probes.py
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..families.toy_model import TOY_FRAMES, WEIGHTS_DIR, ToyTextEncoder, build_toy_transformer
from .data import GEOMETRIES, sample_batch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("large", "small"))
    p.add_argument("--plot", action="store_true", help="plot the loss logs in --work to docs/toy-training-loss.png")
    p.add_argument("--stage-logs", nargs="+", metavar="SIZE=LOG[,LOG...]",
                   help="--plot: the loss.jsonl of each training stage in order, e.g. large=a.jsonl,b.jsonl")
    p.add_argument("--eval", action="store_true", help="sample and probe the shipped weights (see module doc)")
    p.add_argument("--sizes", nargs="+", default=["large", "small"], help="--eval: which models")
    p.add_argument("--guidance", type=float, nargs="+", default=[4.0], help="--eval: CFG scales")
    p.add_argument("--shift", type=float, nargs="+", default=[3.0], help="--eval: UniPC flow_shift values")
    p.add_argument("--sample-steps", type=int, nargs="+", default=[20], help="--eval: sampling steps")
    p.add_argument("--seeds", type=int, default=1, help="--eval: seeds per prompt (x72 prompts)")
    p.add_argument("--weights-dir", default=str(WEIGHTS_DIR), help="--eval: weights to score (default: shipped)")
    p.add_argument("--eval-out", default="artifacts/toy-train/eval.jsonl", help="--eval: results appended here")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true",
                   help="train through torch.compile (a ~1 min compile; on the 2-core VM steps were 1.4x faster "
                        "in a 40-step test, with no clear gain over the one-hour run; same weights layout, so "
                        "checkpoints resume either way)")
    p.add_argument("--work", default="artifacts/toy-train", help="checkpoints and logs (resumed from)")
    p.add_argument("--out", default=str(WEIGHTS_DIR), help="where the FP16 EMA weights are saved")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--sigma-sampling", choices=("shift", "logit-normal"), default="shift",
                   help="shift: Wan-style s ~ U(0,1), sigma = s*k/(1+(k-1)*s) with k = --train-shift")
    p.add_argument("--train-shift", type=float, default=3.0)
    p.add_argument("--edge-weight", type=float, default=0.0,
                   help="extra loss weight on pixels within 2 px of a shape's outline (where the shapes differ); 0 = plain MSE")
    p.add_argument("--geometry", choices=tuple(GEOMETRIES), default="v2",
                   help="training data: v2 (default, the toy world) or v1 (the smaller shapes of the first runs)")
    p.add_argument("--init-from", default=None,
                   help="start (model and EMA weights only) from this checkpoint.pt, or from a saved weights "
                        "folder such as families/toy_weights/large (continued training); ignored when resuming")
    return p.parse_args()


def sample_sigmas(rng: torch.Generator, n: int, mode: str = "shift", shift: float = 3.0) -> torch.Tensor:
    """Training noise levels. 'shift' (default): Wan's shifted-uniform, which puts as much weight on
    the high noise levels the sampler spends its first steps at as the sampler does (shift 3: a
    quarter of the samples above sigma 0.9). 'logit-normal' (SD3): mostly mid noise, hardly any above
    0.9 -- the first toy run used it and its samples had no coherent layout (docs/toy-training.md)."""
    if mode == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=rng))
    s = torch.rand(n, generator=rng)
    return s * shift / (1 + (shift - 1) * s)


def outline_band(x0: torch.Tensor, width: int = 2) -> torch.Tensor:
    """[B, 1, F, H, W] 1 within `width` px of the foreground's outline, else 0: where a circle, a
    square and a triangle of one size and place differ, and so where the shape word has to act."""
    fg = (x0.amax(dim=1, keepdim=True) > -0.5).float()
    k = (1, 2 * width + 1, 2 * width + 1)
    pool = lambda m: torch.nn.functional.max_pool3d(m, k, stride=1, padding=(0, width, width))  # noqa: E731
    return pool(fg) - (1 - pool(1 - fg))


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def sample_videos(model, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 4.0,
                  shift: float = 3.0, frames: int = TOY_FRAMES, batch: int = 72) -> torch.Tensor:
    """Reference sampler: what a diffusers Wan pipeline does (UniPC flow-prediction, CFG with the
    empty prompt = zero embeddings), written out so it checks the weights independently of flowblend."""
    from diffusers import UniPCMultistepScheduler

    encoder = ToyTextEncoder()
    out = []
    for i in range(0, len(prompts), batch):
        p, sd = prompts[i:i + batch], seeds[i:i + batch]
        cond, _ = encoder.encode(p)
        uncond = torch.zeros_like(cond)
        latents = torch.stack([torch.randn(3, frames, 32, 32, generator=torch.Generator().manual_seed(s))
                               for s in sd])
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=shift, num_train_timesteps=1000)
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            n = len(p)
            both = model(hidden_states=torch.cat([latents, latents]), timestep=t.float().expand(2 * n),
                         encoder_hidden_states=torch.cat([cond, uncond]), return_dict=False)[0].float()
            v_c, v_u = both[:n], both[n:]
            v = v_u + guidance * (v_c - v_u) if guidance != 1.0 else v_c
            latents = sched.step(v, t, latents, return_dict=False)[0]
        out.append(latents.clamp(-1, 1))
    return torch.cat(out)


def run_eval(args):
    from ..families.toy_model import load_toy_transformer
    from .data import all_prompts
    from .probes import score_set

    specs = [s for s in all_prompts() for _ in range(args.seeds)]
    seeds = [1000 + i for i in range(len(specs))]
    Path(args.eval_out).parent.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        model = load_toy_transformer(size, Path(args.weights_dir))  # FP16 on disk, FP32 here
        for steps in args.sample_steps:
            for shift in args.shift:
                for g in args.guidance:
                    t0 = time.time()
                    videos = sample_videos(model, [s.text for s in specs], seeds, steps, g, shift)
                    scores = score_set(list(videos), specs)
                    row = {"size": size, "steps": steps, "shift": shift, "guidance": g, "videos": len(specs),
                           "seconds": round(time.time() - t0, 1), **{k: round(v, 4) for k, v in scores.items()}}
                    print(json.dumps(row), flush=True)
                    with open(args.eval_out, "a") as f:
                        f.write(json.dumps(row) + "\n")


def read_stage_logs(paths: list[Path]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Loss logs of consecutive training stages, stage k's steps offset to follow stage k-1's; also
    the steps where each later stage starts."""
    steps, losses, starts, offset = [], [], [], 0
    for path in paths:
        rows = {}
        for line in Path(path).read_text().splitlines():  # a resumed run may repeat steps: keep the last
            r = json.loads(line)
            rows[r["step"]] = r["loss"]
        if offset:
            starts.append(offset)
        steps += [offset + k for k in sorted(rows)]
        losses += [rows[k] for k in sorted(rows)]
        offset = steps[-1] + 1
    return np.array(steps), np.array(losses), starts


def plot_losses(work: Path, out: Path = Path("docs/toy-training-loss.png"), window: int = 50,
                stage_logs: dict[str, list[Path]] | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    staged = False
    for size in ("large", "small"):
        paths = (stage_logs or {}).get(size) or [work / size / "loss.jsonl"]
        if not all(Path(p).exists() for p in paths):
            continue
        steps, loss, starts = read_stage_logs(paths)
        staged = staged or bool(starts)
        raw = ax.plot(steps, loss, alpha=0.2, lw=0.6)[0]
        for start in starts:  # where a later stage (continued training, other data or loss) begins
            ax.axvline(start, ls=":", lw=0.8, color=raw.get_color())
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1.5, color=raw.get_color(),
                label=f"{size} (final {window}-step mean {smooth[-1]:.4f})")
    ax.set_yscale("log")
    ax.set_xlabel("step (batch 16)")
    ax.set_ylabel("flow-matching loss")
    ax.set_title("Toy pair training loss" + (" (dotted: a new stage)" if staged else "")
                 + "\n--edge-weight runs weight the outline 5x: not on the plain-MSE scale", fontsize=10)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.plot:
        stages = {}
        for item in args.stage_logs or []:
            size, _, logs = item.partition("=")
            stages[size] = [Path(x) for x in logs.split(",")]
        return plot_losses(Path(args.work), stage_logs=stages)
    if args.eval:
        return run_eval(args)
    if args.size is None:
        raise SystemExit("--size large|small is required for training")
    work = Path(args.work) / args.size
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = build_toy_transformer(args.size).train()
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    encoder = ToyTextEncoder()
    start_step = 0
    ckpt_path = work / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        start_step = ckpt["step"]
        print(f"resumed {args.size} from step {start_step}", flush=True)
    elif args.init_from and Path(args.init_from).is_dir():
        saved = type(model).from_pretrained(args.init_from, torch_dtype=torch.float32).state_dict()
        model.load_state_dict(saved)
        ema.load_state_dict(saved)
        print(f"initialised {args.size} from the saved weights in {args.init_from}", flush=True)
    elif args.init_from:
        ckpt = torch.load(args.init_from, weights_only=False)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        print(f"initialised {args.size} from {args.init_from} (its step {ckpt['step']})", flush=True)
    forward = torch.compile(model) if args.compile else model
    # data and noise streams are a function of (seed, step): a resumed run sees the same batches
    log = open(work / "loss.jsonl", "a")
    t0 = time.time()
    for step in range(start_step, args.steps):
        data_rng = np.random.default_rng([args.seed, step])
        torch_rng = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        videos, texts = sample_batch(data_rng, args.batch, frames=TOY_FRAMES, geometry=GEOMETRIES[args.geometry])
        x0 = torch.from_numpy(videos)
        embeds, _ = encoder.encode(texts)
        drop = torch.rand(args.batch, generator=torch_rng) < args.cfg_dropout
        embeds[drop] = 0.0
        noise = torch.randn(x0.shape, generator=torch_rng)
        sigma = sample_sigmas(torch_rng, args.batch, args.sigma_sampling, args.train_shift)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        target = noise - x0
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        pred = forward(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=embeds, return_dict=False)[0]
        if args.edge_weight:
            loss = ((pred - target) ** 2 * (1 + args.edge_weight * outline_band(x0))).mean()
        else:
            loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        log.write(json.dumps({"step": step, "loss": round(loss.item(), 5), "lr": lr_at(step, args),
                              "elapsed": round(time.time() - t0, 1)}) + "\n")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            log.flush()
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "step": step + 1}, tmp)
            os.replace(tmp, ckpt_path)
            print(f"{args.size} step {step + 1}/{args.steps} loss {loss.item():.4f} "
                  f"{(time.time() - t0) / (step + 1 - start_step):.2f} s/step", flush=True)
    out = Path(args.out) / args.size
    tmp_dir = out.with_name(f".{args.size}.partial")
    ema.to(torch.float16).save_pretrained(tmp_dir, safe_serialization=True)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    os.replace(tmp_dir, out)
    print(f"saved {out}", flush=True)


if __name__ == "__main__":
    main()
