"""Quality metrics for calibration: how close a blended video stays to the large-only one.

Learned metrics come from the libraries made for them, never from hand-written networks:
- DINOv2 frame similarity to the LLL video of the same prompt and seed (transformers' Dinov2Model;
  the paper picks its first boundary from exactly this curve);
- CLIP text-video score, 100 * cosine(frame, prompt) averaged over frames (transformers' CLIPModel,
  the CLIPScore convention);
- Frechet distances through torchmetrics' FrechetInceptionDistance: FID over frames with Inception
  (torch-fidelity weights) or DINOv2 features (FD-DINOv2), and FVD with a video feature extractor
  the user supplies (e.g. an I3D TorchScript);
- on the toy pair, exact probes: foreground-mask IoU with the LLL video, plus toy/probes.py.

Weights are read from a local path or the Hugging Face cache only; nothing is downloaded. A metric
whose weights are missing raises FlowblendError naming the flag that points at them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import nn

from flowblend.errors import FlowblendError

DEFAULT_DINO = "facebook/dinov2-small"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
SIMILARITY_METRICS = ("toy", "dino", "clip")  # per-video scores a plan search can rank by
METRIC_DESCRIPTIONS = {"toy": "foreground-mask IoU with the LLL video", "dino": "DINOv2 frame similarity to the LLL video",
                       "clip": "CLIP text-video score"}


def video_frames(video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> [F, 3, H, W] float in [0, 1], what image processors take with do_rescale=False."""
    if video.dim() == 5:
        video = video[0]
    return ((video.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 0, 2, 3).contiguous()


def _load_hf(kind: str, cls_name: str, source: str, flag: str, processor: str):
    """Model + processor from a local folder or the HF cache; FlowblendError naming the flag if absent."""
    import transformers

    path = Path(source).expanduser()
    where = str(path) if path.exists() else source
    try:
        model = getattr(transformers, cls_name).from_pretrained(where, local_files_only=True).eval()
        proc = getattr(transformers, processor).from_pretrained(where, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FlowblendError(
            f"{kind} weights not found at {source!r} (no download is attempted): pass {flag} PATH to a local "
            f"{cls_name} folder (config.json, model.safetensors and the processor files), or put {source} in the "
            "Hugging Face cache (HF_HOME) first") from exc
    return model, proc


class VideoMetric(Protocol):
    """A per-video score: higher is better; `references` are the LLL videos of the same prompt and seed."""

    name: str

    def score(self, videos: Sequence[torch.Tensor], references: Sequence[torch.Tensor],
              prompts: Sequence[str]) -> list[float]: ...


class DinoFrameSimilarity(nn.Module):
    """Cosine similarity of DINOv2 CLS features, frame by frame, to the reference video; also an FD feature module."""

    name = "dino"

    def __init__(self, source: str = DEFAULT_DINO):
        super().__init__()
        self.model, self.processor = _load_hf("DINOv2", "Dinov2Model", source, "--dino", "AutoImageProcessor")
        self.num_features = int(self.model.config.hidden_size)  # torchmetrics reads this for feature modules

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [N, 3, H, W] in [0, 1] -> CLS features [N, hidden]."""
        pixels = self.processor(images=list(frames), return_tensors="pt", do_rescale=False)["pixel_values"]
        return self.model(pixel_values=pixels).pooler_output

    def score(self, videos, references, prompts=()) -> list[float]:
        out = []
        for video, ref in zip(videos, references, strict=True):
            a, b = self(video_frames(video)), self(video_frames(ref))
            out.append(float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()))
        return out


class ClipTextVideoScore:
    """CLIPScore of a video: 100 * max(cos(frame, prompt), 0), averaged over frames (ignores the reference)."""

    name = "clip"

    def __init__(self, source: str = DEFAULT_CLIP):
        self.model, self.processor = _load_hf("CLIP", "CLIPModel", source, "--clip", "AutoProcessor")

    @torch.no_grad()
    def video_score(self, video: torch.Tensor, prompt: str) -> float:
        inputs = self.processor(text=[prompt], images=list(video_frames(video)), return_tensors="pt",
                                padding=True, truncation=True, do_rescale=False)
        out = self.model(**inputs)
        cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
        return float((100 * cos).clamp(min=0).mean())

    def score(self, videos, references, prompts) -> list[float]:
        return [self.video_score(v, p) for v, p in zip(videos, prompts, strict=True)]


class ToyMaskIoU:
    """Toy pair: IoU of the foreground masks with the LLL video, frame by frame (exact, no network)."""

    name = "toy"

    def score(self, videos, references, prompts=()) -> list[float]:
        from ..toy.probes import foreground_masks

        out = []
        for video, ref in zip(videos, references, strict=True):
            a = foreground_masks(video.detach().float().cpu().numpy())
            b = foreground_masks(ref.detach().float().cpu().numpy())
            inter, union = (a & b).sum(axis=(1, 2)), (a | b).sum(axis=(1, 2))
            out.append(float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0))))
        return out


# -- Frechet distances (set level) ----------------------------------------------------------------
class InceptionFrames(nn.Module):
    """FID's InceptionV3 (torch-fidelity) from a local weights file; frames in [0, 1]."""

    def __init__(self, weights: str, features: int = 2048):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as exc:
            raise FlowblendError("FID with Inception needs torch-fidelity: pip install torch-fidelity") from exc
        if not Path(weights).expanduser().is_file():
            raise FlowblendError(f"Inception weights {weights!r} not found: pass --inception PATH to torch-fidelity's "
                                 "pt_inception-2015-12-05 weights file (no download is attempted)")
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(features)],
                                      feature_extractor_weights_path=str(Path(weights).expanduser()))
        self.num_features = features  # 2048 is FID's standard; 64/192/768 are earlier Inception layers

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net((frames * 255).round().to(torch.uint8))


class VideoFeatures(nn.Module):
    """A user-supplied video feature extractor: [N, 3, F, H, W] in [-1, 1] -> [N, D].

    A `.pt2` file is a torch.export program (torch.export.save); anything else is loaded as
    TorchScript, the format FVD's I3D detector is commonly distributed in.
    """

    def __init__(self, path: str):
        super().__init__()
        p = Path(path).expanduser()
        if not p.is_file():
            raise FlowblendError(f"FVD feature extractor {path!r} not found: pass --fvd-extractor PATH to a TorchScript "
                                 "or torch.export (.pt2) module mapping videos [N, 3, F, H, W] in [-1, 1] to features "
                                 "[N, D] (e.g. I3D)")
        try:
            self.net = torch.export.load(str(p)).module() if p.suffix == ".pt2" else \
                torch.jit.load(str(p), map_location="cpu").eval()
        except (RuntimeError, ValueError) as exc:
            raise FlowblendError(f"cannot load {path!r} as a feature extractor ({exc}): save it with "
                                 "torch.export.save(torch.export.export(model, (videos,)), 'x.pt2')") from exc
        self.num_features = None

    @torch.no_grad()
    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.net(videos)


def frechet_distance(samples: Sequence[torch.Tensor], references: Sequence[torch.Tensor], features: nn.Module) -> float:
    """Frechet distance between two sets under a feature module (torchmetrics' FID arithmetic).

    `samples`/`references` are batches the module takes (frames for FID, videos for FVD); the
    Frechet distance of few samples is biased upwards, so compare plans only at equal set sizes.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if getattr(features, "num_features", None) is None:
        features.num_features = int(features(torch.cat(list(references[:1]))).shape[-1])
    fid = FrechetInceptionDistance(feature=features, reset_real_features=True)
    for batch in references:
        fid.update(batch, real=True)
    for batch in samples:
        fid.update(batch, real=False)
    return float(fid.compute())


@dataclass
class MetricSources:
    """Where each learned metric's weights are (None: that metric is not computed)."""

    dino: str | None = None
    clip: str | None = None
    inception: str | None = None
    fvd_extractor: str | None = None


class QualityMetrics:
    """Loads every metric a calibration run needs up front (failing before any sampling), then scores plans."""

    def __init__(self, similarity: str, sources: MetricSources, toy: bool = False):
        if similarity not in SIMILARITY_METRICS:
            raise FlowblendError(f"unknown quality metric {similarity!r}: choose one of {', '.join(SIMILARITY_METRICS)}")
        if similarity == "toy" and not toy:
            raise FlowblendError("--metric toy reads shapes back from pixels and only fits the toy pair: use "
                                 "--metric dino (with --dino PATH) or clip for real pairs")
        if similarity == "dino" and sources.dino is None:
            sources.dino = DEFAULT_DINO
        if similarity == "clip" and sources.clip is None:
            sources.clip = DEFAULT_CLIP
        self.toy = toy
        self.dino = DinoFrameSimilarity(sources.dino) if sources.dino else None
        self.clip = ClipTextVideoScore(sources.clip) if sources.clip else None
        self.inception = InceptionFrames(sources.inception) if sources.inception else None
        self.video_features = VideoFeatures(sources.fvd_extractor) if sources.fvd_extractor else None
        self.similarity: VideoMetric = {"toy": ToyMaskIoU, "dino": lambda: self.dino,
                                        "clip": lambda: self.clip}[similarity]()

    @property
    def name(self) -> str:
        return self.similarity.name

    def per_video(self, videos, references, prompts) -> list[float]:
        """The ranking score of each video (higher is better)."""
        return self.similarity.score(videos, references, prompts)

    def set_scores(self, videos, references, prompts) -> dict:
        """Every available set-level number for a plan's videos: means of per-video metrics, Frechet distances, probes."""
        out: dict[str, float] = {}
        if self.dino is not None:
            out["dino_sim"] = float(np.mean(self.dino.score(videos, references)))
            out["fd_dino"] = frechet_distance([video_frames(v) for v in videos],
                                              [video_frames(r) for r in references], self.dino)
        if self.clip is not None:
            out["clip_score"] = float(np.mean(self.clip.score(videos, references, prompts)))
        if self.inception is not None:
            out["fid"] = frechet_distance([video_frames(v) for v in videos],
                                          [video_frames(r) for r in references], self.inception)
        if self.video_features is not None:
            out["fvd"] = frechet_distance([torch.stack([v.float() for v in videos])],
                                          [torch.stack([r.float() for r in references])], self.video_features)
        if self.toy:
            out["mask_iou"] = float(np.mean(ToyMaskIoU().score(videos, references)))
            out.update(toy_probe_scores(videos, prompts))
        return out


def toy_probe_scores(videos, prompts) -> dict:
    """The toy probes (colour/shape/direction accuracy, coherence, Frechet to procedural videos)."""
    from ..toy.data import PromptSpec
    from ..toy.probes import score_set, score_video

    specs = [PromptSpec.parse(p) for p in prompts]
    if len(videos) >= 2:
        return score_set(list(videos), specs)
    one = score_video(videos[0], specs[0])  # a Frechet distance needs two videos at least
    return {k: float(one[f"{k[:-4]}_ok"]) for k in ("colour_acc", "shape_acc", "direction_acc", "semantic_acc")} \
        | {"coherence": float(one["coherence"])}
