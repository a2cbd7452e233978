"""A dataset YAML with YOLO labels calibrates and evaluates end to end through `quantkit export --data`; its
report holds the per-layer and calibration charts, and report.html shows them in a real headless browser."""

import html as _html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from quantkit import paths
from quantkit.cli import main

HOLDOUT = paths.BUNDLED_EVAL
pytestmark = pytest.mark.skipif(not HOLDOUT.exists(), reason=f"bundled evaluation data missing at {HOLDOUT}")


def _yolo_from_holdout(root: Path, train: int = 4, val: int = 4) -> tuple[Path, list[dict]]:
    coco = json.loads((HOLDOUT / "annotations.json").read_text())
    images = sorted(coco["images"], key=lambda im: im["id"])
    splits = {"train": images[:train], "val": images[train : train + val]}
    for split, ims in splits.items():
        for sub in ("images", "labels"):
            (root / sub / split).mkdir(parents=True)
        for im in ims:
            shutil.copy(HOLDOUT / "images" / im["file_name"], root / "images" / split / im["file_name"])
            rows = [a["bbox"] for a in coco["annotations"] if a["image_id"] == im["id"]]
            (root / "labels" / split / Path(im["file_name"]).with_suffix(".txt").name).write_text("".join(
                f"0 {(x + w / 2) / im['width']:.8f} {(y + h / 2) / im['height']:.8f} {w / im['width']:.8f} "
                f"{h / im['height']:.8f}\n" for x, y, w, h in rows))
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: tree}\n")
    # the oracle: the same val images with their original COCO annotations
    ids = {im["id"] for im in splits["val"]}
    sub = {"images": splits["val"], "categories": coco["categories"],
           "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
    (root / "coco_val.json").write_text(json.dumps(sub))
    return root / "data.yaml", splits["val"]


@pytest.fixture(scope="module")
def yaml_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo")
    data_yaml, _ = _yolo_from_holdout(root)
    out = root / "out"
    res = CliRunner().invoke(main, ["export", "--data", str(data_yaml), "--out", str(out), "--no-cache",
                                    "--set", "export.targets=[weak]"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return root, out, json.loads((out / "report.json").read_text())


def test_yaml_calibrates_on_train_and_evaluates_on_val(yaml_export):
    from quantkit.data.preprocess import Preprocess
    from quantkit.data.coco import CocoDataset
    from quantkit.eval.detection import evaluate_detection, onnx_predictor

    root, out, rep = yaml_export
    assert rep["calibration"]["num_samples"] == 4 and rep["calibration"]["kind"] == "images"
    assert rep["calibration"]["data"].endswith("data.yaml")
    ev = rep["evaluation"]
    assert ev["int8_onnx"]["num_images"] == 4
    # oracle: the exported INT8 graph scored on the original COCO annotations of the same images
    pp = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in rep["input"]["preprocess"].items()})
    ref = evaluate_detection(onnx_predictor(out / "model.int8.onnx", intra_op_threads=1),
                             CocoDataset(root / "images" / "val", annotations=root / "coco_val.json"), pp,
                             progress=False)
    assert ev["int8_onnx"]["map50_95"] == pytest.approx(ref.map50_95, abs=1e-6) and ref.map50 > 0.05


def test_report_has_charts_reasons_share_and_device(yaml_export):
    _, out, rep = yaml_export
    files = [p["file"] for p in rep["plots"]]
    assert files[:2] == ["layer_sqnr.png", "calibration.png"] and all((out / f).is_file() for f in files)
    md = (out / "report.md").read_text()
    assert "![" in md and "(layer_sqnr.png)" in md and "(calibration.png)" in md
    # the default: >= 95 % of the conv MACs INT8, the FP16 layers and why in the report, with the share curve
    assert "INT8 share of MACs" in md and 0.95 <= rep["int8_mac_share"]["share"] < 1.0
    assert "## Automatic FP16 selection" in md and "Accuracy vs INT8 share" in md
    assert rep["runtime"]["device"] == "cpu" and len(rep["layer_errors"]["layers"]) == rep["model"]["quantizable_layers"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert '"layer_sqnr.png"' in json.dumps(manifest) and '"calibration.png"' in json.dumps(manifest)


@pytest.mark.parametrize("case,expect", [
    ("class_out_of_range", "not a class index"), ("no_val", "no 'val' split"), ("malformed", "5 values"),
])
def test_bad_dataset_exits_2_before_calibrating_and_writes_nothing(tmp_path, case, expect):
    data_yaml, val = _yolo_from_holdout(tmp_path, train=2, val=2)
    label = tmp_path / "labels" / "val" / Path(val[0]["file_name"]).with_suffix(".txt").name
    if case == "class_out_of_range":
        label.write_text("1 0.5 0.5 0.1 0.1\n")
    elif case == "malformed":
        label.write_text("0 0.5 0.5\n")
    else:
        data_yaml.write_text("train: images/train\nnames: [tree]\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["export", "--data", str(data_yaml), "--out", str(out), "--no-cache"])
    assert res.exit_code == 2 and expect in res.output and "calibrating" not in res.output
    assert not out.exists()


def test_report_html_carries_every_report_md_section_and_next_steps(yaml_export):
    _, out, rep = yaml_export
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    sections = [line[3:].strip() for line in md.splitlines() if line.startswith("## ")]
    assert "Automatic FP16 selection" in sections and "Layers kept FP16, and why" in sections
    for title in sections:
        assert f"<h2>{_html.escape(title)}</h2>" in page, title
    assert sections[-1] == "Next steps" and page.rstrip().endswith("</body></html>")
    commands = [s["command"] for s in rep["next_steps"]]
    assert "quantkit verify ." in commands and any(c.startswith("quantkit build model.int8") for c in commands)
    assert "bash build_engine.sh" in commands and (out / "build_engine.sh").is_file()
    tail = page[page.index("<h2>Next steps</h2>"):]
    assert "<code>quantkit verify .</code>" in tail and "--target t4" in tail


# ---- report.html in a real browser ------------------------------------------------------------------------

PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img');
  document.body.setAttribute('data-images', imgs.length);
  imgs.forEach(function (im) {
    im.setAttribute('data-natural', im.complete + ':' + im.naturalWidth + 'x' + im.naturalHeight);
  });
  var doc = document.documentElement;
  document.body.setAttribute('data-overflow', doc.scrollWidth + ':' + doc.clientWidth);
});
</script>"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _browser(*args: str) -> subprocess.CompletedProcess:
    exe = _chromium()
    profile = tempfile.mkdtemp(prefix="qk-chromium-")
    try:
        return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                               *args], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_html_images_decode_in_headless_chromium(yaml_export, tmp_path):
    _, out, rep = yaml_export
    page = tmp_path / "report.html"
    html = (out / "report.html").read_text()
    assert "<script" not in html  # the report itself stays script-free; the probe goes into a copy
    page.write_text(html.replace("</body>", PROBE + "</body>"))
    res = _browser("--dump-dom", page.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    want = {p["file"] for p in rep["plots"]}
    assert f'data-images="{len(want)}"' in dom
    decoded = dict(re.findall(r'data-file="([^"]+)"[^>]*data-natural="true:(\d+x\d+)"', dom))
    for name in want:
        w, h = Image.open(out / name).size
        assert decoded.get(name) == f"{w}x{h}", (name, decoded)
    # fits a 1400-px-wide window: the page is no wider than the window (no horizontal scroll bar)
    res = _browser("--dump-dom", "--window-size=1400,1000", page.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    scroll, client = map(int, re.search(r'data-overflow="(\d+):(\d+)"', res.stdout).groups())
    assert client <= 1400 and scroll <= client, (scroll, client)
    # charts sized to their content: at most ~40 bars (about 0.17 in each at 100 dpi) in the per-layer chart
    for name in want:
        assert Image.open(out / name).size[1] <= 1000, (name, Image.open(out / name).size)
    shot = Path(os.environ.get("QK_SCREENSHOT_DIR", tmp_path)) / "report.png"
    res = _browser(f"--screenshot={shot}", "--window-size=1400,2400", (out / "report.html").as_uri())
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.std() > 10  # a rendered page, not a blank one
