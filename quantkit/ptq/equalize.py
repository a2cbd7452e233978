"""Cross-layer equalization (CLE): an exact FP32 rescaling of conv -> activation -> conv pairs.

For a producer conv P whose output channel ``c`` flows only through per-channel, positive-homogeneous ops
(ReLU, LeakyReLU, identity, avg/max pooling, flatten before a Linear) into a consumer C, dividing P's output
channel ``c`` (weights and bias) by ``s_c > 0`` and multiplying C's input channel ``c`` by ``s_c`` leaves the
FP32 function unchanged. ReLU6 / Hardtanh(0, 6) is not positive-homogeneous; we keep the pair exact by
replacing that activation with :class:`ChannelClip` (``clamp(x, 0, 6 / s_c)`` per channel; exported as
Relu + Min with a constant, which TensorRT runs as an elementwise layer).

Why it helps with per-channel weights: the consumer's *input* is quantized per tensor, so channels with a small
range are crushed by the largest one. Scales come from the activations' per-channel ranges ``a_c`` on
calibration data and the consumer's per-input-channel weight ranges ``w_c``:

* depthwise consumer (its weights are per-channel on ``c`` already): ``s_c = a_c`` — every channel of the
  quantized activation gets the same range;
* dense consumer: ``s_c = sqrt(a_c / w_c)`` — activation and weight ranges meet halfway (Nagel et al. 2019
  with measured activation ranges instead of the producer's weights).

Scales are clipped to ``[1e-3, 1e3] x`` their geometric mean so a dead channel cannot blow up a weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from quantkit.models.ops import Add, Concat

_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.AdaptiveAvgPool2d, nn.AvgPool2d,
                        nn.MaxPool2d, nn.ZeroPad2d)
_HOMOGENEOUS_FUNCS = {torch.relu, nn.functional.relu, nn.functional.adaptive_avg_pool2d, nn.functional.avg_pool2d,
                      nn.functional.max_pool2d, nn.functional.pad}
_FLATTEN = {torch.flatten}
_SCALE_CLIP = 1e3


class ChannelClip(nn.Module):
    """``clamp(x, 0, upper[c])`` with a per-channel upper bound (a ReLU6 after equalization)."""

    def __init__(self, upper: torch.Tensor):
        super().__init__()
        self.register_buffer("upper", upper.detach().float().reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.relu(x), self.upper.to(x.dtype))


@dataclass
class EqualizePair:
    """One equalized pair: producer -> consumer module names and the scale range applied."""

    producer: str
    consumer: str
    kind: str  # "depthwise" | "dense"
    clip_nodes: list[str] = field(default_factory=list)
    scale_min: float = 1.0
    scale_max: float = 1.0

    def as_dict(self) -> dict:
        return {"producer": self.producer, "consumer": self.consumer, "kind": self.kind,
                "relu6_to_channel_clip": len(self.clip_nodes),
                "scale_range": [round(self.scale_min, 6), round(self.scale_max, 6)]}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (Add, Concat, ChannelClip)) or super().is_leaf_module(m, qualname)


def _is_relu6(m) -> bool:
    return isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and m.min_val == 0.0 and m.max_val > 0)


def _is_conv(m) -> bool:
    return type(m) is nn.Conv2d or type(m) is nn.Linear


def _find_pairs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, list[fx.Node]]]:
    """(producer node, consumer node, relu6 nodes on the path) for every equalizable chain."""
    mods = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_conv(mods[node.target]):
            continue
        prod = mods[node.target]
        if isinstance(prod, nn.Conv2d) and prod.groups != 1 and prod.groups != prod.out_channels:
            continue
        cur, clips, flattened = node, [], False
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if nxt.args[0] is not cur:  # the chain must carry the tensor as the op's main input
                break
            if nxt.op == "call_module":
                m = mods[nxt.target]
                if _is_conv(m):
                    ok = (isinstance(m, nn.Linear) and flattened and m.in_features == _out_ch(prod)) or (
                        isinstance(m, nn.Conv2d) and not flattened and m.in_channels == _out_ch(prod)
                        and m.groups in (1, m.in_channels))
                    if ok:
                        pairs.append((node, nxt, clips))
                    break
                if _is_relu6(m):
                    clips.append(nxt)
                elif not isinstance(m, _HOMOGENEOUS_MODULES):
                    break
            elif nxt.op == "call_function" and nxt.target in _HOMOGENEOUS_FUNCS:
                if nxt.target is nn.functional.pad and any(
                        v not in (None, "constant", 0, 0.0) for v in list(nxt.args[2:]) + list(nxt.kwargs.values())):
                    break
            elif nxt.op == "call_function" and nxt.target in _FLATTEN:
                flattened = True
            elif nxt.op == "call_function" and nxt.target in (nn.functional.relu6, nn.functional.hardtanh):
                break
            else:
                break
            cur = nxt
    return pairs


def _out_ch(m) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _channel_ranges(gm: fx.GraphModule, pairs, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel abs max of every consumer's input over ``batches`` (keyed by consumer target)."""
    mods = dict(gm.named_modules())
    ranges: dict[str, torch.Tensor] = {}
    hooks = []

    def make(name):
        def pre(_m, args):
            x = args[0].detach()
            r = x.abs().amax(dim=[d for d in range(x.dim()) if d != 1]).float()
            ranges[name] = r if name not in ranges else torch.maximum(ranges[name], r)
        return pre

    for _, cons, _ in pairs:
        hooks.append(mods[cons.target].register_forward_pre_hook(make(cons.target)))
    try:
        with torch.no_grad():
            for x in batches:
                gm(x)
    finally:
        for h in hooks:
            h.remove()
    return ranges


def _scales(a: torch.Tensor, cons: nn.Module) -> tuple[torch.Tensor, str]:
    w = cons.weight.detach().abs()
    depthwise = isinstance(cons, nn.Conv2d) and cons.groups == cons.in_channels and cons.groups > 1
    if depthwise:
        s, kind = a.clone(), "depthwise"
    else:
        wc = w.transpose(0, 1).reshape(w.shape[1], -1).amax(dim=1)
        s, kind = torch.sqrt(a / wc.clamp_min(1e-12)), "dense"
    pos = s[s > 0]
    g = math.exp(pos.log().mean().item()) if pos.numel() else 1.0
    s = torch.where(s > 0, s, torch.full_like(s, g))
    return s.clamp(g / _SCALE_CLIP, g * _SCALE_CLIP).double(), kind


def equalize(model: nn.Module, batches: list[torch.Tensor]) -> tuple[nn.Module, list[EqualizePair], list[str]]:
    """Return (equalized copy as a GraphModule, pairs, notes). ``model`` itself is not modified.

    ``batches``: calibration inputs for the per-channel activation ranges (a few images suffice).
    A model torch.fx cannot trace is returned unchanged with a note (nothing is dropped silently).
    """
    import copy

    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        return model, [], [f"equalization skipped: torch.fx cannot trace {type(model).__name__} "
                           f"({type(exc).__name__})"]
    gm = fx.GraphModule(copy.deepcopy(model), graph, type(model).__name__)
    for attr in ("default_input_size",):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    pairs = _find_pairs(gm)
    if not pairs:
        return model, [], ["equalization found no conv -> positive-homogeneous -> conv pairs"]
    ranges = _channel_ranges(gm, pairs, batches)
    mods = dict(gm.named_modules())
    done: list[EqualizePair] = []
    n_clip = 0
    for prod_node, cons_node, clips in pairs:
        prod, cons = mods[prod_node.target], mods[cons_node.target]
        s, kind = _scales(ranges[cons_node.target].double(), cons)
        with torch.no_grad():
            shape_p = [-1] + [1] * (prod.weight.dim() - 1)
            prod.weight.copy_((prod.weight.double() / s.reshape(shape_p)).to(prod.weight.dtype))
            if prod.bias is not None:
                prod.bias.copy_((prod.bias.double() / s).to(prod.bias.dtype))
            if kind == "depthwise":
                cons.weight.copy_((cons.weight.double() * s.reshape(shape_p)).to(cons.weight.dtype))
            else:
                shape_c = [1, -1] + [1] * (cons.weight.dim() - 2)
                cons.weight.copy_((cons.weight.double() * s.reshape(shape_c)).to(cons.weight.dtype))
        pair = EqualizePair(prod_node.target, cons_node.target, kind, scale_min=float(s.min()),
                            scale_max=float(s.max()))
        for clip in clips:
            m = mods[clip.target]
            top = 6.0 if isinstance(m, nn.ReLU6) else float(m.max_val)
            name = f"qk_clip_{n_clip}"
            n_clip += 1
            gm.add_submodule(name, ChannelClip((top / s).float()))
            with gm.graph.inserting_before(clip):
                new = gm.graph.call_module(name, (clip.args[0],))
            clip.replace_all_uses_with(new)
            gm.graph.erase_node(clip)
            pair.clip_nodes.append(name)
        done.append(pair)
    gm.graph.lint()
    gm.recompile()
    return gm, done, [f"equalized {len(done)} conv pair(s) ({sum(p.kind == 'depthwise' for p in done)} into "
                      f"depthwise convs), {n_clip} ReLU6 -> per-channel clip"]
