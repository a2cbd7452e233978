"""The zoo's architectures: how each is built from its library without downloaded weights (benchmarks/zoo.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class Arch:
    """name, defining library, square input size (px), builder; ``finalize`` runs after BatchNorm
    re-estimation (deploy-form fusion the library offers, e.g. RepVGG reparameterization)."""

    name: str
    library: str
    size: int
    build: Callable[[], nn.Module]
    finalize: Callable[[nn.Module], nn.Module] | None = None
    imagenet_norm: bool = True


def _tv(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None)
    return build


class DetectorHeads(nn.Module):
    """torchvision detector without its post-processing: backbone (+FPN) -> head, raw tensors out.

    What a deployment exports (decode and NMS go to the engine or the host): a traceable graph.
    """

    def __init__(self, det: nn.Module):
        super().__init__()
        self.backbone, self.head = det.backbone, det.head

    def forward(self, x):
        feats = list(self.backbone(x).values())
        out = self.head(feats)
        return tuple(out[k] for k in sorted(out))


def _tv_det(name: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return DetectorHeads(torchvision.models.get_model(name, weights=None, weights_backbone=None, **kw))
    return build


def _ultralytics(cfg: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from ultralytics.nn.tasks import DetectionModel

        m = DetectionModel(cfg, nc=80, verbose=False)
        m.model[-1].export = True  # Detect returns the decoded [B, 4+nc, A] tensor, as `yolo export` does
        m.model[-1].format = "onnx"
        return m
    return build


def _ultra_fuse(m: nn.Module) -> nn.Module:
    return m.fuse(verbose=False)


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)
    return build


def _timm_reparam(m: nn.Module) -> nn.Module:
    from timm.utils.model import reparameterize_model

    return reparameterize_model(m)


ARCHS: tuple[Arch, ...] = (
    Arch("resnet18", "torchvision", 160, _tv("resnet18")),
    Arch("mobilenet_v2", "torchvision", 160, _tv("mobilenet_v2")),
    Arch("mobilenet_v3_small", "torchvision", 160, _tv("mobilenet_v3_small")),
    Arch("efficientnet_b0", "torchvision", 160, _tv("efficientnet_b0")),
    Arch("regnet_y_400mf", "torchvision", 160, _tv("regnet_y_400mf")),
    Arch("shufflenet_v2_x1_0", "torchvision", 160, _tv("shufflenet_v2_x1_0")),
    Arch("squeezenet1_1", "torchvision", 160, _tv("squeezenet1_1")),
    Arch("convnext_tiny", "torchvision", 128, _tv("convnext_tiny")),
    Arch("ssdlite320_mobilenet_v3_large (heads)", "torchvision", 320, _tv_det("ssdlite320_mobilenet_v3_large")),
    Arch("retinanet_resnet50_fpn (heads)", "torchvision", 256, _tv_det("retinanet_resnet50_fpn")),
    Arch("fcos_resnet50_fpn (heads)", "torchvision", 256, _tv_det("fcos_resnet50_fpn")),
    Arch("yolov8n", "ultralytics", 320, _ultralytics("yolov8n.yaml"), _ultra_fuse, imagenet_norm=False),
    Arch("yolo11n", "ultralytics", 320, _ultralytics("yolo11n.yaml"), _ultra_fuse, imagenet_norm=False),
    Arch("repvgg_a0 (YOLOv6-style RepVGG, deploy form)", "timm", 160, _timm("repvgg_a0"), _timm_reparam),
    Arch("mobilevit_xxs", "timm", 160, _timm("mobilevit_xxs")),
)
