"""Loading a family's models through diffusers: the transformers, and the text encoder and VAE they share.

Loading returns the transformers plus the shared prompt encoder and latent decoder; the runtime gets
those as plain callables and never imports this package. How a family encodes and decodes is its
architecture's (families/<family>.py); where the weights come from is the user's disk or
hub cache (no download unless allowed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from flowblend.errors import FlowblendError

from .registry import PairFamily, _provider, check_compatible, check_models_compatible, get_family

if TYPE_CHECKING:
    import torch

__all__ = ["LoadedPair", "load_pair", "load_transformer", "check_compatible"]


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
              load_transformers: bool = True, export_layout: bool = False, offload: str = "none") -> LoadedPair:
    """Load a pair from local paths or hub ids (the user's cache; no download unless allowed); dtype default fp32.

    `load_transformers=False` loads only the shared parts (text encoder, VAE): compiled backends run
    their own engines, and the PyTorch transformers would only take device memory (about 31 GB of
    FP16 weights for Wan 14B + 1.3B). `transformers` is then empty.

    export_layout=True (export, verify, build checks): the transformers are read straight into the
    export layout of `dtype` (export/precision.py: FP16/BF16 regions, FP32 islands from the source
    weights), one tensor at a time, never as an FP32 model first; they then run through
    precision.region_precision, not on their own. In-memory families (the toy pair) load as usual.

    `offload` (families/offload.py): where the text encoder and VAE sit during the loop; "none" keeps
    them on `device`. A provider's in-memory parts (the toy's) stay where the provider puts them.
    """
    import torch

    dtype = dtype or torch.float32
    family = get_family(name)
    if family.provider:
        return _provider(family).load_pair(family, large, small, torch.float32 if export_layout else dtype, device,
                                           load_transformers=load_transformers)
    sources = {"large": large or family.large, "small": small or family.small, **dict(family.optional_checkpoints)}
    shared = _SharedComponents(family, sources["small"], dtype, device, allow_download, offload)
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
    from ..export.checkpoint import load_transformer_in_layout

    _check_source(source, allow_download, family)
    cls = family.architecture.model_class()
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
    """Text encoder + VAE of a real pair, loaded lazily from the small model's checkpoint, placed as `offload`
    says (families/offload.py): on the device throughout, or each there only while it runs (swap), or the
    text encoder on the CPU (cpu). A part off the device waits on the CPU (offload.PARK)."""

    def __init__(self, family, source, dtype, device, allow_download, offload: str = "none"):
        from .offload import check_offload

        self.family, self.source, self.dtype, self.device = family, source, dtype, device
        self.placement = check_offload(offload)
        self.local_only = not allow_download
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            import diffusers

            cls = getattr(diffusers, self.family.pipeline_class)
            try:
                pipe = cls.from_pretrained(self.source, transformer=None, torch_dtype=self.dtype,
                                           local_files_only=self.local_only)
            except (OSError, ValueError) as exc:
                raise FlowblendError(f"cannot load the text encoder and VAE of {self.source!r}: {exc}") from exc
            if self.placement.text_encoder_in_loop:
                pipe.to(self.device)  # both stay on the device (placement "none": its loop holds both)
            self._pipe = pipe  # else both wait on the CPU, where from_pretrained put them
        return self._pipe

    def encode(self, prompts: list[str]):
        import torch

        with torch.no_grad():
            return self._encode(prompts)

    def _encode(self, prompts: list[str]):
        from .offload import PARK

        pipe, placement = self._pipeline(), self.placement
        where = self.device if placement.encode_on_device else PARK
        moved = placement.encode_on_device and not placement.text_encoder_in_loop
        if moved:
            pipe.text_encoder.to(self.device)
        try:
            embeds, mask = self.family.architecture.encode_prompt(pipe, prompts, self.family, where)
        finally:
            if moved:  # back to the CPU before the loop starts (swap)
                pipe.text_encoder.to(PARK)
        return embeds.to(self.device), (mask.to(self.device) if mask is not None else None)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.no_grad():
            return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        from .offload import PARK

        vae, moved = self._pipeline().vae, not self.placement.vae_in_loop
        if moved:  # the VAE comes to the device for decoding only
            vae.to(self.device)
        try:
            return self.family.architecture.decode(vae, latents.to(self.device, vae.dtype))
        finally:
            if moved:
                vae.to(PARK)
