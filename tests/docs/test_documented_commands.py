"""Every command the README's command block and the ``--help`` examples show runs as written.

The commands are read from the documentation itself (nothing is listed here by hand), each one runs in a
scratch folder holding a small fixture for every placeholder the documentation uses (``images/``,
``ckpt.pth``, ``net.py``, ``data.npy``, ``my.yaml``, ``model.onnx``, ``data.yaml``, ``my_coco/`` ...), with the
installed ``quantkit`` command, and must exit 0. ``quantkit build`` is documented as needing TensorRT and a GPU:
without them it must exit 2 naming TensorRT. Documentation can no longer drift from behaviour.

These run dozens of real exports (about 30 min on 2 cores, measured on a fresh clone), so they live outside ``make test``'s suite:
``make docs-check`` runs them, and CI (``.ci/run``) runs that after the suite.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
QUANTKIT = [sys.executable, "-m", "quantkit"]
SUBCOMMANDS = ("export", "sensitivity", "eval", "build", "lint", "verify", "layers", "models", "recipes")


def readme_commands() -> list[str]:
    """The ``quantkit ...`` lines of the README's command-line block, comments stripped (the synopsis line with
    ``[OPTIONS]``-style brackets is grammar, not a command)."""
    text = README.read_text()
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    out = []
    for line in block.splitlines():
        line = line.split("  #", 1)[0].strip()
        for part in line.split(", "):
            if part.startswith("quantkit") and "[" not in part:
                out.append(part.strip())
    return out


def help_examples() -> list[str]:
    """The example lines of every sub-command's ``--help``."""
    from click.testing import CliRunner

    from quantkit.cli import main

    out = []
    for sub in ("", *SUBCOMMANDS):
        res = CliRunner().invoke(main, [*([sub] if sub else []), "--help"], terminal_width=200)
        assert res.exit_code == 0, res.output
        for line in res.output.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("quantkit ") and "[" not in line:
                out.append(line)
    return out


COMMANDS = list(dict.fromkeys(readme_commands() + help_examples()))
READS_OUT = re.compile(r"(?<!--out )(?<![\w/.-])out/(model\.int8\.onnx)?(\s|$)")  # reads a previous export


TINY_DETECTOR = '''\
import torch
from torch import nn


class TinyDetector(nn.Module):
    """A tiny detector: boxes [B,A,4] (x1,y1,x2,y2 pixels) and scores [B,A,1] (sigmoid)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.ReLU())
        self.box = nn.Conv2d(16, 4, 1)
        self.cls = nn.Conv2d(16, 1, 1)

    def forward(self, x):
        f = self.body(x)
        side = x.shape[-1]
        b = torch.sigmoid(self.box(f)).flatten(2).transpose(1, 2) * side
        centre, size = b[..., :2], b[..., 2:] / 4
        boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1)
        return boxes, torch.sigmoid(self.cls(f)).flatten(2).transpose(1, 2)


def build():
    return TinyDetector()
'''


def _tiny_net(folder: Path) -> None:
    """net.py (a tiny detector: its exports can be evaluated, as the eval examples do), seeded net.pt, data.npy."""
    import torch

    (folder / "net.py").write_text(TINY_DETECTOR)
    sys.path.insert(0, str(folder))
    try:
        import importlib

        net = importlib.import_module("net").build()
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("net", None)
    torch.manual_seed(0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    torch.save(net.state_dict(), folder / "net.pt")
    (folder / "path" / "to").mkdir(parents=True)
    shutil.copy(folder / "net.py", folder / "path" / "to" / "net.py")
    rng = np.random.default_rng(0)
    np.save(folder / "data.npy", rng.random((16, 3, 64, 64), dtype=np.float32))
    (folder / "my.yaml").write_text("model:\n  name: net.py:build\n  weights: net.pt\n"
                                    "calibration:\n  data: data.npy\n")


def _coco_subset(src: Path, dst: Path, n: int) -> None:
    coco = json.loads((src / "annotations.json").read_text())
    images = sorted(coco["images"], key=lambda im: im["id"])[:n]
    ids = {im["id"] for im in images}
    (dst / "images").mkdir(parents=True)
    for im in images:
        shutil.copy(src / "images" / im["file_name"], dst / "images" / im["file_name"])
    coco = {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
    (dst / "annotations.json").write_text(json.dumps(coco))


def _yolo_dataset(src: Path, root: Path) -> None:
    coco = json.loads((src / "annotations.json").read_text())
    images = sorted(coco["images"], key=lambda im: im["id"])
    for split, ims in (("train", images[:4]), ("val", images[4:8])):
        for sub in ("images", "labels"):
            (root / sub / split).mkdir(parents=True)
        for im in ims:
            shutil.copy(src / "images" / im["file_name"], root / "images" / split / im["file_name"])
            rows = [a["bbox"] for a in coco["annotations"] if a["image_id"] == im["id"]]
            (root / "labels" / split / Path(im["file_name"]).with_suffix(".txt").name).write_text("".join(
                f"0 {(x + w / 2) / im['width']:.6f} {(y + h / 2) / im['height']:.6f} {w / im['width']:.6f} "
                f"{h / im['height']:.6f}\n" for x, y, w, h in rows))
    # 80 names (tree first), as a COCO-class dataset YAML has them: the docs run it with yolo_nas_s (80 classes)
    # and with the bundled one-class detector
    names = ", ".join(["tree", *[f"class{i}" for i in range(1, 80)]])
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: [{names}]\n")


def _run(cmd: str, cwd: Path, timeout: int = 1500) -> subprocess.CompletedProcess:
    argv = shlex.split(cmd)
    env = {**os.environ, "CI": "true"}
    return subprocess.run(QUANTKIT + argv[1:], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    """One folder with a fixture for every placeholder the documentation names, and ``out/`` holding the
    README's first export (the commands that read ``out/`` read it)."""
    import torch

    from quantkit import paths

    root = tmp_path_factory.mktemp("docs-fixtures")
    for name in ("calibration", "evaldata"):
        (root / name).symlink_to(REPO / name)
    (root / "images").mkdir()
    for f in sorted((paths.BUNDLED_CALIBRATION).glob("*.jpg"))[::7][:8]:
        shutil.copy(f, root / "images" / f.name)
    _tiny_net(root)
    from quantkit.models.yolo_nas import yolo_nas_s  # the registered architecture, seeded weights

    torch.manual_seed(0)
    torch.save(yolo_nas_s().state_dict(), root / "ckpt.pth")
    _coco_subset(paths.BUNDLED_EVAL, root / "my_coco", 4)
    _coco_subset(paths.BUNDLED_EVAL, root / "coco", 4)  # the README and export --help say coco/
    # `--eval images/ --eval-annotations labels.json`: annotated tiles beside the calibration ones in images/
    for f in (root / "my_coco" / "images").iterdir():
        shutil.copy(f, root / "images" / f.name)
    shutil.copy(root / "my_coco" / "annotations.json", root / "labels.json")
    _yolo_dataset(paths.BUNDLED_EVAL, root)
    first = next(c for c in COMMANDS if c.startswith("quantkit export") and READS_OUT.search(c + " ") is None
                 and "--out" not in c)
    res = _run(first, root)
    assert res.returncode == 0, (first, res.stdout[-3000:], res.stderr[-3000:])
    shutil.copy(root / "out" / "model.onnx", root / "model.onnx")
    shutil.copy(root / "out" / "calibration.cache", root / "calibration.cache")
    return root


NET_EXPORT = "quantkit export --model net.py:build --weights net.pt --calib data.npy --out out/"


def _scratch(fixtures: Path, tmp_path: Path, cmd: str) -> Path:
    """A fresh folder with the fixtures linked in; ``out/`` only for the commands that read a previous export
    (the bundled model's, or for a command naming ``net.py`` the README's export of that model)."""
    reads_out = READS_OUT.search(cmd + " ") is not None
    for entry in fixtures.iterdir():
        if entry.name == "out" and (not reads_out or "net.py" in cmd):
            continue
        (tmp_path / entry.name).symlink_to(entry)
    if reads_out and "net.py" in cmd:
        res = _run(NET_EXPORT, tmp_path)
        assert res.returncode == 0, (NET_EXPORT, res.stdout[-3000:], res.stderr[-3000:])
    return tmp_path


def test_commands_were_found():
    assert len(readme_commands()) >= 15 and len(help_examples()) >= 8, (readme_commands(), help_examples())


@pytest.mark.parametrize("cmd", COMMANDS)
def test_documented_command_runs_as_written(cmd, fixtures, tmp_path):
    cwd = _scratch(fixtures, tmp_path, cmd)
    res = _run(cmd, cwd)
    text = res.stdout[-4000:] + res.stderr[-4000:]
    if cmd.startswith("quantkit build"):
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            assert res.returncode == 2 and "tensorrt" in text.lower(), (cmd, text)
            return
    assert res.returncode == 0, (cmd, text)
