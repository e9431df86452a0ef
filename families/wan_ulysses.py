"""Ulysses self-attention for Wan's blocks: each rank holds 1/U of the tokens; around attention, two all-to-alls
trade that for 1/U of the heads over every token (DeepSpeed-Ulysses, arXiv:2309.14509).

The projections, the norms across heads (RMSNorm over the whole inner dim, per token) and the rotary embedding
run on the rank's own tokens before the exchange, so only q, k, v and the attention output cross ranks: four
all-to-alls of 1/U of the layer's [B, tokens, heads, head_dim] per rank. Attention itself is per head, so it is
exactly the single-process attention of the heads this rank holds. Head group j (heads j*H/U .. (j+1)*H/U - 1)
lives on shard j. Installed by families/wan_step.WanStep.shard_sequence; imports torch.
"""
from __future__ import annotations

import torch


def _apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Copied from diffusers.models.transformers.transformer_wan.WanAttnProcessor.__call__ (0.42), inner function
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class UlyssesSelfAttention:
    """WanAttnProcessor (diffusers 0.42) for self-attention without image context, over a SequenceShard."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, sequence):
        self.sequence = sequence  # engines/parallel.SequenceShard

    def _heads_for_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, s, H, d] (own tokens, all heads) -> [B, U*s, H/U, d] (all tokens, own heads)."""
        b, s, h, d = x.shape
        u = self.sequence.degree
        sent = x.reshape(b, s, u, h // u, d).permute(2, 0, 1, 3, 4)  # slice j: head group j, to rank j
        got = self.sequence.all_to_all(sent)  # slice j: rank j's tokens of this rank's heads
        return got.permute(1, 0, 2, 3, 4).reshape(b, u * s, h // u, d)

    def _tokens_for_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, U*s, H/U, d] -> [B, s, H, d]: the inverse exchange."""
        b, n, hu, d = x.shape
        u = self.sequence.degree
        sent = x.reshape(b, u, n // u, hu, d).permute(1, 0, 2, 3, 4)  # slice j: rank j's tokens
        got = self.sequence.all_to_all(sent)  # slice j: head group j of this rank's tokens
        return got.permute(1, 2, 0, 3, 4).reshape(b, n // u, u * hu, d)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        assert encoder_hidden_states is None and attn.add_k_proj is None, "Ulysses runs Wan's self-attention only"
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:  # this rank's rows of the rotary tables (WanStep.constants)
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)
        query, key, value = (self._heads_for_tokens(x) for x in (query, key, value))
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                              is_causal=False, backend=self._attention_backend)
        hidden_states = self._tokens_for_heads(hidden_states.type_as(query))
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
