"""YOLO-NAS S/M/L: layout against super-gradients 3.7.1 figures, decode against closed forms, reparam parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from quantkit.errors import ModelError
from quantkit.models.qarepvgg import QARepVGGBlock
from quantkit.models.yolo_nas import StageSpec, YoloNAS, YoloNASArch, yolo_nas_l, yolo_nas_m, yolo_nas_s
from quantkit.reparam.fuse import find_unfused_batchnorms, fuse_qarepvgg_blocks, reparameterize

# From /work/shared/YOLO_NAS.md (counted on models that super-gradients 3.7.1 builds), not from our code.
COUNTS = {
    # name: (raw params, partial params, full params, raw / partial / full state_dict entries, blocks s2, s1)
    "s": (yolo_nas_s, 19_053_888, 12_184_240, 12_175_888, (921, 625, 440), (5, 32), 20),
    "m": (yolo_nas_m, 51_182_658, 31_922_098, 31_906_578, (965, 653, 458), (5, 34), 22),
    "l": (yolo_nas_l, 66_976_392, 42_017_784, 41_999_192, (1097, 737, 512), (5, 40), 28),
}

# Shapes derived by hand from super-gradients' source (yolo_stages.py, panneck.py, dfl_heads.py, the
# yolo_nas_{s,m,l}_arch_params.yaml recipes): conv3 inputs = hidden * (2 + concat * n), etc.
KEY_SHAPES = {
    "s": {
        "backbone.stem.conv.branch_3x3.conv.weight": (48, 3, 3, 3),
        "backbone.stage1.blocks.conv3.conv.weight": (96, 64, 1, 1),
        "backbone.stage2.blocks.bottlenecks.0.alpha": (1,),
        "backbone.stage3.blocks.bottlenecks.4.cv2.rbr_reparam.weight": (96, 96, 3, 3),
        "backbone.context_module.cv2.conv.weight": (768, 1536, 1, 1),
        "neck.neck1.upsample.weight": (192, 192, 2, 2),
        "neck.neck1.upsample.bias": (192,),
        "neck.neck1.reduce_after_concat.conv.weight": (192, 576, 1, 1),
        "neck.neck2.reduce_skip2.conv.weight": (96, 96, 1, 1),
        "neck.neck3.conv.conv.weight": (96, 96, 3, 3),
        "neck.neck3.blocks.conv1.conv.weight": (64, 192, 1, 1),
        "neck.neck4.blocks.bottlenecks.1.cv1.conv.weight": (64, 64, 3, 3),
        "heads.head1.stem.seq.conv.weight": (64, 96, 1, 1),
        "heads.head1.cls_convs.0.seq.bn.running_var": (64,),
        "heads.head2.reg_pred.weight": (68, 128, 1, 1),
        "heads.head3.cls_pred.weight": (80, 256, 1, 1),
    },
    "m": {
        "backbone.stage1.blocks.conv3.conv.weight": (96, 256, 1, 1),
        "backbone.stage3.blocks.conv3.conv.weight": (384, 1792, 1, 1),
        "backbone.stage4.blocks.conv3.conv.weight": (768, 768, 1, 1),
        "neck.neck4.conv.conv.weight": (192, 192, 3, 3),
        "neck.neck4.blocks.conv1.conv.weight": (256, 384, 1, 1),
        "neck.neck4.blocks.bottlenecks.2.cv2.conv.weight": (256, 256, 3, 3),
        "heads.head1.stem.seq.conv.weight": (96, 96, 1, 1),
        "heads.head3.reg_pred.weight": (68, 384, 1, 1),
    },
    "l": {
        "backbone.stage4.blocks.conv3.conv.weight": (768, 2048, 1, 1),
        "neck.neck2.blocks.bottlenecks.3.cv1.branch_1x1.bias": (128,),
        "neck.neck1.blocks.conv3.conv.weight": (192, 256, 1, 1),
        "heads.head1.stem.seq.conv.weight": (128, 96, 1, 1),
        "heads.head3.cls_convs.0.seq.conv.weight": (512, 512, 3, 3),
    },
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("size", ["s", "m", "l"])
def test_layout_and_counts_match_super_gradients(size):
    factory, raw, partial, full, entries, blocks, alphas = COUNTS[size]
    model = factory().eval()
    sd = model.state_dict()
    assert n_params(model) == raw and len(sd) == entries[0]
    for key, shape in KEY_SHAPES[size].items():
        assert tuple(sd[key].shape) == shape, key
    qa = [m for m in model.modules() if isinstance(m, QARepVGGBlock)]
    assert (sum(m.stride == 2 for m in qa), sum(m.use_residual_connection for m in qa)) == blocks
    assert sum(k.endswith(".alpha") for k in sd) == alphas
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.eps == 1e-3 and m.momentum == 0.03 for m in bns)
    assert model.default_input_size == (640, 640)
    fuse_qarepvgg_blocks(model, full_fusion=False)
    assert (n_params(model), len(model.state_dict())) == (partial, entries[1])
    fuse_qarepvgg_blocks(model, full_fusion=True)
    assert (n_params(model), len(model.state_dict())) == (full, entries[2])


def test_num_classes_changes_only_cls_pred():
    model = yolo_nas_s(num_classes=3)
    # cls_pred: (inter + 1) * C per level, inter = 64 / 128 / 256 for S
    assert COUNTS["s"][1] - n_params(model) == (80 - 3) * (65 + 129 + 257)
    assert model.heads.head2.cls_pred.out_channels == 3
    for i in (1, 2, 3):
        bias = getattr(model.heads, f"head{i}").cls_pred.bias
        assert torch.allclose(bias, torch.full_like(bias, -math.log(99)))
    with pytest.raises(ModelError, match="num_classes"):
        yolo_nas_s(num_classes=0)


def test_forward_shapes_and_train_structure_320():
    torch.manual_seed(0)
    model = yolo_nas_s(num_classes=5).train()
    for m in model.modules():  # deterministic BN so train and eval modes must agree exactly
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    small = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        (tb_small, ts_small), _ = model(small)
        (boxes, scores), (cls_logits, reg_distri, anchors, points_px, counts, stride_t) = model(torch.rand(1, 3, 320, 320))
        model.eval()
        eb_small, es_small = model(small)
    torch.testing.assert_close(eb_small, tb_small)
    torch.testing.assert_close(es_small, ts_small)
    assert boxes.shape == (1, 2100, 4) and scores.shape == (1, 2100, 5)
    assert counts == [1600, 400, 100]
    assert cls_logits.shape == (1, 2100, 5) and reg_distri.shape == (1, 2100, 68)
    assert anchors.shape == (2100, 4) and points_px.shape == (2100, 2) and stride_t.shape == (2100, 1)
    torch.testing.assert_close(scores, torch.sigmoid(cls_logits))

    # Independent numpy decode of the raw outputs: DFL expectation, closed-form anchors.
    strides = np.concatenate([np.full(n, s) for n, s in zip(counts, (8, 16, 32))])
    grid_w = np.concatenate([np.full(n, 320 // s) for n, s in zip(counts, (8, 16, 32))])
    local = np.concatenate([np.arange(n) for n in counts])
    px = np.stack([(local % grid_w + 0.5) * strides, (local // grid_w + 0.5) * strides], 1)
    np.testing.assert_allclose(points_px.numpy(), px)
    np.testing.assert_allclose(anchors.numpy(), np.concatenate([px - 2.5 * strides[:, None], px + 2.5 * strides[:, None]], 1))
    np.testing.assert_array_equal(stride_t.numpy()[:, 0], strides)
    logits = reg_distri[0].double().numpy().reshape(2100, 4, 17)
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    dist = (prob / prob.sum(-1, keepdims=True)) @ np.arange(17.0)  # [A, 4] ltrb in grid units
    ref = np.concatenate([px - dist[:, :2] * strides[:, None], px + dist[:, 2:] * strides[:, None]], 1)
    np.testing.assert_allclose(boxes[0].numpy(), ref, rtol=1e-5, atol=1e-3)


def test_uniform_dfl_gives_closed_form_boxes():
    model = yolo_nas_s(num_classes=2).eval()
    for i in (1, 2, 3):
        head = getattr(model.heads, f"head{i}")
        nn.init.zeros_(head.reg_pred.weight), nn.init.zeros_(head.reg_pred.bias), nn.init.zeros_(head.cls_pred.weight)
    with torch.no_grad():
        boxes, scores = model(torch.rand(2, 3, 64, 96))
    assert boxes.shape == (2, 96 + 24 + 6, 4)  # 64x96 input: 8x12, 4x6, 2x3 cells, stride 8 first
    # uniform bins -> expected distance 8 grid cells per side -> boxes of side 16 * stride
    side = torch.cat([torch.full((96,), 128.0), torch.full((24,), 256.0), torch.full((6,), 512.0)])
    torch.testing.assert_close(boxes[0, :, 2] - boxes[0, :, 0], side)
    torch.testing.assert_close(boxes[1, :, 3] - boxes[1, :, 1], side)
    torch.testing.assert_close(boxes[0, 0], torch.tensor([4.0 - 64, 4.0 - 64, 4.0 + 64, 4.0 + 64]))
    torch.testing.assert_close(scores, torch.full_like(scores, 0.01))


def test_reparameterized_s_matches_raw():
    torch.manual_seed(0)
    model = yolo_nas_s(num_classes=4)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0  # running stats := stats of the batch below
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 128, 128, generator=g))
    model.eval()
    x = torch.rand(2, 3, 128, 128, generator=g)
    with torch.no_grad():
        ref_boxes, ref_scores = model(x)
        for full in (False, True):
            fused = reparameterize(model, full_fusion=full)
            boxes, scores = fused(x)
            assert rel_err(ref_boxes, boxes) <= 1e-4 and rel_err(ref_scores, scores) <= 1e-4
            unfused = find_unfused_batchnorms(fused)
            assert len(unfused) == (0 if full else 37) and all(n.endswith("post_bn") for n in unfused)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 100  # input model untouched


def test_scaled_down_arch_builds_and_runs():
    tiny = YoloNASArch(
        name="tiny",
        stem_channels=8,
        stages=(StageSpec(16, 1, 8), StageSpec(32, 1, 8, True), StageSpec(48, 1, 16), StageSpec(64, 1, 16)),
        context_channels=64,
        neck=(StageSpec(32, 1, 16), StageSpec(16, 1, 8), StageSpec(32, 1, 16), StageSpec(64, 1, 16)),
        head_width_mult=0.125,
        default_input_size=(320, 320),
    )
    model = YoloNAS(tiny, num_classes=1).eval()
    assert model.default_input_size == (320, 320)
    with torch.no_grad():
        boxes, scores = model(torch.rand(1, 3, 64, 64))
    assert boxes.shape == (1, 64 + 16 + 4, 4) and scores.shape == (1, 84, 1)
    with pytest.raises(ModelError, match="4 backbone stages"):
        YoloNAS(YoloNASArch(name="bad", stages=tiny.stages[:3], neck=tiny.neck, head_width_mult=1.0))
