"""Reparameterization: QA-RepVGG branch fusion and Conv+BatchNorm folding (torch -> torch).

:func:`reparameterize` returns a deep-copied eval-mode model in deploy form:

1. every :class:`~quantkit.models.qarepvgg.QARepVGGBlock` is fused (partial: post-BN kept, or full);
2. Conv2d/ConvTranspose2d + BatchNorm2d pairs are folded into the conv (a bias is added) and the BN is
   replaced by ``nn.Identity`` (so the other state_dict keys keep their names). Pairs are found
   (a) adjacent in a plain ``nn.Sequential``,
   (b) as the ``conv``/``bn`` attributes of block classes *declared* in :data:`CONV_BN_BLOCKS` (their forward
       must be ``act(bn(conv(x)))``; we never guess from attribute names alone),
   (c) in any other model through ``torch.fx``: a BN node whose only input is a conv node that feeds nothing
       else. If fx cannot trace the model, the remaining BNs are left alone and reported by
       :func:`find_unfused_batchnorms`.

Folding uses the BN running statistics, so call it on a model whose statistics are final.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Iterator

import torch
from torch import nn

from quantkit.models.qarepvgg import QARepVGGBlock, bn_scale_shift
from quantkit.models.yolo_nas_blocks import Conv

log = logging.getLogger(__name__)

_ConvLike = (nn.Conv2d, nn.ConvTranspose2d)

#: Block classes whose forward is ``act(bn(conv(x)))`` -> (conv attribute, bn attribute).
CONV_BN_BLOCKS: dict[type[nn.Module], tuple[str, str]] = {Conv: ("conv", "bn")}


def register_conv_bn_block(cls: type[nn.Module], conv_attr: str = "conv", bn_attr: str = "bn") -> type[nn.Module]:
    """Declare that ``cls.forward`` applies ``bn_attr`` directly to the output of ``conv_attr`` and uses that
    conv output nowhere else, so the pair may be folded. Usable as a class decorator."""
    CONV_BN_BLOCKS[cls] = (conv_attr, bn_attr)
    return cls


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(conv, _ConvLike) or not isinstance(bn, nn.BatchNorm2d):
        return False
    if bn.running_mean is None or bn.running_var is None:  # track_running_stats=False: eval uses batch stats
        return False
    return bn.num_features == conv.out_channels


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode ``bn`` into ``conv`` in place (weight rescaled per output channel, bias created or updated).

    Handles grouped/depthwise Conv2d and (grouped) ConvTranspose2d, whose weight is [in, out/groups, kh, kw].
    """
    scale, shift = bn_scale_shift(bn)
    w = conv.weight.detach().double()
    if isinstance(conv, nn.ConvTranspose2d):
        g = conv.groups
        shape = w.shape
        w = w.reshape(g, shape[0] // g, shape[1], *shape[2:]) * scale.reshape(g, 1, shape[1], *([1] * (len(shape) - 2)))
        w = w.reshape(shape)
    else:
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b = shift if conv.bias is None else conv.bias.detach().double() * scale + shift
    dtype, device = conv.weight.dtype, conv.weight.device
    requires_grad = conv.weight.requires_grad
    conv.weight = nn.Parameter(w.to(dtype=dtype, device=device), requires_grad=requires_grad)
    conv.bias = nn.Parameter(b.to(dtype=dtype, device=device), requires_grad=requires_grad)


def fuse_qarepvgg_blocks(model: nn.Module, *, full_fusion: bool = True) -> int:
    """Fuse every QARepVGGBlock of ``model`` in place; returns how many were fused now."""
    count = 0
    for module in model.modules():
        if isinstance(module, QARepVGGBlock):
            if full_fusion and not module.fully_fused:
                module.full_fusion()
                count += 1
            elif not full_fusion and not module.deploy:
                module.partial_fusion()
                count += 1
    return count


def _alias_counts(model: nn.Module) -> Counter:
    return Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))


def _fold_sequentials(model: nn.Module, aliases: Counter) -> int:
    count = 0
    for module in list(model.modules()):
        if type(module) is not nn.Sequential:  # subclasses may expose intermediates (e.g. the CSP bottlenecks)
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if _foldable(conv, bn) and aliases[id(conv)] == 1 and aliases[id(bn)] == 1:
                fold_conv_bn(conv, bn)
                module._modules[second] = nn.Identity()
                count += 1
    return count


def _fold_registered_blocks(model: nn.Module, aliases: Counter) -> int:
    count = 0
    for module in list(model.modules()):
        attrs = CONV_BN_BLOCKS.get(type(module))
        if attrs is None:
            continue
        conv, bn = getattr(module, attrs[0], None), getattr(module, attrs[1], None)
        if _foldable(conv, bn) and aliases[id(conv)] == 1 and aliases[id(bn)] == 1:
            fold_conv_bn(conv, bn)
            setattr(module, attrs[1], nn.Identity())
            count += 1
    return count


def _remaining_candidates(model: nn.Module) -> list[str]:
    """BN names outside QA-RepVGG blocks (whose post_bn is kept on purpose by partial fusion)."""
    inside = {id(m) for blk in model.modules() if isinstance(blk, QARepVGGBlock) for m in blk.modules()}
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in inside]


class _LeafTracer(torch.fx.Tracer):
    """Keeps QA-RepVGG and registered blocks opaque, so fx never refolds a deliberately kept post_bn."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # a conv subclass (a "same"-padding Conv2d) is opaque too: traced through, its conv is no module call and
        # the BN after it would stay unfolded
        return (isinstance(m, (QARepVGGBlock, *_ConvLike)) or type(m) in CONV_BN_BLOCKS
                or super().is_leaf_module(m, qualname))


def _fold_with_fx(model: nn.Module, aliases: Counter) -> int:
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError ...)
        log.info("torch.fx could not trace %s (%s); its remaining BatchNorms stay unfused", type(model).__name__, exc)
        return 0
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    count = 0
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn, src = modules.get(node.target), node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv = modules.get(src.target)
        if not _foldable(conv, bn) or calls[node.target] != 1 or calls[src.target] != 1:
            continue
        if aliases[id(conv)] != 1 or aliases[id(bn)] != 1:
            continue
        fold_conv_bn(conv, bn)
        parent_name, _, child = node.target.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
        count += 1
    return count


def reparameterize(model: nn.Module, *, full_fusion: bool = True) -> nn.Module:
    """Deep-copy ``model``, set it to eval mode and convert it to deploy form (see the module docstring).

    Args:
        model: any nn.Module; it is not modified.
        full_fusion: fold the QA-RepVGG post-BN too (True) or keep it (False, super-gradients' export form).

    Returns:
        The fused copy. Outputs match the input model in eval mode to float rounding (~1e-6 relative in fp32).
    """
    fused = copy.deepcopy(model).eval()
    n_blocks = fuse_qarepvgg_blocks(fused, full_fusion=full_fusion)
    aliases = _alias_counts(fused)
    n_pairs = _fold_sequentials(fused, aliases) + _fold_registered_blocks(fused, aliases)
    if _remaining_candidates(fused):
        n_pairs += _fold_with_fx(fused, _alias_counts(fused))
    log.debug("reparameterize: fused %d QA-RepVGG blocks and %d Conv+BN pairs", n_blocks, n_pairs)
    return fused


def find_unfused_batchnorms(model: nn.Module) -> list[str]:
    """Qualified names of BatchNorm modules still present (partial-fusion post-BNs included), for the report."""
    return [name for name, m in _iter_batchnorms(model)]


def _iter_batchnorms(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            yield name, m
