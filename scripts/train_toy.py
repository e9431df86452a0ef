"""Train one toy transformer by flow matching on procedural shape videos (CPU, resumable).

Wan's convention: x_t = (1 - sigma) * x0 + sigma * noise, target velocity = noise - x0, model
timestep = sigma * 1000. Text is dropped (replaced by the empty prompt, all zeros) with
probability 0.1 so the model supports classifier-free guidance. An EMA of the weights is what
gets shipped (FP16 safetensors + config in export/toy_weights/<size>/).

    python scripts/train_toy.py --size large --steps 2000 --threads 2
    python scripts/train_toy.py --size small --steps 2000 --threads 1
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

from flowblend.calibrate.toydata import sample_batch
from flowblend.export.toy import TOY_FRAMES, WEIGHTS_DIR, ToyTextEncoder, build_toy_transformer


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("large", "small"), required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="artifacts/toy-train", help="checkpoints and logs (resumed from)")
    p.add_argument("--out", default=str(WEIGHTS_DIR), help="where the FP16 EMA weights are saved")
    p.add_argument("--checkpoint-every", type=int, default=100)
    return p.parse_args()


def sample_sigmas(rng: torch.Generator, n: int) -> torch.Tensor:
    """Logit-normal noise levels (SD3's choice): most weight in the middle, none exactly at 0 or 1."""
    return torch.sigmoid(torch.randn(n, generator=rng))


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
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
    # data and noise streams are a function of (seed, step): a resumed run sees the same batches
    log = open(work / "loss.jsonl", "a")
    t0 = time.time()
    for step in range(start_step, args.steps):
        data_rng = np.random.default_rng([args.seed, step])
        torch_rng = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        videos, texts = sample_batch(data_rng, args.batch, frames=TOY_FRAMES)
        x0 = torch.from_numpy(videos)
        embeds, _ = encoder.encode(texts)
        drop = torch.rand(args.batch, generator=torch_rng) < args.cfg_dropout
        embeds[drop] = 0.0
        noise = torch.randn(x0.shape, generator=torch_rng)
        sigma = sample_sigmas(torch_rng, args.batch)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        target = noise - x0
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        pred = model(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=embeds, return_dict=False)[0]
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
