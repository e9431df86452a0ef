"""Quality metrics: tiny random DINOv2/CLIP saved to tmp_path (plumbing, checked against direct
transformers/scipy arithmetic), the toy mask IoU and probes on procedural ground truth (real numbers),
and every missing-weights error."""
import json
import warnings

import numpy as np
import pytest
import torch
from scipy import linalg

from flowblend.calibrate.metrics import (
    ClipTextVideoScore,
    DinoFrameSimilarity,
    MetricSources,
    QualityMetrics,
    ToyMaskIoU,
    VideoFeatures,
    frechet_distance,
    toy_probe_scores,
    video_frames,
)
from flowblend.errors import FlowblendError
from flowblend.toy.data import PromptSpec, render


def save_tiny_dino(path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return str(path)


def save_tiny_clip(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def dino_path(tmp_path_factory):
    return save_tiny_dino(tmp_path_factory.mktemp("dino"))


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _videos(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand((3, 4, 24, 24), generator=g) * 2 - 1 for _ in range(n)]


def _scipy_frechet(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca + cb - 2 * covmean))


def test_dino_similarity_matches_direct_transformers_computation(dino_path):
    from transformers import AutoImageProcessor, Dinov2Model

    metric = DinoFrameSimilarity(dino_path)
    a, b = _videos(2)
    model, proc = Dinov2Model.from_pretrained(dino_path), AutoImageProcessor.from_pretrained(dino_path)

    def cls(video):
        frames = [((video[:, t] + 1) / 2).numpy() for t in range(video.shape[1])]
        with torch.no_grad():
            return model(**proc(images=frames, return_tensors="pt", do_rescale=False)).pooler_output.numpy()

    fa, fb = cls(a), cls(b)
    expected = np.mean(np.sum(fa * fb, 1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1))
    got = metric.score([a, a], [b, a])
    assert got[0] == pytest.approx(float(expected), abs=1e-5)
    assert got[1] == pytest.approx(1.0, abs=1e-6) and got[0] < 1.0


def test_clip_text_video_score_matches_direct_computation(clip_path):
    from transformers import AutoProcessor, CLIPModel

    metric = ClipTextVideoScore(clip_path)
    video = _videos(1, seed=3)[0]
    model, proc = CLIPModel.from_pretrained(clip_path), AutoProcessor.from_pretrained(clip_path)
    frames = [((video[:, t] + 1) / 2).numpy() for t in range(video.shape[1])]
    with torch.no_grad():
        img = model.get_image_features(**proc(images=frames, return_tensors="pt", do_rescale=False))
        txt = model.get_text_features(**proc(text=["a red circle"], return_tensors="pt", padding=True))
    img = getattr(img, "pooler_output", img).numpy()
    txt = getattr(txt, "pooler_output", txt).numpy()
    cos = img @ txt[0] / np.linalg.norm(img, axis=1) / np.linalg.norm(txt[0])
    expected = float(np.mean(np.clip(100 * cos, 0, None)))
    assert metric.score([video], [video], ["a red circle"])[0] == pytest.approx(expected, abs=1e-3)


def test_frechet_distance_matches_scipy_formula(dino_path):
    metric = DinoFrameSimilarity(dino_path)
    a, b = _videos(3, seed=1), _videos(3, seed=2)
    fa = torch.cat([metric(video_frames(v)) for v in a]).double().numpy()
    fb = torch.cat([metric(video_frames(v)) for v in b]).double().numpy()
    got = frechet_distance([video_frames(v) for v in a], [video_frames(v) for v in b], metric)
    assert got == pytest.approx(_scipy_frechet(fa, fb), rel=1e-3, abs=1e-4)
    assert frechet_distance([video_frames(v) for v in a], [video_frames(v) for v in a], metric) == \
        pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_fvd_with_a_supplied_extractor(tmp_path, fmt):
    class Extractor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3 * 4, 5)

        def forward(self, videos: torch.Tensor) -> torch.Tensor:
            return self.proj(videos.mean(dim=(3, 4)).flatten(1))  # [N, 3, F] -> [N, 5]

    torch.manual_seed(0)
    a, b = torch.stack(_videos(8, seed=1)), torch.stack(_videos(8, seed=2)) * 0.5 + 0.4
    if fmt == "pt2":
        path = tmp_path / "i3d_like.pt2"
        torch.export.save(torch.export.export(Extractor(), (a,)), str(path))
    else:
        path = tmp_path / "i3d_like.pt"
        with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13 but still what I3D ships as
            warnings.simplefilter("ignore")
            torch.jit.script(Extractor()).save(str(path))
    extractor = VideoFeatures(str(path))
    fa, fb = extractor(a).double().numpy(), extractor(b).double().numpy()
    assert frechet_distance([a], [b], extractor) == pytest.approx(_scipy_frechet(fa, fb), rel=1e-3)
    assert frechet_distance([a], [b], extractor) > 0.1


def test_toy_mask_iou_against_rendered_ground_truth():
    spec = PromptSpec("red", "square", "left")
    a, b = render(spec, 0), render(spec, 1)
    truth_a, truth_b = a.max(axis=0) > -1, b.max(axis=0) > -1  # the renderer's own masks
    inter, union = (truth_a & truth_b).sum(axis=(1, 2)), (truth_a | truth_b).sum(axis=(1, 2))
    expected = float(np.mean(inter / union))
    got = ToyMaskIoU().score([torch.from_numpy(a), torch.from_numpy(a)], [torch.from_numpy(b), torch.from_numpy(a)])
    assert got[0] == pytest.approx(expected) and 0 < got[0] < 1 and got[1] == 1.0


def test_toy_probes_give_real_numbers():
    specs = [PromptSpec("blue", "circle", "up"), PromptSpec("green", "triangle", "right"),
             PromptSpec("yellow", "square", "down")]
    truth = [torch.from_numpy(render(s, 7)) for s in specs]
    scores = toy_probe_scores(truth, [s.text for s in specs])
    assert scores["semantic_acc"] == 1.0 and scores["coherence"] > 0.8
    noise = _videos(3, seed=5)
    noisy = toy_probe_scores([torch.nn.functional.pad(v, (4, 4, 4, 4)) for v in noise],
                             [s.text for s in specs])
    assert noisy["semantic_acc"] < 1.0 and noisy["coherence"] < scores["coherence"]
    one = toy_probe_scores(truth[:1], [specs[0].text])  # one video: no Frechet, accuracies still read
    assert one["semantic_acc"] == 1.0 and "frechet" not in one


def test_quality_metrics_set_scores_toy_and_dino(dino_path):
    specs = [PromptSpec("red", "circle", "left"), PromptSpec("cyan", "square", "up")]
    refs = [torch.from_numpy(render(s, 0)) for s in specs]
    videos = [torch.from_numpy(render(s, 1)) for s in specs]
    m = QualityMetrics("toy", MetricSources(dino=dino_path), toy=True)
    per_video = m.per_video(videos, refs, [s.text for s in specs])
    scores = m.set_scores(videos, refs, [s.text for s in specs])
    assert scores["mask_iou"] == pytest.approx(np.mean(per_video))
    assert {"dino_sim", "fd_dino", "semantic_acc", "frechet"} <= set(scores)


@pytest.mark.parametrize("kwargs,flag", [
    (dict(similarity="dino", sources=MetricSources(dino="/no/such/dinov2")), "--dino"),
    (dict(similarity="clip", sources=MetricSources(clip="/no/such/clip")), "--clip"),
    (dict(similarity="dino", sources=MetricSources(dino="flowblend-tests/no-such-dinov2")), "Hugging Face cache"),
    (dict(similarity="toy", sources=MetricSources(inception="/no/such/inception.pth"), toy=True), "torch-fidelity"),
    (dict(similarity="toy", sources=MetricSources(fvd_extractor="/no/i3d.pt"), toy=True), "--fvd-extractor"),
    (dict(similarity="toy", sources=MetricSources()), "only fits the toy pair"),
    (dict(similarity="lpips", sources=MetricSources()), "unknown quality metric"),
])
def test_missing_weights_name_the_metric_and_the_fix(kwargs, flag):
    with pytest.raises(FlowblendError, match=flag.replace("-", r"\-").replace(".", r"\.")) as err:
        QualityMetrics(**kwargs)
    assert "\n" not in str(err.value)


def test_fid_with_inception_weights_from_a_local_file(tmp_path, monkeypatch):
    """Plumbing of frame FID through torch-fidelity's InceptionV3 loaded from a local file (random weights here)."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3",
                                   reason="FID with Inception needs the optional torch-fidelity package")
    from flowblend.calibrate.metrics import InceptionFrames

    with monkeypatch.context() as m:  # build once with random weights, without the download
        m.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "pt_inception-random.pth"
    torch.save(net.state_dict(), weights)
    inception = InceptionFrames(str(weights), features=64)  # the pool-1 features: same path, far cheaper
    a, b = _videos(2, seed=1), [v * 0.3 for v in _videos(2, seed=2)]
    frames_a, frames_b = [video_frames(v) for v in a], [video_frames(v) for v in b]
    fa = torch.cat([inception(f) for f in frames_a]).double().numpy()
    fb = torch.cat([inception(f) for f in frames_b]).double().numpy()
    assert fa.shape == (8, 64)
    got = frechet_distance(frames_a, frames_b, inception)
    assert got == pytest.approx(_scipy_frechet(fa, fb), rel=1e-2) and got > 0
