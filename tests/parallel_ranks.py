"""One rank of the gloo tests of --parallel (tests/test_parallel.py starts 2-4 of these on loopback).

`python tests/parallel_ranks.py CASES_JSON OUT_DIR` with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) set by the test: runs every case through the assembly's engines and sampler under the case's
layout and writes each rank's final latents and sent bytes to OUT_DIR. `case_run` is also the test's
single-process reference (layout 1x1, a fresh process: no process group, no Ulysses processors).
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

# Tiny Wan configs whose head counts (4 and 4) serve Ulysses 1, 2 and 4; 24 tokens at WAN_PAR_LATENT.
WAN_PAR = {
    "large": dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4,
                  text_dim=16, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=32),
    "small": dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=6, in_channels=4, out_channels=4,
                  text_dim=16, freq_dim=32, ffn_dim=24, num_layers=1, rope_max_seq_len=32),
}
WAN_PAR_LATENT = (4, 4, 4, 6)
TEXT = (7, 16)


def models_of(family: str) -> tuple[dict, tuple, tuple]:
    """(transformers, latent shape, text shape) of a case's pair, the same on every rank (seeded)."""
    from flowblend.families import get_family, load_pair

    if family == "toy":
        fam = get_family("toy")
        return (load_pair("toy").transformers, fam.latent_shape(fam.frames, fam.height, fam.width),
                (fam.text_len, fam.text_dim))
    from flowblend.bench.tiny import tiny_models

    return tiny_models("wan", WAN_PAR), WAN_PAR_LATENT, TEXT


def case_run(case: dict, parallel: str = "1x1") -> tuple[torch.Tensor, dict, list]:
    """(final latents, bytes sent by kind, plan models) of one case: plan, guidance ('4' or 'mixed': 4 on the
    large model's steps, 1 on the small's) and solver, over engines made by the one assembly."""
    from flowblend.assembly import EngineChoice
    from flowblend.assembly.run import engines_over, sampler_for
    from flowblend.runtime.plan import BlendPlan
    from flowblend.runtime.sampler import SamplerOptions

    models, latent, text = models_of(case["family"])
    plan = BlendPlan.parse(case["plan"], case["steps"])
    if case["guidance"] == "mixed":
        options = SamplerOptions(solver=case["solver"], guidance_table=[4.0 if m == "large" else 1.0
                                                                         for m in plan.models])
    else:
        options = SamplerOptions(solver=case["solver"], guidance_scale=float(case["guidance"]))
    choice = EngineChoice(parallel=parallel, parallel_timeout=case.get("timeout", 60.0), compile="none")
    engines = engines_over(models, choice, guidance=max(options.guidance_for(len(plan))))
    g = torch.Generator().manual_seed(case.get("seed", 0))
    noise, cond, uncond = (torch.randn(1, *shape, generator=g) for shape in (latent, text, text))
    sampler = sampler_for(engines, plan, options, choice)
    sent = {}
    if parallel != "1x1":
        from flowblend.engines.parallel import join

        groups = join(choice.layout, "cpu", choice.parallel_timeout)
        if case.get("fault") and groups.rank == case["fault_rank"]:  # the fault tests: this rank dies or hangs
            if case["fault"] == "die":
                os._exit(3)
            time.sleep(30)
            os._exit(4)
        counter = groups.counter
        counter.reset()
        out = sampler.sample(noise, cond, uncond)
        sent = dict(counter.sent)
    else:
        out = sampler.sample(noise, cond, uncond)
    return out, sent, list(plan.models)


def main(cases_json: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    cases = json.loads(Path(cases_json).read_text())
    rank = int(os.environ["RANK"])
    out = Path(out_dir)
    for i, case in enumerate(cases):
        latents, sent, _ = case_run(case, case["parallel"])
        torch.save({"latents": latents, "sent": sent}, out / f"case{i}-rank{rank}.pt")
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
