"""The model-family registry: what a family is (`PairFamily`), what its transformer class needs
(`Architecture`), and the table of registered families.

A family fixes what all its models must share (latent space, text conditioning, patching) and the
defaults its diffusers pipeline uses (solver, shift, steps, guidance, video size). A family names its
models and their plan letters: large/small (L, S) for two-model pairs; high/low/small (H, L, S) for
`wan22`. Each family lives in one module of this package (wan.py, wan22.py, ltx.py, toy.py) and calls
`register_family`; a new family (say CogVideoX) is one such module, in flowblend or outside it
(tests/test_new_family.py registers one from a test module).

`register_family` also hands the architecture's pieces to the layers below, which hold them by class
name and never import this package: its I/O signature wrapper and step split to engines/signature.py,
its FP32 islands to export/precision.py. bench/flops.py asks `architecture_of` for the FLOP model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from flowblend.errors import FlowblendError

from ..engines.architectures import ClassEntry, register_class

if TYPE_CHECKING:  # torch loads when a pair does: `flowblend --help` and argument checks stay fast
    from types import ModuleType

    import torch

    from ..engines.iospec import IOSpec


@dataclass(frozen=True)
class Architecture:
    """A diffusers video transformer class as flowblend drives it; one per class, shared by its families.

    `signature(transformer, **kw)` wraps it in the positional engine signature (engines/signature.py);
    `step_split(signed)` returns its forward with the schedule constants taken out, or None;
    `forward_macs(config, latent_shape, text_len)` -> {"projections", "attention"} multiply-accumulates
    (and "blocks", the repeated blocks' share, which a cached step skips; 0 if not given)
    of one forward at batch 1 (bench/flops.py); `encode_prompt(pipeline, prompts, family, device)` and
    `decode(vae, latents)` use its diffusers pipeline's text encoder and VAE."""

    transformer_class: str  # the diffusers class name
    class_module: str  # where diffusers defines it (imported directly: diffusers' top-level lazy module imports more)
    signature: Callable
    step_split: Callable = lambda signed: None
    wrapper_name: str | None = None  # the class `signature` returns: a module already wrapped keeps its split
    fp32_islands: tuple[str, ...] = ()
    forward_macs: Callable | None = None
    encode_prompt: Callable | None = None
    decode: Callable | None = None

    def model_class(self):
        import importlib

        return getattr(importlib.import_module(self.class_module), self.transformer_class)


@dataclass(frozen=True)
class PairFamily:
    name: str
    transformer_class: str
    large: str  # default checkpoint (hub id or local path) of the large model
    small: str
    latent_channels: int
    spatial_factor: int  # VAE spatial compression
    temporal_factor: int  # VAE temporal compression (frames = factor * k + 1)
    patch: tuple[int, int, int]  # transformer patch (t, h, w)
    solver: str
    shift: float
    steps: int
    guidance: float
    height: int
    width: int
    frames: int
    text_len: int
    text_dim: int
    takes_text_mask: bool = False
    dynamic_shift: bool = False  # LTX: mu from the token count instead of a fixed shift
    compat_fields: tuple[str, ...] = ()  # config fields both transformers must agree on
    description: str = ""
    # A family whose models are not diffusers checkpoints (the toy pair, a plugin's family) has a provider:
    # a module offering load_pair(family, large, small, dtype, device, load_transformers), REFERENCE_CONFIGS
    # and normalise_prompt. Either a function returning it (the toy: its family module's lazy import) or,
    # for a family defined outside flowblend, that module's name (flowblend itself never names one).
    provider: Callable[[], ModuleType] | str | None = None
    # The named models, in plan order, with their plan letters; which checkpoint argument (--large /
    # --small) holds each one, and the subfolder inside it (None: transformer/ if present, else the folder).
    models: tuple[str, ...] = ("large", "small")
    letters: tuple[str, ...] = ("L", "S")
    checkpoint_of: tuple[str, ...] = ("large", "small")
    subfolders: tuple[str | None, ...] = (None, None)
    # Two-expert models (Wan 2.2 A14B): the high-noise expert runs t >= boundary_ratio * 1000, as
    # diffusers' WanPipeline; each expert brings its CFG scale (guidance_scale / guidance_scale_2).
    boundary_ratio: float | None = None
    expert_guidance: tuple[tuple[str, float], ...] = ()
    pipeline_class: str = "WanPipeline"  # diffusers pipeline whose text encoder and VAE the pair shares
    compat_hint: str = ""  # appended to an incompatibility refusal
    # Models beyond --large/--small (issue 27: LTX's step-distilled D): checkpoint argument -> default source.
    # Loaded when that checkpoint is on disk or in the hub cache, else left out (plans naming it are refused).
    optional_checkpoints: tuple[tuple[str, str], ...] = ()
    # What flowblend knows of the transformer class (its family module's Architecture) and the published
    # configs of the default models, for cost estimates without weights (`flowblend plan`, scripts).
    architecture: Architecture | None = None
    reference: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()
    # The shared parts' published architectures, built with no arguments (the memory plan builds them on
    # the meta device: bench/memory_plan.py): the text encoder and the VAE its pipeline loads. None: not planned.
    text_encoder_reference: Callable[[], torch.nn.Module] | None = None
    vae_reference: Callable[[], torch.nn.Module] | None = None

    @property
    def reference_configs(self) -> dict[str, dict]:
        """Transformer configs of the family's default models (a family with a provider: the provider's)."""
        if self.provider:
            return {size: dict(config) for size, config in _provider(self).REFERENCE_CONFIGS.items()}
        return {model: dict(config) for model, config in self.reference}

    @property
    def experts(self) -> tuple[str, str] | None:
        """(high, low) for a two-expert family, else None."""
        return (self.models[0], self.models[1]) if self.boundary_ratio is not None else None

    @property
    def pixel_multiple(self) -> int:
        return self.spatial_factor * self.patch[1]

    def check_video_shape(self, frames: int, height: int, width: int) -> None:
        """Raise FlowblendError naming the fix if the VAE/transformer cannot take this video size.

        Every size it suggests is one this check accepts (tests/test_cli_help.py feeds them back).
        """
        m = self.pixel_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise FlowblendError(f"{self.name}: height and width must be positive multiples of {m}, got "
                                 f"{height}x{width}; try {max(m, round(height / m) * m)}x{max(m, round(width / m) * m)}")
        if not self.frames_ok(frames):
            k, pt = self.temporal_factor, self.patch[0]
            below, above = self.nearest_frames(frames)
            below = [below] if below is not None else []
            rule = f"{k}k+1 for this VAE" if pt == 1 else \
                f"{k}k+1 for this VAE and fill whole {pt}-frame patches of the transformer, i.e. a multiple of {pt} latent frames"
            raise FlowblendError(f"{self.name}: frames must be {rule}, got {frames}; try "
                                 f"{' or '.join(str(f) for f in below + [above])}")

    def nearest_frames(self, frames: int) -> tuple[int | None, int]:
        """The valid frame counts just below (None: none) and just above `frames`, by formula: the valid counts are
        first + n * period (n >= 0), so no count is enumerated, whatever `frames` (a billion, or negative)."""
        k, pt = self.temporal_factor, self.patch[0]
        first, period = k * (pt - 1) + 1, k * pt
        below = first + (frames - 1 - first) // period * period if frames > first else None
        above = first + max(0, (frames - first) // period + 1) * period
        return below, above

    def frames_ok(self, frames: int) -> bool:
        """Whether the VAE (frames = k*t + 1) and the transformer's temporal patch both take `frames`."""
        k = self.temporal_factor
        return frames >= 1 and (frames - 1) % k == 0 and ((frames - 1) // k + 1) % self.patch[0] == 0

    def normalise_prompt(self, prompt: str, negative: bool = False) -> str:
        """The prompt as this family's text encoder reads it; FlowblendError naming the fix if it cannot.

        Real text encoders take any text. A family with a closed vocabulary (the toy pair) puts the
        prompt in the form its models were trained on and refuses unknown words (its provider's
        normalise_prompt).
        """
        if not isinstance(prompt, str):
            raise FlowblendError(f"a prompt is text, got {type(prompt).__name__}")
        if not negative and not prompt.strip():
            raise FlowblendError("the prompt is empty: give the text to generate from")
        if not self.provider:
            return prompt.strip()
        return _provider(self).normalise_prompt(prompt, negative=negative)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        self.check_video_shape(frames, height, width)
        s, t = self.spatial_factor, self.temporal_factor
        return (self.latent_channels, (frames - 1) // t + 1, height // s, width // s)

    def sampler_kwargs(self, latent_shape) -> dict:
        """Solver settings for a latent shape (LTX's dynamic shift depends on the token count)."""
        if not self.dynamic_shift:
            return {"solver": self.solver, "shift": self.shift}
        tokens = latent_shape[1] * latent_shape[2] * latent_shape[3]
        m = (1.15 - 0.5) / (4096 - 256)  # diffusers' calculate_shift defaults, as LTXPipeline
        return {"solver": self.solver, "shift": 1.0, "mu": tokens * m + (0.5 - m * 256)}

    def io_spec(self, latent_shape, guidance: float, dtype: str | torch.dtype = "fp32",
                dynamic: dict | None = None) -> IOSpec:
        """The I/O spec of this family's transformers at a latent shape (C, F, H, W): the one place a
        family's text size, mask and patch become a spec (export, engine builds and engine lookup).
        Batch 2 with CFG (guidance > 1, the sampler's rule), else 1."""
        from ..engines.iospec import IOSpec, dtype_name

        return IOSpec(batch=2 if guidance > 1 else 1, latent=tuple(latent_shape), text_len=self.text_len,
                      text_dim=self.text_dim, dtype=dtype_name(dtype), with_mask=self.takes_text_mask,
                      dynamic=dynamic or {}, patch=tuple(self.patch))



FAMILIES: dict[str, PairFamily] = {}
ARCHITECTURES: dict[str, Architecture] = {}


def register_family(family: PairFamily) -> PairFamily:
    """Add a family (and its architecture) to the registry: the one step a new family module takes."""
    FAMILIES[family.name] = family
    arch = family.architecture
    if arch is not None and ARCHITECTURES.get(arch.transformer_class) is not arch:
        ARCHITECTURES[arch.transformer_class] = arch
        register_class(arch.transformer_class, ClassEntry(arch.signature, arch.step_split, arch.fp32_islands),
                       arch.wrapper_name)
    return family


def get_family(name: str) -> PairFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise FlowblendError(f"unknown pair {name!r}: choose one of {', '.join(FAMILIES)}") from None


def architecture_of(transformer_class: str) -> Architecture:
    """The registered architecture of a diffusers class name, or ValueError naming the registered ones."""
    if transformer_class not in ARCHITECTURES:
        raise ValueError(f"no architecture registered for {transformer_class}: flowblend knows "
                         f"{' and '.join(ARCHITECTURES)} (families/)")
    return ARCHITECTURES[transformer_class]


def reference_configs(name: str) -> dict[str, dict]:
    """Transformer configs of a family's default models (published architectures, no weights)."""
    return get_family(name).reference_configs


def check_compatible(family: PairFamily, large_config, small_config) -> None:
    """Refuse a pair whose models cannot share latents and text conditioning; name the field."""
    check_models_compatible(family, {"large": large_config, "small": small_config})


def check_models_compatible(family: PairFamily, configs: dict[str, dict]) -> None:
    """Every model against the first: one line naming the field and both values."""
    (first, first_config), *others = configs.items()
    for name, config in others:
        for key in family.compat_fields:
            a, b = _as_tuple(first_config.get(key)), _as_tuple(config.get(key))
            if a != b:
                hint = f"; {family.compat_hint}" if family.compat_hint else ""
                raise FlowblendError(f"incompatible {family.name} pair: {key} differs ({first} {a}, {name} {b}); all "
                                     f"models must share the latent space and text encoder{hint}")


def _as_tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _provider(family: PairFamily):
    if callable(family.provider):
        return family.provider()
    import importlib

    return importlib.import_module(family.provider)  # a family registered from outside flowblend


