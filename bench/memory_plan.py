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

A run has four phases, and its peak is the largest (`MemoryPlan.phases`): loading (a quantized precision
loads its BF16 weights to the device and quantizes them there: engines/factory.py), encoding (the text
encoder's weights and forward, when it encodes on the device), the loop (the terms above, plus the text
encoder and VAE weights where `--offload` leaves them on the device: families/offload.py) and decoding
(the VAE's weights and its decode's activations beside the transformers' weights). The text encoder and
VAE are the family's reference architectures (PairFamily.text_encoder_reference / vae_reference) on the
meta device; a family without them (the toy, whose parts are in-memory stand-ins) plans none.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .memory import MemoryBound, blas_workspace_bytes, tensors_bytes
from .meta_count import FusedAttention, LiveStorages

GIB = 2**30


def _meta_model(family, config: dict):
    import torch

    with torch.device("meta"):
        return family.architecture.model_class()(**config)


def module_weight_bytes(module, dtype: str) -> int:
    """Bytes of a module's parameters and buffers loaded with `torch_dtype` of precision `dtype`: its floats in
    that dtype except what from_pretrained keeps in FP32 (transformers: `_keep_in_fp32_modules` for FP16 only,
    `_keep_in_fp32_modules_strict` for FP16 and BF16; diffusers: `_keep_in_fp32_modules`)."""
    import torch

    from ..engines.kinds import precision

    torch_dtype = precision(compute_precision(dtype)).torch_dtype
    kept = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ()) if torch_dtype in (
        torch.float16, torch.bfloat16) else set()
    if torch_dtype == torch.float16 or not hasattr(module, "_keep_in_fp32_modules_strict"):  # transformers' rule
        kept |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
    element = torch.empty((), dtype=torch_dtype).element_size()
    total = 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:  # tied weights counted once
        fp32 = any(part in kept for part in name.split("."))
        total += tensor.numel() * ((4 if fp32 else element) if tensor.is_floating_point() else tensor.element_size())
    return total


@functools.lru_cache(maxsize=16)
def _shared_part_plan(build, dtype: str, kind: str, shape: tuple) -> tuple[int, int]:
    """(weight bytes, activation bytes) of a text encoder forward at `shape` (rows, tokens) or a VAE decode of
    latents `shape`, the part built on the meta device (the same part, dtype and shape plan once per process)."""
    import torch

    from ..engines.kinds import precision

    with torch.device("meta"):
        part = build()
    weights = module_weight_bytes(part, dtype)
    torch.nn.Module.to(part, precision(compute_precision(dtype)).torch_dtype)
    with torch.no_grad(), FusedAttention(), LiveStorages() as live:
        if kind == "text_encoder":  # no mask: building the padding mask reads its values (none on meta)
            part(torch.zeros(shape, dtype=torch.int64, device="meta"))
        else:
            part.decode(torch.empty((1, *shape), dtype=part.dtype, device="meta"), return_dict=False)
    return weights, live.peak


def planned_shared_parts(family, dtype: str, latent_shape, rows: int = 2) -> dict[str, tuple[int, int]]:
    """{"text encoder": (weights, forward activations at `rows` prompts), "VAE": (weights, decode activations)}
    for the family's reference parts ({} for a family without them).

    The Wan VAE decodes one latent frame at a time through a causal cache, so its peak past the third frame grows
    only by the output video: the decode is run for at most 3 latent frames (seconds on the meta device, not a
    minute for 21) and the rest of the output added (3 channels per pixel of each further frame, and its FP32
    copy: families/wan.decode returns float)."""
    import torch

    from ..engines.kinds import precision

    out = {}
    if family.text_encoder_reference is not None:
        out["text encoder"] = _shared_part_plan(family.text_encoder_reference, dtype, "text_encoder",
                                                (rows, family.text_len))
    if family.vae_reference is not None:
        c, f, h, w = latent_shape
        run = min(f, 3)
        weights, peak = _shared_part_plan(family.vae_reference, dtype, "vae", (c, run, h, w))
        element = torch.empty((), dtype=precision(compute_precision(dtype)).torch_dtype).element_size()
        pixels = 3 * h * family.spatial_factor * w * family.spatial_factor
        out["VAE"] = (weights, peak + (f - run) * family.temporal_factor * pixels * (element + 4))
    return out


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
        with torch.no_grad(), FusedAttention(), LiveStorages() as live:
            signed(*inputs)
    except (RuntimeError, TypeError, ValueError) as exc:  # a forward that needs more than the signature's inputs
        from flowblend.errors import FlowblendError

        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FlowblendError(f"the memory plan cannot run {family.name}'s {model} forward on the meta device "
                             f"({first}): planned for Wan-class families so far (docs/STATUS.md)") from None
    return live.peak


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
    """A run's planned device bytes, term by term (bench/memory.py MemoryBound), phase by phase, and where they
    come from. `offload` None: the run holds no text encoder or VAE (bench's harness stands in for them)."""

    weights: dict[str, int]
    activations: int
    activations_of: str  # which model's forward, at how many rows
    shared_buffers: int
    workspaces: int
    loaded_weights: int = 0  # the transformers' weights as loaded, before a quantized precision quantizes them
    shared: dict[str, tuple[int, int]] = field(default_factory=dict)  # part -> (weights, its own activations)
    offload: str | None = None

    @property
    def bound(self) -> MemoryBound:
        """The loop's transformer terms (what bench measures its loop against)."""
        return MemoryBound(sum(self.weights.values()), 0, self.shared_buffers, self.activations,
                           stream_workspaces=self.workspaces)

    def phases(self) -> dict[str, int]:
        """Device bytes at the peak of each phase of the run: load, encode, loop, decode."""
        from ..families.offload import check_offload

        resident = sum(self.weights.values()) + self.shared_buffers + self.workspaces
        phases = {"load": max(self.loaded_weights, sum(self.weights.values())), "loop": self.bound.total}
        if self.offload is None:
            return phases
        place = check_offload(self.offload)
        encoder, encoder_forward = self.shared.get("text encoder", (0, 0))
        vae, decode = self.shared.get("VAE", (0, 0))
        in_loop = encoder * place.text_encoder_in_loop + vae * place.vae_in_loop
        phases["encode"] = resident + in_loop + (encoder * (not place.text_encoder_in_loop) + encoder_forward
                                                 if place.encode_on_device else 0)
        phases["loop"] += in_loop
        phases["decode"] = resident + encoder * place.text_encoder_in_loop + vae + decode
        return phases

    @property
    def peak_phase(self) -> str:
        phases = self.phases()
        return max(phases, key=phases.get)

    @property
    def total(self) -> int:
        return max(self.phases().values())

    def lines(self) -> list[str]:
        from ..families.offload import check_offload

        out = [f"  weights {m}: {b / GIB:8.2f} GiB" for m, b in self.weights.items()]
        if self.loaded_weights > sum(self.weights.values()):
            out.append(f"  weights as loaded, before quantizing on the device: {self.loaded_weights / GIB:8.2f} GiB")
        out += [f"  activations ({self.activations_of}): {self.activations / GIB:8.2f} GiB",
                f"  shared buffers: {self.shared_buffers / GIB:8.3f} GiB",
                f"  BLAS workspaces (2 streams): {self.workspaces / GIB:8.3f} GiB"]
        if self.offload is not None:
            place = check_offload(self.offload)
            where = {"text encoder": "on the device" if place.text_encoder_in_loop else "on the CPU",
                     "VAE": "on the device" if place.vae_in_loop else "on the CPU"}
            run = {"text encoder": "encodes on the " + ("device" if place.encode_on_device else "CPU"),
                   "VAE": "decodes on the device"}
            for part, (weights, forward) in self.shared.items():
                out.append(f"  {part}: {weights / GIB:8.2f} GiB weights, {forward / GIB:.2f} GiB to run "
                           f"({run[part]}; {where[part]} during the loop, --offload {self.offload})")
            if not self.shared:
                out.append("  text encoder, VAE: none planned (the family has no reference architecture for them)")
        phases = self.phases()
        out.append("  phases: " + ", ".join(f"{p} {b / GIB:.2f}" for p, b in phases.items()) + " GiB")
        out.append(f"  total (the {self.peak_phase} phase): {self.total / GIB:.2f} GiB")
        return out


def plan_memory(family, models, latent_shape, dtype: str, rows: int, timesteps, state_names=(),
                capability: tuple[int, int] | None = (9, 0), fp8_keep_blocks: int = 0, configs=None,
                guidance=None, offload: str | None = None) -> MemoryPlan:
    """The plan of a run of `models` (the plan's) at `latent_shape`, CFG `rows` per forward, on a GPU of
    `capability` (None: the CPU, no BLAS workspaces); `offload` places the text encoder and VAE
    (families/offload.py; None: the run holds neither)."""
    from ..engines.kinds import precision

    configs = configs or family.reference_configs
    weights = planned_weights(family, dtype, fp8_keep_blocks, models, configs)
    # a quantized precision's forward (FP8) is planned in the precision it computes the rest in (BF16):
    # torchao's per-call FP8 copies of an activation are smaller than the activation
    compute = compute_precision(dtype)
    loaded = sum(planned_weights(family, compute, 0, models, configs).values()) if precision(dtype).quantizer else 0
    activations = {m: planned_activation_bytes(family, m, compute, latent_shape, rows, configs[m]) for m in models}
    largest = max(activations, key=activations.get)
    cfg = rows == 2 or (guidance is not None and max(guidance) > 1)
    buffers = planned_buffer_bytes(latent_shape, (family.text_len, family.text_dim), timesteps, cfg, compute,
                                   state_names, family.takes_text_mask, guidance)
    shared = planned_shared_parts(family, compute, tuple(latent_shape)) if offload is not None else {}
    return MemoryPlan(weights, activations[largest], f"{largest}, {rows} row{'s' * (rows > 1)}", buffers,
                      2 * blas_workspace_bytes(capability), loaded, shared, offload)


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
             capability: tuple[int, int] | None = (9, 0), offload: str | None = "none") -> MemoryPlan:
    """The memory plan of a resolved request: the plan's models, its solver's state, its CFG rows, its
    text encoder and VAE where `offload` puts them."""
    models = tuple(m for m in family.models if m in plan.models)
    return plan_memory(family, models, latent_shape, dtype, cfg_rows(guidance, cfg), solver_table.timesteps,
                       solver_table.state_names, capability, fp8_keep_blocks, guidance=guidance, offload=offload)


def device_capacity(device) -> tuple[int, tuple[int, int]] | None:
    """(total bytes, compute capability) of a CUDA device; None for the CPU (nothing to refuse there)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_capability(device)


def check_fits(family, plan, latent_shape, solver_table, guidance, dtype: str, cfg: str, fp8_keep_blocks: int,
               capacity: int, capability, offload: str = "none") -> MemoryPlan:
    """The plan, or FlowblendError in one line naming the options that would make the run fit `capacity`."""
    from flowblend.errors import FlowblendError

    def planned(d, c, o):
        return plan_for(family, plan, latent_shape, solver_table, guidance, d, c, fp8_keep_blocks, capability, o)

    chosen = planned(dtype, cfg, offload)
    if chosen.total <= capacity:
        return chosen
    from ..engines.fp8 import MIN_CAPABILITY
    from ..engines.kinds import PRECISIONS

    # FP8 linears need Ada or newer (engines/fp8.py); sequential CFG first (same numbers), then the text encoder
    # on the CPU (the same numbers, slower encoding), then quantizing
    quantized = [n for n, p in PRECISIONS.items() if p.quantizer] if tuple(capability or (0, 0)) >= MIN_CAPABILITY \
        else []
    places = dict.fromkeys((offload, "cpu"))
    candidates = [(compute_precision(dtype), c, o) for o in places for c in (cfg, "sequential")] + \
        [(q, c, o) for q in quantized for o in places for c in (cfg, "sequential")]
    options = [x for x in dict.fromkeys(candidates) if x != (dtype, cfg, offload)]
    fits = [(d, c, o, p) for d, c, o in options if (p := planned(d, c, o)).total <= capacity]
    terms = {"load": f"loading: {chosen.loaded_weights / GIB:.1f} GiB of weights before quantizing them",
             "encode": "encoding: the text encoder beside the transformers",
             "loop": f"the loop: weights {sum(chosen.weights.values()) / GIB:.1f} + activations "
                     f"{chosen.activations / GIB:.1f} GiB",
             "decode": "decoding: the VAE beside the transformers"}[chosen.peak_phase]
    if fits:
        d, c, o, p = fits[0]
        fix = f"try --dtype {d} --cfg {c}{f' --offload {o}' if o != offload else ''} ({p.total / GIB:.1f} GiB)"
    else:
        fix = ("no precision, --cfg or --offload makes it fit: use a GPU with more memory, fewer frames or a smaller "
               "resolution")
    raise FlowblendError(f"this run needs {chosen.total / GIB:.1f} GiB on the device at its peak ({terms}; `flowblend "
                         f"plan --memory` lists every term), the GPU has {capacity / GIB:.1f} GiB: {fix}")
