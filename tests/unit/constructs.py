"""Small torch-only replicas of what third-party architectures do, for the export conformance tests.

Each is a few channels wide and runs at 32x32 in milliseconds; together they cover the constructs of
torchvision's classifiers and detection heads, Ultralytics YOLOv8 and ConvNeXt (issue 13).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin: int, cout: int, k: int = 3, s: int = 1, g: int = 1, act: type[nn.Module] = nn.ReLU6) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout), act())


class InvertedResidual(nn.Module):
    """MobileNetV2: expand, depthwise, project; ``x + self.conv(x)`` when shapes allow."""

    def __init__(self, c: int, expand: int = 4):
        super().__init__()
        h = c * expand
        self.conv = nn.Sequential(cbr(c, h, 1), cbr(h, h, 3, g=h), nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.conv(x)


class TinyMobileNetV2(nn.Module):
    """Chained functional residuals (the KeyError of issue 13, failure 1)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(cbr(3, 8, s=2), InvertedResidual(8), InvertedResidual(8), InvertedResidual(8))
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class BasicBlock(nn.Module):
    """ResNet: ``out += identity`` in place, downsample branch -> an add of two conv outputs."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        out += identity
        return torch.relu(out)


class SEBlock(nn.Module):
    """MobileNetV3: squeeze-excite gating (mul by hardsigmoid), hardswish, ``torch.add`` residual."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = cbr(c, c, 3, g=c, act=nn.Hardswish)
        self.fc1, self.fc2 = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)
        self.proj = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.dw(x)
        s = F.hardsigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return torch.add(x, self.proj(y * s))


class TinyResNetSE(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, s=2, act=nn.ReLU)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.se = SEBlock(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.se(self.layer1(self.stem(x))), 1), 1))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise 7x7, LayerNorm and an MLP of nn.Linear on a channels-last 4-D tensor, GELU."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, 4)
        self.blocks = nn.Sequential(ConvNeXtBlock(8), ConvNeXtBlock(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class SharedHeadFPN(nn.Module):
    """RetinaNet/FCOS: one head conv applied to every pyramid level; upsample + add top-down; tuple output."""

    def __init__(self, c: int = 8, anchors: int = 2):
        super().__init__()
        self.c3, self.c4 = cbr(3, c, s=2), cbr(c, c, s=2)
        self.lat3 = nn.Conv2d(c, c, 1)
        self.tower = nn.Conv2d(c, c, 3, padding=1)
        self.box = nn.Conv2d(c, 4 * anchors, 3, padding=1)
        self.cls = nn.Conv2d(c, 3 * anchors, 3, padding=1)

    def forward(self, x):
        p3 = self.c3(x)
        p4 = self.c4(p3)
        p3 = self.lat3(p3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        boxes, scores = [], []
        for p in (p3, p4):
            t = torch.relu(self.tower(p))
            boxes.append(self.box(t).flatten(2))
            scores.append(self.cls(t).flatten(2))
        return torch.cat(boxes, 2), torch.cat(scores, 2).sigmoid()


class C2f(nn.Module):
    """YOLOv8: split into halves (chunk), bottlenecks with residual adds, concat, SiLU."""

    def __init__(self, c: int, n: int = 2):
        super().__init__()
        self.cv1 = cbr(c, 2 * (c // 2), 1, act=nn.SiLU)
        h = c // 2
        self.m = nn.ModuleList(nn.Sequential(cbr(h, h, act=nn.SiLU), cbr(h, h, act=nn.SiLU)) for _ in range(n))
        self.cv2 = cbr((2 + n) * h, c, 1, act=nn.SiLU)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.cv2 = cbr(c, c // 2, 1, act=nn.SiLU), cbr(2 * c, c, 1, act=nn.SiLU)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.pool(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class TinyYOLOv8(nn.Module):
    """C2f + SPPF backbone, ConvTranspose upsample, GroupNorm, channel shuffle, a DFL-style box decode; dict out."""

    def __init__(self, reg_max: int = 4):
        super().__init__()
        self.reg_max = reg_max
        self.stem = cbr(3, 8, s=2, act=nn.SiLU)
        self.c2f = C2f(8)
        self.down = cbr(8, 16, s=2, act=nn.SiLU)
        self.sppf = SPPF(16)
        self.up = nn.ConvTranspose2d(16, 8, 2, 2)
        self.gn = nn.GroupNorm(2, 16)
        self.box = nn.Conv2d(16, 4 * reg_max, 1)
        self.cls = nn.Conv2d(16, 3, 1)
        self.register_buffer("proj", torch.arange(reg_max, dtype=torch.float32))

    def forward(self, x):
        a = self.c2f(self.stem(x))
        b = self.sppf(self.down(a))
        y = torch.cat([a, self.up(b)], 1)
        n, c, h, w = y.shape
        y = self.gn(y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w))  # channel shuffle
        dist = self.box(y).view(n, 4, self.reg_max, h * w).softmax(2)
        boxes = (dist * self.proj.view(1, 1, -1, 1)).sum(2)
        return {"boxes": boxes, "scores": self.cls(y).flatten(2).sigmoid()}


class DictToTuple(nn.Module):
    """Export wants tensors: a dict-returning model is wrapped the way a user would."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return tuple(out[k] for k in sorted(out))


def seeded(cls, *args, seed: int = 0, **kw) -> nn.Module:
    """Build ``cls`` with seeded weights and non-trivial BatchNorm statistics; eval mode."""
    torch.manual_seed(seed)
    m = cls(*args, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m.eval()
