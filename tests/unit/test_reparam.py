"""QA-RepVGG fusion and Conv+BN folding: the fused model must compute what the unfused one computes.

The oracle is the unfused module itself (separate branches, BatchNorm in eval mode) evaluated in float64;
fused outputs must agree to <= 1e-5 relative error ||a - b|| / ||a||.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from quantkit.errors import ModelError
from quantkit.models.ops import Add
from quantkit.models.qarepvgg import QARepVGGBlock
from quantkit.models.yolo_nas_blocks import Conv
from quantkit.reparam.fuse import (
    CONV_BN_BLOCKS,
    find_unfused_batchnorms,
    fold_conv_bn,
    register_conv_bn_block,
    reparameterize,
)

REL_TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / a.detach().norm())


def randomize_bn(model: nn.Module, seed: int = 0, steps: int = 3, in_shape=(4, 4, 9, 9)) -> nn.Module:
    """Random affine BN params, then a few train-mode forwards on shifted/scaled data to move running stats."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.5
            if m.weight is not None:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=m.weight.dtype) * 1.5 + 0.25)
                    m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=m.bias.dtype))
    model.train()
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(*in_shape, generator=g, dtype=dtype) * 2.0 + 0.5)
    return model.eval()


BLOCK_CASES = [
    c
    for c in itertools.product([False, True], [False, True], [False, True], [False, True], [1, 2], [1, 2])
    if not (c[0] and c[4] == 2)  # the identity branch needs stride 1
]


@pytest.mark.parametrize("full", [False, True], ids=["partial", "full"])
@pytest.mark.parametrize("residual,alpha,bias1x1,post_bn,stride,groups", BLOCK_CASES)
def test_qarepvgg_fusion_matches_branches(residual, alpha, bias1x1, post_bn, stride, groups, full):
    torch.manual_seed(hash((residual, alpha, bias1x1, post_bn, stride, groups)) % 1000)
    block = QARepVGGBlock(
        4, 4, stride=stride, groups=groups, use_residual_connection=residual, use_alpha=alpha,
        use_1x1_bias=bias1x1, use_post_bn=post_bn,
    ).double()
    if alpha:
        with torch.no_grad():
            block.alpha.fill_(0.7)
    randomize_bn(block)
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        ref = block(x)
        fused = reparameterize(block, full_fusion=full)
        out = fused(x)
    side = 9 if stride == 1 else 5
    assert out.shape == ref.shape == (3, 4, side, side)
    assert rel_err(ref, out) <= REL_TOL
    assert not block.deploy  # the input model is left untouched
    keys = set(fused.state_dict())
    expected = {"rbr_reparam.weight", "rbr_reparam.bias"}
    if post_bn and not full:
        expected |= {f"post_bn.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert keys == expected
    assert fused.fully_fused == full and fused.partially_fused == (not full)


@pytest.mark.parametrize("full", [False, True], ids=["partial", "full"])
def test_dilated_block_fuses(full):
    torch.manual_seed(7)
    block = randomize_bn(QARepVGGBlock(4, 4, dilation=2, use_alpha=True).double())
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        ref = block(x)
        assert ref.shape == x.shape
        assert rel_err(ref, reparameterize(block, full_fusion=full)(x)) <= REL_TOL


def test_fusion_in_float32_is_close_to_float64_oracle():
    torch.manual_seed(0)
    block64 = randomize_bn(QARepVGGBlock(8, 8, use_alpha=True).double(), in_shape=(4, 8, 9, 9))
    block32 = QARepVGGBlock(8, 8, use_alpha=True)
    block32.load_state_dict({k: v.float() for k, v in block64.state_dict().items()})
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        out = reparameterize(block32)(x.float()).double()
        assert rel_err(block64(x), out) <= 1e-5


def test_unfused_state_dict_keys_match_super_gradients():
    # Recorded from super-gradients 3.7.1 QARepVGGBlock(8, 8, use_alpha=True) (all options on).
    sg_keys = [
        "alpha", "branch_3x3.conv.weight", "branch_3x3.bn.weight", "branch_3x3.bn.bias",
        "branch_3x3.bn.running_mean", "branch_3x3.bn.running_var", "branch_3x3.bn.num_batches_tracked",
        "branch_1x1.weight", "branch_1x1.bias", "post_bn.weight", "post_bn.bias", "post_bn.running_mean",
        "post_bn.running_var", "post_bn.num_batches_tracked", "rbr_reparam.weight", "rbr_reparam.bias",
    ]
    block = QARepVGGBlock(8, 8, use_alpha=True)
    assert list(block.state_dict()) == sg_keys
    assert block.state_dict()["rbr_reparam.weight"].shape == (8, 8, 3, 3)
    plain = QARepVGGBlock(8, 16, stride=2, groups=2, use_residual_connection=False, use_1x1_bias=False, use_post_bn=False)
    assert set(plain.state_dict()) == {k for k in sg_keys if not k.startswith(("alpha", "post_bn", "branch_1x1.bias"))}
    assert plain.state_dict()["branch_1x1.weight"].shape == (16, 4, 1, 1)


def test_block_option_errors_and_deploy_constructor():
    with pytest.raises(ModelError, match="use_residual_connection=False"):
        QARepVGGBlock(4, 8)
    with pytest.raises(ModelError, match="stride 1"):
        QARepVGGBlock(4, 4, stride=2)
    torch.manual_seed(1)
    trained = randomize_bn(QARepVGGBlock(4, 4).double())
    trained.full_fusion()
    with pytest.raises(ModelError, match="fully fused"):
        trained.partial_fusion()
    deployed = QARepVGGBlock(4, 4, deploy=True).double()
    assert set(deployed.state_dict()) == {"rbr_reparam.weight", "rbr_reparam.bias"}
    deployed.load_state_dict(trained.state_dict())
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    assert torch.equal(deployed(x), trained(x))


def _check_fold(model: nn.Module, x: torch.Tensor, *, expect_unfused: list[str]) -> nn.Module:
    randomize_bn(model, in_shape=tuple(x.shape))
    with torch.no_grad():
        ref = model(x)
        fused = reparameterize(model)
        out = fused(x)
    assert rel_err(ref, out) <= REL_TOL
    assert find_unfused_batchnorms(fused) == expect_unfused
    return fused


def test_sequential_conv_bn_including_depthwise_grouped_and_transposed():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8),  # depthwise, with bias
        nn.Conv2d(8, 8, 1, groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), nn.BatchNorm2d(6),
        nn.ConvTranspose2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
    ).double()
    fused = _check_fold(model, torch.randn(2, 4, 7, 7, dtype=torch.float64), expect_unfused=[])
    assert sum(isinstance(m, nn.Identity) for m in fused) == 5
    assert fused[0].bias is not None and "1.weight" not in fused.state_dict()
    assert "1.weight" in model.state_dict()  # original untouched


def test_attribute_blocks_need_registration():
    class TrapBlock(nn.Module):  # has conv + bn attributes but bn does NOT directly follow conv alone
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(4, 4, 1)
            self.b = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.b(self.c(x)))

    torch.manual_seed(3)
    model = nn.Sequential(Conv(4, 4, 3, 1), TrapBlock(), Custom()).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    fused = _check_fold(model, x, expect_unfused=["1.bn"])  # Conv via registry, Custom via fx, trap kept
    assert isinstance(fused[0].bn, nn.Identity) and isinstance(fused[2].b, nn.Identity)

    # Registered explicitly, a block is folded even inside a model that fx cannot trace.
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Custom()

        def forward(self, x):
            return self.inner(x) if x.sum() > 0 else x

    assert Custom not in CONV_BN_BLOCKS
    try:
        register_conv_bn_block(Custom, "c", "b")
        fused = _check_fold(Gate().double(), x.abs(), expect_unfused=[])
        assert isinstance(fused.inner.b, nn.Identity)
    finally:
        CONV_BN_BLOCKS.pop(Custom, None)
    _check_fold(Gate().double(), x.abs(), expect_unfused=["inner.b"])


def test_fx_folds_arbitrary_forward_and_leaves_untraceable_models_alone():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.norm_a = nn.BatchNorm2d(4)
            self.conv_b = nn.Conv2d(4, 4, 1)
            self.norm_b = nn.BatchNorm2d(4)
            self.add = Add()

        def forward(self, x):
            y = torch.relu(self.norm_a(self.conv_a(x)))
            return self.add(self.norm_b(self.conv_b(y)), x)

    class DataDependent(Residual):
        def forward(self, x):
            if x.sum() > 0:  # fx cannot trace data-dependent control flow
                return super().forward(x)
            return x

    torch.manual_seed(4)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64) + 0.1
    fused = _check_fold(Residual().double(), x, expect_unfused=[])
    assert fused.conv_a.bias is not None and fused.conv_b.bias is not None
    untraced = _check_fold(DataDependent().double(), x.abs(), expect_unfused=["norm_a", "norm_b"])
    assert untraced.conv_a.bias is None


def test_partial_fusion_keeps_post_bn_and_fx_does_not_refold_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = QARepVGGBlock(4, 4)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.block(x)) * 2

    torch.manual_seed(5)
    fused = _check_fold(Net().double(), torch.randn(2, 4, 8, 8, dtype=torch.float64), expect_unfused=[])
    model = randomize_bn(Net().double())
    partial = reparameterize(model, full_fusion=False)
    assert find_unfused_batchnorms(partial) == ["block.post_bn"]
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    assert rel_err(model(x), partial(x)) <= REL_TOL
    assert fused.block.fully_fused


def test_bn_without_running_stats_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert find_unfused_batchnorms(reparameterize(model)) == ["1"]
    conv, bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ModelError, match="track_running_stats"):
        fold_conv_bn(conv, bn)
