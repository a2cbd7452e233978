"""The bundled detector: a scaled-down YOLO-NAS trained on real NEON aerial tree crowns.

It is the default model of ``quantkit export``, so the whole pipeline (reparam -> quant -> calibrate ->
export -> eval) runs on real weights and real data without any model hub:

* weights: ``quantkit/assets/tree_detector.pt`` (float32 state_dict, ~7.9 MB), trained by
  ``python benchmarks/train_trees.py`` on ``deepforest``'s training images (see that script for the measured
  held-out mAP);
* calibration images: ``calibration/trees/``; held-out COCO set: ``evaldata/trees_holdout/``.

The architecture is :class:`~quantkit.models.yolo_nas.YoloNAS` with the same skeleton as YOLO-NAS S (QA-RepVGG
blocks, CSP stages, SPP, PAN neck, DFL heads at strides 8/16/32) at roughly a quarter to a sixth of its
widths, one or two blocks per stage and ``reg_max`` 8, for 320x320 inputs (1 px = 10 cm on the ground).
"""

from __future__ import annotations

import importlib.resources
import io
import pickle

import torch

from quantkit.errors import ModelError, WeightsError
from quantkit.models.yolo_nas import StageSpec, YoloNAS, YoloNASArch

WEIGHTS_FILE = "tree_detector.pt"
INPUT_SIZE = (320, 320)  # (height, width) pixels
CLASS_NAMES = ("tree",)
TRAIN_COMMAND = "python benchmarks/train_trees.py"

TREE_DETECTOR_ARCH = YoloNASArch(
    name="tree_detector",
    stem_channels=24,
    stages=(StageSpec(48, 1, 24), StageSpec(96, 2, 32), StageSpec(112, 2, 48), StageSpec(128, 1, 48)),
    context_channels=128,
    neck=(StageSpec(96, 1, 32), StageSpec(48, 1, 24), StageSpec(96, 1, 32), StageSpec(128, 1, 32)),
    head_width_mult=0.5,
    head_inter_channels=(128, 160, 192),
    reg_max=8,
    default_input_size=INPUT_SIZE,
)


def weights_bytes() -> bytes:
    """Raw bytes of the shipped weights file; ModelError naming the training command if it is missing."""
    res = importlib.resources.files("quantkit").joinpath("assets", WEIGHTS_FILE)
    if not res.is_file():
        raise ModelError(f"bundled weights quantkit/assets/{WEIGHTS_FILE} are missing: regenerate them with "
                         f"`{TRAIN_COMMAND}` (or reinstall quantkit)")
    return res.read_bytes()


def tree_detector(num_classes: int = 1, pretrained: bool = True) -> YoloNAS:
    """The bundled tree detector in eval mode; input ``[B,3,320,320]`` RGB scaled to [0, 1].

    Args:
        num_classes: must be 1 with ``pretrained=True`` (the weights have one class, "tree").
        pretrained: load ``quantkit/assets/tree_detector.pt``; False gives random initialisation.
    """
    if pretrained and num_classes != 1:
        raise ModelError(f"the bundled tree detector has 1 class, got num_classes={num_classes}: "
                         "use num_classes=1 or pretrained=False")
    model = YoloNAS(TREE_DETECTOR_ARCH, num_classes)
    if pretrained:
        try:
            state = torch.load(io.BytesIO(weights_bytes()), map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            raise WeightsError(f"quantkit/assets/{WEIGHTS_FILE} does not match the tree detector "
                               f"architecture: regenerate it with `{TRAIN_COMMAND}` ({exc})") from exc
    model.default_input_size = INPUT_SIZE
    return model.eval()
