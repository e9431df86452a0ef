"""--parallel (issue 33) on the CPU with gloo: 2 and 4 ranks on loopback, each one thread, bounded in time.

Every layout's final latents, on every rank, equal the single-process run of the same case (computed here, in
this process, with no process group) within 1e-5 in FP32: tiny Wan (4 heads, 24 tokens) and the toy pair, plan
LSL with its model switches and UniPC's history, CFG on, at guidance 1 and mixed (the small model at 1). The
bytes each rank sent equal engines/parallel_layout.step_comm_bytes summed over the plan. A dead or hung rank
fails the others within the collective timeout. Refusals are one line each.
"""
import json
import os
import socket
import subprocess
import sys
import time
from math import prod
from pathlib import Path

import pytest
import torch
from parallel_ranks import WAN_PAR, WAN_PAR_LATENT, case_run

from flowblend.assembly import EngineChoice
from flowblend.assembly.run import engines_over
from flowblend.engines.parallel_layout import check_launch, parse_layout, step_comm_bytes
from flowblend.errors import FlowblendError

HERE = Path(__file__).parent
RANK_SCRIPT = HERE / "parallel_ranks.py"
LAUNCH_TIMEOUT_S = 240  # a whole launch (imports dominate on a shared 2-core machine)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cases: list[dict], world: int, tmp_path: Path, timeout_s: float = LAUNCH_TIMEOUT_S) -> list[tuple]:
    """Run parallel_ranks.py on `world` ranks over loopback; [(returncode, stderr tail, seconds)] per rank.
    Every rank is killed at `timeout_s`: nothing here waits forever."""
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(tmp_path / "cases.json"), str(tmp_path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True) for r in range(world)]
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, timeout_s - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            _, err = p.communicate()
        results.append((p.returncode, err[-3000:], time.monotonic() - start))
    return results


def _check_all_ranks(cases, world, tmp_path):
    results = launch(cases, world, tmp_path)
    for rank, (code, err, _) in enumerate(results):
        assert code == 0, f"rank {rank} failed ({code}):\n{err}"
    for i, case in enumerate(cases):
        reference, _, models = case_run(case)  # one process, no process group
        assert reference.abs().max() > 0.1  # a real sample, not zeros
        for rank in range(world):
            got = torch.load(tmp_path / f"case{i}-rank{rank}.pt")
            # relative to the sample's scale (batch-1 vs batch-2 matmuls round differently: toy 1.7e-5 abs at 1 of 27648)
            error = ((got["latents"] - reference).abs().max() / reference.abs().max()).item()
            assert error <= 1e-5, f"case {case}, rank {rank}: max error / max |reference| = {error:.2e}"
            if case["family"] == "wan":
                assert got["sent"] == expected_bytes(case, models), f"case {case}, rank {rank}"


def expected_bytes(case: dict, models: list[str]) -> dict:
    """The analytic bytes one rank sends over the plan (tiny Wan: its configs and latent)."""
    layout = parse_layout(case["parallel"])
    total = {}
    for m in models:
        cfg = WAN_PAR[m]
        guided = case["guidance"] == "mixed" and m == "large" or case["guidance"] not in ("mixed", "1")
        c, f, h, w = WAN_PAR_LATENT
        tokens = f // cfg["patch_size"][0] * (h // cfg["patch_size"][1]) * (w // cfg["patch_size"][2])
        step = step_comm_bytes(layout, guided=guided, tokens=tokens, heads=cfg["num_attention_heads"],
                               head_dim=cfg["attention_head_dim"], layers=cfg["num_layers"],
                               out_dim=prod(cfg["patch_size"]) * cfg["out_channels"], latent_numel=prod(WAN_PAR_LATENT))
        for kind, n in step.items():
            total[kind] = total.get(kind, 0) + n
    return total


def _case(family="wan", guidance="4", parallel="1x2", solver="unipc", **more):
    return dict(family=family, plan="LSL:0.4,0.2", steps=5, guidance=guidance, solver=solver, parallel=parallel,
                **more)


def test_cfg_parallel_equals_one_process(tmp_path):
    cases = [_case(guidance=g, parallel="2x1") for g in ("4", "mixed", "1")]
    cases += [_case(parallel="2x1", solver="euler"), _case(family="toy", parallel="2x1")]
    _check_all_ranks(cases, 2, tmp_path)


def test_ulysses_2_equals_one_process(tmp_path):
    _check_all_ranks([_case(guidance=g, parallel="1x2") for g in ("4", "mixed", "1")], 2, tmp_path)


def test_cfg_2_by_ulysses_2_equals_one_process(tmp_path):
    _check_all_ranks([_case(guidance=g, parallel="2x2") for g in ("4", "mixed")], 4, tmp_path)


def test_ulysses_4_equals_one_process(tmp_path):
    _check_all_ranks([_case(guidance="4", parallel="1x4")], 4, tmp_path)


@pytest.mark.parametrize("fault", ["die", "hang"])
def test_a_dead_or_hung_rank_fails_the_others_within_the_timeout(tmp_path, fault):
    results = launch([_case(parallel="2x1", fault=fault, fault_rank=1, timeout=5.0)], 2, tmp_path, timeout_s=150)
    code, err, seconds = results[0]
    assert code not in (0, None) and code != -9, f"rank 0 should fail by itself (got {code}):\n{err}"
    assert "rank" in err.lower() and ("timed out" in err.lower() or "closed" in err.lower()
                                      or "connection" in err.lower() or "peer" in err.lower()), err
    assert seconds < 140


def test_layout_refusals_are_one_line():
    with pytest.raises(FlowblendError, match="CFG degree is 1 or 2"):
        parse_layout("4x2")
    with pytest.raises(FlowblendError, match="not CFGxULYSSES"):
        parse_layout("eight")
    with pytest.raises(FlowblendError, match="launch it with `torchrun --nproc-per-node 4"):
        check_launch(parse_layout("2x2"), {})
    with pytest.raises(FlowblendError, match="needs 4 ranks but torchrun started 8.*2x4"):
        check_launch(parse_layout("2x2"), {"WORLD_SIZE": "8", "RANK": "0"})
    with pytest.raises(FlowblendError, match="torchrun started 2 ranks but --parallel is 1x1"):
        check_launch(parse_layout("1x1"), {"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(FlowblendError, match="--backend onnxruntime runs built engines whole"):
        EngineChoice(backend="onnxruntime", parallel="2x1")
    with pytest.raises(FlowblendError, match="drop --cfg sequential"):
        EngineChoice(parallel="2x1", cfg="sequential")
    assert EngineChoice(parallel="2X4").parallel == "2x4"


def test_ulysses_degree_must_divide_every_head_count():
    from flowblend.families import load_pair

    toy = load_pair("toy").transformers  # 6 and 3 heads
    with pytest.raises(FlowblendError, match=r"does not divide the head count of small \(3 heads\); degrees that "
                                             r"serve every model: 1, 3"):
        engines_over(toy, EngineChoice(parallel="1x2"))
    # 40 and 12 heads (Wan 14B and 1.3B): 1, 2, 4 serve both
    from flowblend.engines.parallel_layout import check_heads

    with pytest.raises(FlowblendError, match="degrees that serve every model: 1, 2, 4$"):
        check_heads(parse_layout("1x8"), {"large": 40, "small": 12})
