"""What a run will hold on the device at its peak, planned before anything loads (issue 32, item 2).

The terms are bench/memory.py's MemoryBound (what bench measures against):
- weights: each model made from its family's reference config on the meta device (no memory, no
  checkpoint) and counted as the run holds it: the precision's dtype, diffusers' _keep_in_fp32_modules in
  FP32 (what `from_pretrained(torch_dtype=...)` keeps), FP8 block linears (engines/fp8.py) as one e4m3 byte
  per weight plus an FP32 scale per output row (the FP8 run replaces its BF16 weights);
- activations of the largest forward at the CFG rows it computes at once (2 batched, 1 sequential or no
  CFG): that forward run on the meta device while the storages it creates are counted alive, SDPA counted
  as its output only (cuDNN/flash keep no score matrix; their small workspaces are not seen);
- the shared buffers (runtime/buffers.py SamplerBuffers, allocated for real: a few MB);
- the BLAS workspace of each stream that runs a matmul (default + the loop's own, bench/memory.py).
A CUDA graph's private pool holds the captured loop's activations: the activations term, not an extra one.
The text encoder and the VAE are not planned: the family registry has no config for them (docs/STATUS.md).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

from .memory import MemoryBound, blas_workspace_bytes, tensors_bytes

GIB = 2**30


def _meta_model(family, config: dict):
    import torch

    with torch.device("meta"):
        return family.architecture.model_class()(**config)


def planned_weight_bytes(family, model: str, dtype: str, fp8_keep_blocks: int = 0, config: dict | None = None) -> int:
    """Bytes of `model`'s weights (parameters and buffers) on the device in precision `dtype`."""
    import torch

    from ..engines.fp8 import Fp8Options, fp8_linear_names
    from ..engines.kinds import precision

    prec = precision(dtype)
    transformer = _meta_model(family, config or family.reference_configs[model])
    kept_fp32 = tuple(getattr(transformer, "_keep_in_fp32_modules", None) or ())
    fp8 = set(fp8_linear_names(transformer, Fp8Options(keep_blocks=fp8_keep_blocks))) if prec.quantizer else set()
    element = torch.empty((), dtype=prec.torch_dtype).element_size()
    total = 0
    for name, module in transformer.named_modules():
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if name in fp8:
            weight = module.weight
            total += weight.numel() + 4 * weight.shape[0] + (module.bias.numel() * element if module.bias is not None
                                                             else 0)
            continue
        for own_name, tensor in own:  # a kept name may be a module (norm1) or a parameter (scale_shift_table)
            fp32 = any(part in kept_fp32 for part in f"{name}.{own_name}".split("."))
            size = (4 if fp32 else element) if tensor.is_floating_point() else tensor.element_size()
            total += tensor.numel() * size
    return total


def planned_weights(family, dtype: str, fp8_keep_blocks: int = 0, models=None, configs=None) -> dict[str, int]:
    """{model: planned weight bytes} for the family's models (or `models`); `configs` overrides the reference's."""
    configs = configs or family.reference_configs
    return {m: planned_weight_bytes(family, m, dtype, fp8_keep_blocks, configs[m]) for m in (models or family.models)}


def planned_activation_bytes(family, model: str, dtype: str, latent_shape, rows: int, config: dict | None = None
                             ) -> int:
    """Peak bytes of the tensors one forward of `model` creates, at `rows` batch rows (meta device, see above)."""
    import torch

    from ..engines.base import LATENTS, TEXT_EMBEDS, TEXT_MASK, TIMESTEP
    from ..engines.kinds import precision
    from ..engines.signature import signature_for

    compute = precision(dtype).torch_dtype
    transformer = _meta_model(family, config or family.reference_configs[model])
    torch.nn.Module.to(transformer, compute)  # the islands go back to FP32 below (diffusers' .to warns of them)
    for name, module in transformer.named_modules():  # what from_pretrained(torch_dtype=...) leaves in FP32
        if any(part in (getattr(transformer, "_keep_in_fp32_modules", None) or ()) for part in name.split(".")):
            module.float()
    signed = signature_for(transformer)
    shapes = {LATENTS: ((rows, *latent_shape), compute), TIMESTEP: ((rows,), torch.float32),
              TEXT_EMBEDS: ((rows, family.text_len, family.text_dim), compute),
              TEXT_MASK: ((rows, family.text_len), torch.int64)}
    inputs = [torch.empty(*shapes[n][:1], dtype=shapes[n][1], device="meta") for n in signed.input_names]
    try:
        with torch.no_grad(), _FusedAttention(), _LiveStorages() as live:
            signed(*inputs)
    except (RuntimeError, TypeError, ValueError) as exc:  # a forward that needs more than the signature's inputs
        from flowblend.errors import FlowblendError

        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FlowblendError(f"the memory plan cannot run {family.name}'s {model} forward on the meta device "
                             f"({first}): planned for Wan-class families so far (docs/STATUS.md)") from None
    return live.peak


class _FusedAttention:
    """SDPA as a fused kernel allocates it: its output only (TorchFunctionMode; the math path would count the
    full score matrix, which cuDNN and flash attention never hold)."""

    def __enter__(self):
        import torch
        from torch.overrides import TorchFunctionMode

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.nn.functional.scaled_dot_product_attention:
                    query = kwargs.get("query", args[0] if args else None)
                    return torch.empty_like(query)
                return func(*args, **kwargs)

        self._mode = Mode()
        return self._mode.__enter__()

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


class _LiveStorages:
    """Peak bytes of storages created inside the region and alive at once, on any device (meta included).

    bench/memory.py's LiveTensorBytes keys storages by address, which meta tensors lack; here a storage is
    its StorageImpl and stays alive while a tensor created on it does (a finalizer per tensor)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        owner = self
        self.current = self.peak = 0
        refs, sizes, known = {}, {}, set()

        def free(key):
            refs[key] -= 1
            if refs[key] == 0:
                del refs[key]
                self.current -= sizes.pop(key)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch

                for t in tree_leaves((args, kwargs)):
                    if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in refs:
                        known.add(t.untyped_storage()._cdata)  # weights, inputs: not the forward's own
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        key = t.untyped_storage()._cdata
                        if key in known:
                            continue
                        if key not in refs:
                            refs[key], sizes[key] = 0, t.untyped_storage().nbytes()
                            owner.current += sizes[key]
                            owner.peak = max(owner.peak, owner.current)
                        refs[key] += 1
                        weakref.finalize(t, free, key)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def planned_buffer_bytes(latent_shape, text_shape, timesteps, cfg: bool, dtype: str, state_names=(),
                         with_mask: bool = False, guidance=None) -> int:
    """Bytes of the run's shared buffers: runtime/buffers.py allocates them here on the CPU (a few MB)."""
    import torch

    from ..engines.kinds import precision
    from ..runtime.buffers import SamplerBuffers

    b = SamplerBuffers.allocate(latent_shape, text_shape, timesteps, cfg, precision(dtype).torch_dtype,
                                torch.device("cpu"), state_names, with_mask, guidance)
    return tensors_bytes([b.latents, b.model_input, b.text_embeds, b.text_mask, b.timestep_table, b.guidance_table,
                          b.velocity, b.guided, *b.state.values()])


@dataclass(frozen=True)
class MemoryPlan:
    """A run's planned device bytes, term by term (bench/memory.py MemoryBound), and where they come from."""

    weights: dict[str, int]
    activations: int
    activations_of: str  # which model's forward, at how many rows
    shared_buffers: int
    workspaces: int

    @property
    def bound(self) -> MemoryBound:
        return MemoryBound(sum(self.weights.values()), 0, self.shared_buffers, self.activations,
                           stream_workspaces=self.workspaces)

    @property
    def total(self) -> int:
        return self.bound.total

    def lines(self) -> list[str]:
        out = [f"  weights {m}: {b / GIB:8.2f} GiB" for m, b in self.weights.items()]
        out += [f"  activations ({self.activations_of}): {self.activations / GIB:8.2f} GiB",
                f"  shared buffers: {self.shared_buffers / GIB:8.3f} GiB",
                f"  BLAS workspaces (2 streams): {self.workspaces / GIB:8.3f} GiB",
                "  text encoder, VAE: not planned (no config in the family registry); pass them on the CPU",
                f"  total: {self.total / GIB:.2f} GiB"]
        return out


def plan_memory(family, models, latent_shape, dtype: str, rows: int, timesteps, state_names=(),
                capability: tuple[int, int] | None = (9, 0), fp8_keep_blocks: int = 0, configs=None,
                guidance=None) -> MemoryPlan:
    """The plan of a run of `models` (the plan's) at `latent_shape`, CFG `rows` per forward, on a GPU of
    `capability` (None: the CPU, no BLAS workspaces)."""
    configs = configs or family.reference_configs
    weights = planned_weights(family, dtype, fp8_keep_blocks, models, configs)
    # a quantized precision's forward (FP8) is planned in the precision it computes the rest in (BF16):
    # torchao's per-call FP8 copies of an activation are smaller than the activation
    compute = compute_precision(dtype)
    activations = {m: planned_activation_bytes(family, m, compute, latent_shape, rows, configs[m]) for m in models}
    largest = max(activations, key=activations.get)
    cfg = rows == 2 or (guidance is not None and max(guidance) > 1)
    buffers = planned_buffer_bytes(latent_shape, (family.text_len, family.text_dim), timesteps, cfg, compute,
                                   state_names, family.takes_text_mask, guidance)
    return MemoryPlan(weights, activations[largest], f"{largest}, {rows} row{'s' * (rows > 1)}", buffers,
                      2 * blas_workspace_bytes(capability))


def compute_precision(dtype: str) -> str:
    """The unquantized precision a precision computes in: itself, or for a quantizer (FP8) the exportable
    precision of the same torch dtype (BF16), read from engines/kinds.py's table."""
    from ..engines.kinds import PRECISIONS, precision

    chosen = precision(dtype)
    if chosen.exportable:
        return dtype
    return next(n for n, p in PRECISIONS.items() if p.exportable and p.torch_name == chosen.torch_name)


def cfg_rows(guidance, cfg: str) -> int:
    """Rows the largest forward computes at once: 2 with CFG batched, 1 sequential or without CFG."""
    from ..engines.cfg_modes import cfg_rows as rows_of

    return rows_of(cfg, 2 if max(guidance) > 1 else 1)


def plan_for(family, plan, latent_shape, solver_table, guidance, dtype: str, cfg: str, fp8_keep_blocks: int = 0,
             capability: tuple[int, int] | None = (9, 0)) -> MemoryPlan:
    """The memory plan of a resolved request: the plan's models, its solver's state, its CFG rows."""
    models = tuple(m for m in family.models if m in plan.models)
    return plan_memory(family, models, latent_shape, dtype, cfg_rows(guidance, cfg), solver_table.timesteps,
                       solver_table.state_names, capability, fp8_keep_blocks, guidance=guidance)


def device_capacity(device) -> tuple[int, tuple[int, int]] | None:
    """(total bytes, compute capability) of a CUDA device; None for the CPU (nothing to refuse there)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_capability(device)


def check_fits(family, plan, latent_shape, solver_table, guidance, dtype: str, cfg: str, fp8_keep_blocks: int,
               capacity: int, capability) -> MemoryPlan:
    """The plan, or FlowblendError in one line naming the options that would make the run fit `capacity`."""
    from flowblend.errors import FlowblendError

    def planned(d, c):
        return plan_for(family, plan, latent_shape, solver_table, guidance, d, c, fp8_keep_blocks, capability)

    chosen = planned(dtype, cfg)
    if chosen.total <= capacity:
        return chosen
    from ..engines.fp8 import MIN_CAPABILITY
    from ..engines.kinds import PRECISIONS

    # FP8 linears need Ada or newer (engines/fp8.py); sequential CFG first (same numbers), then quantizing
    quantized = [n for n, p in PRECISIONS.items() if p.quantizer] if tuple(capability or (0, 0)) >= MIN_CAPABILITY \
        else []
    candidates = [(compute_precision(dtype), "sequential")] + [(q, c) for q in quantized for c in (cfg, "sequential")]
    options = [(d, c) for d, c in candidates if (d, c) != (dtype, cfg)]
    fits = [(d, c, p) for d, c in options if (p := planned(d, c)).total <= capacity]
    terms = f"weights {sum(chosen.weights.values()) / GIB:.1f} + activations {chosen.activations / GIB:.1f}"
    fix = (f"try --dtype {fits[0][0]} --cfg {fits[0][1]} ({fits[0][2].total / GIB:.1f} GiB)" if fits else
           "no precision or --cfg makes it fit: use a GPU with more memory, fewer frames or a smaller resolution")
    raise FlowblendError(f"this run needs {chosen.total / GIB:.1f} GiB on the device ({terms} GiB, `flowblend plan` "
                         f"lists every term), the GPU has {capacity / GIB:.1f} GiB: {fix}")
