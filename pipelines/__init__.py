"""flowblend.pipelines: FlowBlending behind diffusers' pipeline interface (from_pretrained, from_pipe, __call__)."""
from .ltx import FlowBlendLTXPipeline
from .wan import FlowBlendWanPipeline

__all__ = ["FlowBlendLTXPipeline", "FlowBlendWanPipeline"]
