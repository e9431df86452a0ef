"""Model-pair registry: what each family (wan, wan22, ltx, toy) is and how to load it through diffusers.

A family fixes what both models of a pair must share (latent space, text conditioning, patching)
and the defaults its diffusers pipeline uses (solver, shift, steps, guidance, video size). A family
names its models and their plan letters: large/small (L, S) for two-model pairs; high/low/small
(H, L, S) for `wan22`, whose two Wan 2.2 A14B experts come from one checkpoint (`transformer`,
`transformer_2`) and whose stand-in is Wan 2.1 1.3B. Loading returns the transformers plus the
shared prompt encoder and latent decoder; the runtime gets
those as plain callables and never imports this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from flowblend.errors import FlowblendError

if TYPE_CHECKING:  # torch loads when a pair does: `flowblend --help` and argument checks stay fast
    import torch

    from flowblend.engines.iospec import IOSpec


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
    # A family whose models ship with a package above this one (the toy pair) names the module that
    # loads them; it provides load_pair(family, large, small, dtype, device, load_transformers) and
    # REFERENCE_CONFIGS.
    # Resolved by name so that export/ never imports the packages that sit on top of it.
    provider: str = ""
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
            below = [f for f in range(frames - 1, 0, -1) if self.frames_ok(f)][:1]
            above = next(f for f in range(max(frames + 1, 1), frames + 2 + k * pt * 2) if self.frames_ok(f))
            rule = f"{k}k+1 for this VAE" if pt == 1 else \
                f"{k}k+1 for this VAE and fill whole {pt}-frame patches of the transformer, i.e. a multiple of {pt} latent frames"
            raise FlowblendError(f"{self.name}: frames must be {rule}, got {frames}; try "
                                 f"{' or '.join(str(f) for f in below + [above])}")

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
        from flowblend.engines.iospec import IOSpec, dtype_name

        return IOSpec(batch=2 if guidance > 1 else 1, latent=tuple(latent_shape), text_len=self.text_len,
                      text_dim=self.text_dim, dtype=dtype_name(dtype), with_mask=self.takes_text_mask,
                      dynamic=dynamic or {}, patch=tuple(self.patch))


FAMILIES: dict[str, PairFamily] = {
    "wan": PairFamily(
        name="wan", transformer_class="WanTransformer3DModel",
        large="Wan-AI/Wan2.1-T2V-14B-Diffusers", small="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        latent_channels=16, spatial_factor=8, temporal_factor=4, patch=(1, 2, 2),
        solver="unipc", shift=3.0, steps=50, guidance=5.0, height=480, width=832, frames=81,
        text_len=512, text_dim=4096,
        compat_fields=("in_channels", "out_channels", "text_dim", "patch_size"),
        description="Wan 2.1 T2V 14B + 1.3B, shared UMT5-XXL and Wan VAE"),
    "wan22": PairFamily(
        name="wan22", transformer_class="WanTransformer3DModel",
        large="Wan-AI/Wan2.2-T2V-A14B-Diffusers", small="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        latent_channels=16, spatial_factor=8, temporal_factor=4, patch=(1, 2, 2),
        # Wan2.2-T2V-A14B's own settings: UniPC, flow shift 12, 40 steps, boundary 0.875, CFG 4.0 high / 3.0 low
        solver="unipc", shift=12.0, steps=40, guidance=4.0, height=480, width=832, frames=81,
        text_len=512, text_dim=4096,
        compat_fields=("in_channels", "out_channels", "text_dim", "patch_size"),
        description="Wan 2.2 T2V A14B's two experts (high, low noise) + Wan 2.1 1.3B, shared UMT5-XXL and Wan 2.1 VAE",
        models=("high", "low", "small"), letters=("H", "L", "S"), checkpoint_of=("large", "large", "small"),
        subfolders=("transformer", "transformer_2", None), boundary_ratio=0.875,
        expert_guidance=(("high", 4.0), ("low", 3.0)),
        compat_hint="only Wan2.2-T2V-A14B's experts share Wan 2.1's 16-channel latents and UMT5 with Wan 2.1 1.3B "
                    "(TI2V-5B has a 48-channel VAE, the I2V experts take 36 input channels)"),
    "ltx": PairFamily(
        name="ltx", transformer_class="LTXVideoTransformer3DModel",
        large="Lightricks/LTX-Video-0.9.7-dev", small="Lightricks/LTX-Video-0.9.8-2B-distilled",
        latent_channels=128, spatial_factor=32, temporal_factor=8, patch=(1, 1, 1),
        solver="euler", shift=1.0, steps=40, guidance=3.0, height=512, width=704, frames=121,
        text_len=128, text_dim=4096, takes_text_mask=True, dynamic_shift=True,
        compat_fields=("in_channels", "out_channels", "caption_channels", "patch_size", "patch_size_t"),
        description="LTX-Video 13B + 2B (0.9.7/0.9.8), shared T5-XXL and LTX VAE", pipeline_class="LTXPipeline",
        **{  # -- issue 27: the step- and guidance-distilled model D (a self-contained block to move with ltx) --
            # LTX-Video 0.9.8 distilled (2B here; the 13B distilled has the 13B's config): diffusers' LTX docs run
            # it at guidance_scale=1.0 over a few explicit timesteps, so D runs batch 1 (no unconditional half);
            # plans give it its own steps over its interval (`L20,D4,L10`, runtime/plan.py)
            "models": ("large", "small", "distilled"), "letters": ("L", "S", "D"),
            "checkpoint_of": ("large", "small", "distilled"), "subfolders": (None, None, None),
            "optional_checkpoints": (("distilled", "Lightricks/LTX-Video-0.9.8-2B-distilled"),),
            "expert_guidance": (("distilled", 1.0),)}),
    "toy": PairFamily(
        name="toy", transformer_class="WanTransformer3DModel", large="<shipped>", small="<shipped>",
        latent_channels=3, spatial_factor=1, temporal_factor=1, patch=(3, 4, 4),
        solver="unipc", shift=3.0, steps=20, guidance=4.0, height=32, width=32, frames=9,
        text_len=8, text_dim=32,
        compat_fields=("in_channels", "out_channels", "text_dim", "patch_size"),
        description="two tiny Wan-architecture models trained on procedural shape videos (ships in the repo)",
        provider="flowblend.toy.model"),
}


def get_family(name: str) -> PairFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise FlowblendError(f"unknown pair {name!r}: choose one of {', '.join(FAMILIES)}") from None


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


@dataclass
class LoadedPair:
    """Both transformers of a pair and the parts they share, ready for engines and the pipeline."""

    family: PairFamily
    transformers: dict[str, torch.nn.Module]
    encode_prompt: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]]
    decode: Callable[[torch.Tensor], torch.Tensor]  # latents -> video [B, 3, F, H, W] in [-1, 1]
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def large(self) -> torch.nn.Module:
        return self.transformers["large"]

    @property
    def small(self) -> torch.nn.Module:
        return self.transformers["small"]


def load_pair(name: str, large: str | None = None, small: str | None = None, dtype: torch.dtype | None = None,
              device: str | torch.device = "cpu", allow_download: bool = False,
              load_transformers: bool = True, export_layout: bool = False) -> LoadedPair:
    """Load a pair from local paths or hub ids (the user's cache; no download unless allowed); dtype default fp32.

    `load_transformers=False` loads only the shared parts (text encoder, VAE): compiled backends run
    their own engines, and the PyTorch transformers would only take device memory (about 31 GB of
    FP16 weights for Wan 14B + 1.3B). `transformers` is then empty.

    export_layout=True (export, verify, build checks): the transformers are read straight into the
    export layout of `dtype` (export/precision.py: FP16/BF16 regions, FP32 islands from the source
    weights), one tensor at a time, never as an FP32 model first; they then run through
    precision.region_precision, not on their own. In-memory families (the toy pair) load as usual.
    """
    import torch

    dtype = dtype or torch.float32
    family = get_family(name)
    if family.provider:
        return _provider(family).load_pair(family, large, small, torch.float32 if export_layout else dtype, device,
                                           load_transformers=load_transformers)
    sources = {"large": large or family.large, "small": small or family.small, **dict(family.optional_checkpoints)}
    shared = _SharedComponents(family, sources["small"], dtype, device, allow_download)
    if not load_transformers:
        _check_source(sources["small"], allow_download)  # the shared parts come from the small model's checkpoint
        return LoadedPair(family, {}, shared.encode, shared.decode, sources)
    layout = export_layout and dtype != torch.float32
    optional = dict(family.optional_checkpoints)
    models = {name: load_transformer(family, sources[arg], dtype, allow_download, subfolder, export_layout=layout)
              for name, arg, subfolder in zip(family.models, family.checkpoint_of, family.subfolders)
              if arg not in optional or Path(sources[arg]).expanduser().exists() or _in_hub_cache(sources[arg])}
    check_models_compatible(family, {name: dict(m.config) for name, m in models.items()})
    for m in models.values():
        m.to(device)
    return LoadedPair(family, models, shared.encode, shared.decode, sources)


def _check_source(source: str, allow_download: bool, family: PairFamily | None = None) -> None:
    p = Path(source)
    looks_local = source.startswith((".", "/", "~")) or p.exists()
    if looks_local and not p.expanduser().exists():
        raise FlowblendError(f"checkpoint path {source!r} does not exist: pass --large/--small with a diffusers "
                             "checkpoint folder (containing transformer/) or a hub id in your local cache")
    if not looks_local and not allow_download and not _in_hub_cache(source):
        what = f"{family.name} checkpoint" if family else "checkpoint"
        raise FlowblendError(f"{what} {source!r} is not in your Hugging Face cache: pass --large/--small with local "
                             "diffusers checkpoint folders, or --allow-download to fetch it (README: what the "
                             "real checkpoints need)")


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a hub id's transformer config is already in the local cache (no network, no warning)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "transformer/config.json")
    return isinstance(found, str)


def load_transformer(family: PairFamily, source: str, dtype, allow_download: bool, subfolder: str | None = None,
                     export_layout: bool = False):
    """One transformer; `subfolder` None means transformer/ when the folder has one (or for a hub id).

    export_layout=True reads it straight into the export layout of `dtype` (export/precision.py)."""
    import diffusers

    from .checkpoint import load_transformer_in_layout

    _check_source(source, allow_download, family)
    cls = getattr(diffusers, family.transformer_class)
    root = Path(source).expanduser()
    if subfolder is None:
        subfolder = "transformer" if (not root.exists() or (root / "transformer").is_dir()) else None
    elif root.exists() and not (root / subfolder).is_dir():
        hint = f"; {family.compat_hint}" if family.compat_hint else ""
        raise FlowblendError(f"{source!r} has no {subfolder}/ folder: {family.name} needs a checkpoint with "
                             f"{' and '.join(s for s in family.subfolders if s)}{hint}")
    where = str(root) if root.exists() else source
    try:
        if export_layout:
            return load_transformer_in_layout(cls, where, subfolder, dtype, local_files_only=not allow_download)
        return cls.from_pretrained(where, subfolder=subfolder, torch_dtype=dtype,
                                   local_files_only=not allow_download).eval()
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0].rstrip(". ")
        raise FlowblendError(f"cannot load {family.transformer_class} from {source!r}: {reason}. Point --large/--small "
                             "at a local diffusers checkpoint, or pass --allow-download to fetch a hub id") from exc


class _SharedComponents:
    """Text encoder + VAE of a real pair, loaded lazily from the small model's checkpoint."""

    def __init__(self, family, source, dtype, device, allow_download):
        self.family, self.source, self.dtype, self.device = family, source, dtype, device
        self.local_only = not allow_download
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            import diffusers

            cls = getattr(diffusers, self.family.pipeline_class)
            try:
                self._pipe = cls.from_pretrained(self.source, transformer=None, torch_dtype=self.dtype,
                                                 local_files_only=self.local_only).to(self.device)
            except (OSError, ValueError) as exc:
                raise FlowblendError(f"cannot load the text encoder and VAE of {self.source!r}: {exc}") from exc
        return self._pipe

    def encode(self, prompts: list[str]):
        import torch

        with torch.no_grad():
            return self._encode(prompts)

    def _encode(self, prompts: list[str]):
        pipe = self._pipeline()
        if self.family.pipeline_class == "WanPipeline":
            embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                           max_sequence_length=self.family.text_len, device=self.device)
            return embeds, None
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                max_sequence_length=self.family.text_len, device=self.device)
        return embeds, mask.long()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.no_grad():
            return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        import torch

        vae = self._pipeline().vae
        latents = latents.to(vae.dtype)
        if self.family.pipeline_class == "WanPipeline":
            z = vae.config.z_dim
            mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
            std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
            return vae.decode(latents * std + mean, return_dict=False)[0].float()
        mean, std = vae.latents_mean.view(1, -1, 1, 1, 1).to(latents), vae.latents_std.view(1, -1, 1, 1, 1).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
        timestep = torch.zeros(latents.shape[0], device=latents.device, dtype=latents.dtype) \
            if vae.config.timestep_conditioning else None
        return vae.decode(latents, timestep, return_dict=False)[0].float()


def _provider(family: PairFamily):
    import importlib

    return importlib.import_module(family.provider)


# Published architectures, for cost estimates without loading weights (`flowblend plan`).
_WAN_COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256)
_LTX_COMMON = dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, caption_channels=4096)


def reference_configs(name: str) -> dict[str, dict]:
    """Transformer configs of a family's default large and small models."""
    wan_14b = dict(_WAN_COMMON, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)
    wan_1b = dict(_WAN_COMMON, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
    if name == "wan":
        return {"large": wan_14b, "small": wan_1b}
    if name == "wan22":  # both A14B experts have Wan 2.1 14B's architecture
        return {"high": dict(wan_14b), "low": dict(wan_14b), "small": wan_1b}
    if name == "ltx":  # 13B: 48 layers, 32 x 128; 2B (and the 2B distilled): 28 layers, 32 x 64 (model cards)
        return {"large": dict(_LTX_COMMON, num_attention_heads=32, attention_head_dim=128, num_layers=48),
                "small": dict(_LTX_COMMON, num_attention_heads=32, attention_head_dim=64, num_layers=28),
                "distilled": dict(_LTX_COMMON, num_attention_heads=32, attention_head_dim=64, num_layers=28)}
    family = get_family(name)
    if family.provider:
        return {size: dict(config) for size, config in _provider(family).REFERENCE_CONFIGS.items()}
    return {}
