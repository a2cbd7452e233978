"""``nn.MultiheadAttention`` with its projections as ``nn.Linear`` modules, so they can be quantized.

torch's attention keeps the query/key/value projections as one packed parameter (``in_proj_weight``) and calls
``F.multi_head_attention_forward`` (or, in ``nn.TransformerEncoderLayer``'s eval fast path, one fused kernel)
with its weights: no ``nn.Linear`` of it ever runs, so no quantizer in front of one sees data (calibration
failed with "no data was collected for ... out_proj") and its MatMuls stayed float. :func:`split_attention`
replaces each attention module of the (reparameterized copy of the) model with :class:`SplitAttention`: the
same weights in four ``nn.Linear`` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) and the same arithmetic
(scaled dot product, masks, head averaging of the returned weights). Its ``_qkv_same_embed_dim`` is False and it
has no ``in_proj_bias``, so transformer layers take their plain path, which calls it. Options it does not
implement (``add_bias_kv``, ``add_zero_attn``) leave that module as it is, with a note.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SplitAttention(nn.Module):
    """Eval-mode ``nn.MultiheadAttention`` (same call signature and outputs) built from four ``nn.Linear``."""

    def __init__(self, src: nn.MultiheadAttention):
        super().__init__()
        e, h = src.embed_dim, src.num_heads
        self.embed_dim, self.num_heads, self.head_dim = e, h, e // h
        self.batch_first, self.dropout = src.batch_first, src.dropout
        self._qkv_same_embed_dim = False  # transformer layers then call this module (no fused fast path)
        self.in_proj_bias = None
        if src._qkv_same_embed_dim:
            w = src.in_proj_weight.detach()
            ws = (w[:e], w[e:2 * e], w[2 * e:])
        else:
            ws = (src.q_proj_weight.detach(), src.k_proj_weight.detach(), src.v_proj_weight.detach())
        b = src.in_proj_bias.detach() if src.in_proj_bias is not None else None
        bs = (b[:e], b[e:2 * e], b[2 * e:]) if b is not None else (None, None, None)
        self.q_proj, self.k_proj, self.v_proj = (self._linear(wi, bi) for wi, bi in zip(ws, bs))
        self.out_proj = self._linear(src.out_proj.weight.detach(),
                                     src.out_proj.bias.detach() if src.out_proj.bias is not None else None)

    @staticmethod
    def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if bias is not None:
                lin.bias.copy_(bias)
        return lin

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, lq, lk, h, d = query.size(0), query.size(1), key.size(1), self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(n, lq, h, d).transpose(1, 2)
        k = self.k_proj(key).reshape(n, lk, h, d).transpose(1, 2)
        v = self.v_proj(value).reshape(n, lk, h, d).transpose(1, 2)
        scores = torch.matmul(q * (1.0 / math.sqrt(d)), k.transpose(-2, -1))  # (N, H, Lq, Lk)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(n, h, lq, lk)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if key_padding_mask is not None:
            pad = key_padding_mask.reshape(n, 1, 1, lk)
            scores = scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else scores + pad
        attn = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            attn = nn.functional.dropout(attn, p=self.dropout)
        out = self.out_proj(torch.matmul(attn, v).transpose(1, 2).reshape(n, lq, self.embed_dim))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.mean(dim=1) if average_attn_weights else attn
            weights = weights.squeeze(0) if unbatched else weights
        return out, weights


def split_attention(model: nn.Module) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place: call it on a copy) with
    :class:`SplitAttention`; returns a note per module it left as it is (options it does not implement)."""
    notes = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.MultiheadAttention):
                continue
            full = f"{name}.{child_name}" if name else child_name
            if child.bias_k is not None or child.add_zero_attn:
                notes.append(f"{full}: nn.MultiheadAttention with add_bias_kv / add_zero_attn stays as it is; its "
                             "projections run float")
                continue
            setattr(module, child_name, SplitAttention(child).train(child.training))
    return notes
