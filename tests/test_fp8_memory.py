"""FP8 holds less than BF16 (issue 32, item 1): an assembled `--dtype fp8` run keeps no BF16 copy of the
block linears it quantized, counted as the unique tensor storages reachable from the run."""
import gc
import types

import pytest
import torch

from flowblend.assembly import EngineChoice, assemble
from flowblend.families import get_family
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import SamplerOptions

SKIP = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def reachable_storage_bytes(root) -> int:
    """Bytes of the distinct storages of every tensor reachable from `root` (modules, dicts, lists, objects);
    never through modules, classes or functions, so nothing global is counted."""
    seen_objects, seen_storages, total, todo = set(), set(), 0, [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen_objects or isinstance(obj, SKIP):
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen_storages:
                seen_storages.add(storage.data_ptr())
                total += storage.nbytes()
            continue
        todo.extend(gc.get_referents(obj))
    return total


def assembled(dtype: str):
    family = get_family("toy")
    plan = BlendPlan.parse("LSL", 4)
    return assemble("toy", family.latent_shape(family.frames, family.height, family.width), plan, SamplerOptions(guidance_scale=4.0),
                    EngineChoice(dtype=dtype))


def block_linears(model):
    """nn.Linear modules inside the repeated blocks (Wan: `blocks.N.`), found by name, not by engines/fp8.py."""
    return [m for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)]


def test_an_fp8_run_holds_fp8_block_weights_and_no_bf16_copy():
    bf16_run = assembled("bf16")
    expected, bf16_blocks = 0, 0
    for model in bf16_run.pair.transformers.values():
        everything = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        linears = block_linears(model)
        block_weights = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        bf16_blocks += block_weights
        # FP8: one byte per weight plus one FP32 scale per output row; bias and all else stay as they are
        expected += everything - block_weights + sum(m.weight.numel() + 4 * m.out_features for m in linears)
    bf16_bytes = reachable_storage_bytes(bf16_run)
    del bf16_run
    fp8_bytes = reachable_storage_bytes(assembled("fp8"))
    # e4m3 is half of BF16's block weights (the FP32 row scales add in_features^-1 of that)
    assert fp8_bytes == pytest.approx(expected, rel=0.02), (fp8_bytes, expected, bf16_bytes)
    assert fp8_bytes < bf16_bytes - 0.45 * bf16_blocks
