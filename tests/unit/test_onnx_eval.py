"""Evaluation on the ONNX route (issue 22): `quantkit export model.onnx --eval/--data` and `quantkit eval OUT`
use the torch route's evaluation-data opening and scoring; the FP32 torch row says there is no torch model.

Oracle: ``det_onnx`` always detects one fixed box; the data sets' one ground-truth box per image is that box
mapped back through the letterbox, so the true mAP is exactly 1.0 (a wrong input size or preprocessing moves
the boxes and drops it)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from quantkit.cli import main
from onnx_toy import det_coco, det_onnx, det_yolo_yaml


def run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    """(model path, calibration .npy, COCO folder of 64x64 images, COCO folder of 96x96 images)."""
    root = tmp_path_factory.mktemp("det")
    onnx.save(det_onnx(), root / "det.onnx")
    np.save(root / "calib.npy", np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32))
    return root / "det.onnx", root / "calib.npy", det_coco(root / "coco"), det_coco(root / "coco96", img=96)


@pytest.fixture(scope="module")
def exported(det, tmp_path_factory):
    model, npy, coco, _ = det
    out = tmp_path_factory.mktemp("exp") / "out"
    code, text = run("export", model, "--calib", npy, "--eval", coco, "--out", out, "--no-cache", "-q")
    assert code == 0, text
    return out


def test_export_eval_on_the_onnx_route(exported):
    ev = json.loads((exported / "report.json").read_text())["evaluation"]
    assert ev["fp32_onnx"]["map50_95"] == 1.0 and ev["int8_onnx"]["map50_95"] > 0.99, ev
    assert ev["fp32_torch"]["map50_95"] is None and "no torch model" in ev["fp32_torch"]["note"]


def test_quantkit_eval_on_an_onnx_route_folder(exported, det, tmp_path):
    _, _, coco, coco96 = det
    report = json.loads((exported / "report.json").read_text())["evaluation"]
    js = tmp_path / "ev.json"
    code, text = run("eval", exported, "--json", js)  # the recorded evaluation data
    assert code == 0, text
    assert "fp32_torch  n/a (ONNX route: there is no torch model" in text and "fp32_onnx   mAP50:95 1.0000" in text
    got = json.loads(js.read_text())
    assert {k: got[k] for k in ("fp32_onnx", "int8_onnx")} == {k: report[k] for k in ("fp32_onnx", "int8_onnx")}
    # other images, other size: the letterbox maps the same detection onto them (mAP 1.0 only if it is right)
    code, text = run("eval", exported, "--eval", coco96, "--json", js)
    assert code == 0, text
    assert json.loads(js.read_text())["fp32_onnx"]["map50_95"] == 1.0


def test_eval_of_a_moved_folder_reads_only_its_graphs(exported, det, tmp_path):
    """The recorded model.name points at an ONNX file that is gone, and a .py planted beside the graphs is
    never imported: the folder's own model.onnx / model.int8.onnx are scored."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(exported, moved)
    marker = tmp_path / "MARKER"
    (moved / "det.py").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n")
    rec = (moved / "recipe.resolved.yaml").read_text()
    assert str(det[0]) in rec
    (moved / "recipe.resolved.yaml").write_text(rec.replace(str(det[0]), str(tmp_path / "gone" / "det.onnx")))
    code, text = run("eval", moved)
    assert code == 0 and "fp32_onnx   mAP50:95 1.0000" in text, text
    assert not marker.exists()


def test_eval_of_a_folder_without_graphs_is_exit_2(exported, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "model.int8.onnx").unlink()
    code, text = run("eval", broken)
    assert code == 2 and "model.int8.onnx" in text, text


def test_data_yaml_on_the_onnx_route(det, tmp_path):
    model = det[0]
    yaml_path = det_yolo_yaml(tmp_path / "ds")
    out = tmp_path / "out"
    code, text = run("export", model, "--data", yaml_path, "--out", out, "--no-cache", "-q")
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["fp32_onnx"]["map50_95"] == 1.0, report["evaluation"]
    assert "val split" in report["evaluation"]["data"] or "data.yaml" in report["evaluation"]["data"]
    assert report["calibration"]["num_samples"] == 3  # the train split's 3 images


def test_bad_evaluation_data_fails_before_calibration(det, tmp_path, monkeypatch):
    """A YAML whose val labels are broken, or a COCO folder with a bad box: exit 2 naming the file, nothing
    written, and calibration never started."""
    import quantkit.pipeline_onnx as ox

    def no_calibration(*a, **k):
        raise AssertionError("calibration ran before the evaluation data was checked")

    monkeypatch.setattr(ox, "quantize_onnx", no_calibration)
    model, npy, coco, _ = det
    yaml_path = det_yolo_yaml(tmp_path / "ds")
    bad_label = next((tmp_path / "ds" / "labels" / "val").iterdir())
    bad_label.write_text("0 0.5 0.5 nan 0.2\n")
    bad_coco = tmp_path / "badcoco"
    det_coco(bad_coco)
    ann = json.loads((bad_coco / "annotations.json").read_text())
    ann["annotations"][0]["bbox"] = [1, 1, 0, 5]
    (bad_coco / "annotations.json").write_text(json.dumps(ann))
    for k, args in enumerate((("--data", yaml_path), ("--calib", npy, "--eval", bad_coco))):
        out = tmp_path / f"out{k}"
        code, text = run("export", model, *args, "--out", out, "--no-cache", "-q")
        assert code == 2, text
        assert "calibration ran" not in text and not out.exists(), text


# ----------------------------------------------------------- one meaning per evaluation-data flag (issue 22)


def test_eval_flags(exported, det, tmp_path):
    """eval --eval DIR / images + --eval-annotations / --data data.yaml; --data DIR is a deprecated alias."""
    coco96 = det[3]
    code, text = run("eval", exported, "--eval", coco96 / "images", "--eval-annotations", coco96 / "annotations.json")
    assert code == 0 and "fp32_onnx   mAP50:95 1.0000" in text and "deprecated" not in text, text
    code, text = run("eval", exported, "--data", coco96)
    assert code == 0 and "fp32_onnx   mAP50:95 1.0000" in text, text
    assert "deprecated: use --eval" in text, text
    yaml_path = det_yolo_yaml(tmp_path / "ds")
    code, text = run("eval", exported, "--data", yaml_path)
    assert code == 0 and "fp32_onnx   mAP50:95 1.0000" in text and "deprecated" not in text, text
    for args, message in ((("--eval", coco96, "--data", yaml_path), "give one"),
                          (("--eval-annotations", coco96 / "annotations.json"), "needs --eval")):
        code, text = run("eval", exported, *args)
        assert code == 2 and message in text, text


def test_every_command_spells_evaluation_data_the_same():
    """export, sensitivity and eval all take --eval (held-out data), --eval-annotations and --data (YAML)."""
    from quantkit.cli.engine import eval_cmd
    from quantkit.cli.export import export_cmd
    from quantkit.cli.sensitivity import sensitivity_cmd

    for cmd in (export_cmd, sensitivity_cmd, eval_cmd):
        opts = {o for p in cmd.params for o in p.opts}
        assert {"--eval", "--eval-annotations", "--data"} <= opts, cmd.name
        helps = {o: p.help for p in cmd.params for o in p.opts}
        assert "YAML" in helps["--data"] and "YAML" in helps["--eval"], cmd.name


def test_sensitivity_data_yaml_feeds_calibration_and_evaluation(monkeypatch, tmp_path):
    import quantkit.pipeline as pipeline

    seen = {}

    def fake(recipe, out_dir, **kw):
        seen["recipe"] = recipe
        raise SystemExit(0)

    monkeypatch.setattr(pipeline, "run_sensitivity", fake)
    y = tmp_path / "d.yaml"
    y.write_text("path: .\ntrain: a\nval: b\nnames: [x]\n")
    run("sensitivity", "--data", y, "--out", tmp_path / "s")
    assert seen["recipe"].calibration.data == str(y) and seen["recipe"].evaluation.data == str(y)
    run("sensitivity", "--data", y, "--eval", tmp_path, "--out", tmp_path / "s")
    assert seen["recipe"].calibration.data == str(y) and seen["recipe"].evaluation.data == str(tmp_path)
