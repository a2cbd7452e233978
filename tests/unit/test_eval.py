"""quantkit.eval: numpy NMS, COCO data set loading, COCO mAP and SQNR, checked against closed forms and oracles."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from quantkit.data.preprocess import Preprocess
from quantkit.errors import DataError, ModelError, UsageError
from quantkit.data.coco import CocoDataset
from quantkit.eval.detection import (
    DetectionMetrics,
    coco_map,
    evaluate_detection,
    onnx_predictor,
    predict_dataset,
    torch_predictor,
)
from quantkit.eval.nms import batched_nms, box_iou, nms, postprocess
from quantkit.sqnr import SqnrAccumulator, per_output_sqnr, sqnr_db

pytest.importorskip("faster_coco_eval")


# ---- NMS -----------------------------------------------------------------------------------------------


def _py_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _oracle_postprocess(boxes, scores, conf, iou, top_k, max_det):
    """Brute force in plain Python: candidates, top-k, then greedy NMS class by class, merged by score."""
    cands = [
        (float(scores[a, c]), a, c)
        for a in range(scores.shape[0])
        for c in range(scores.shape[1])
        if scores[a, c] > conf
    ]
    cands.sort(key=lambda t: -t[0])
    cands = cands[:top_k]
    kept = []
    for cls in sorted({c for _, _, c in cands}):
        mine = [t for t in cands if t[2] == cls]
        while mine:
            best = mine.pop(0)
            kept.append(best)
            mine = [t for t in mine if _py_iou(boxes[best[1]].tolist(), boxes[t[1]].tolist()) <= iou]
    kept.sort(key=lambda t: -t[0])
    return [(*boxes[a].tolist(), s, c) for s, a, c in kept[:max_det]]


def _one(boxes, scores, **kw):
    return postprocess(np.asarray(boxes, np.float32)[None], np.asarray(scores, np.float32)[None], **kw)[0]


def test_nms_suppresses_same_class_overlap_above_threshold_only():
    boxes = [[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 6], [0, 3, 10, 10]]
    # IoUs with box 0: 0.8 (suppressed), 0.6 (kept), 0.7 == threshold (kept: rule is IoU > thr); box 3 vs 2: 0.3
    scores = [[0.9], [0.8], [0.7], [0.6]]
    out = _one(boxes, scores, conf=0.001, iou=0.7)
    np.testing.assert_allclose(out[:, 4], [0.9, 0.7, 0.6], rtol=1e-6)
    np.testing.assert_array_equal(out[:, :4], [[0, 0, 10, 10], [0, 0, 10, 6], [0, 3, 10, 10]])


def test_nms_is_per_class_and_multilabel():
    boxes = [[0, 0, 10, 10], [0, 0, 10, 10]]
    scores = [[0.9, 0.5], [0.8, 0.0]]  # anchor 0 is class 0 and class 1; anchor 1 duplicates class 0
    out = _one(boxes, scores, conf=0.1, iou=0.5)
    assert out[:, 5].tolist() == [0.0, 1.0]
    np.testing.assert_allclose(out[:, 4], [0.9, 0.5], rtol=1e-6)


def test_conf_is_strict_and_topk_maxdet_keep_the_best():
    boxes = [[i * 20, 0, i * 20 + 10, 10] for i in range(5)]  # disjoint
    scores = [[0.5], [0.9], [0.3], [0.7], [0.2]]
    assert len(_one(boxes, scores, conf=0.2)) == 4  # 0.2 is not > 0.2
    np.testing.assert_allclose(_one(boxes, scores, conf=0.0, top_k=3)[:, 4], [0.9, 0.7, 0.5], rtol=1e-6)
    np.testing.assert_allclose(_one(boxes, scores, conf=0.0, max_det=2)[:, 4], [0.9, 0.7], rtol=1e-6)
    assert _one(boxes, np.zeros((5, 1)), conf=0.001).shape == (0, 6)


def test_class_offset_survives_negative_coordinates():
    # torchvision's offset (class * (max + 1)) is 0 here, which would merge the two classes.
    boxes = np.array([[-100.0, -100.0, -1.0, -1.0]] * 2)
    keep = batched_nms(boxes, np.array([0.9, 0.8]), np.array([0, 1]), 0.5)
    assert sorted(keep.tolist()) == [0, 1]

def test_postprocess_matches_brute_force_oracle():
    rng = np.random.default_rng(0)
    b, a, c = 2, 150, 3
    centres = rng.uniform(20, 200, size=(b, 12, 2))  # clusters so that NMS has work to do
    pick = rng.integers(0, 12, size=(b, a))
    ctr = np.take_along_axis(centres, pick[..., None], axis=1) + rng.normal(0, 4, size=(b, a, 2))
    wh = rng.uniform(10, 40, size=(b, a, 2))
    boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=-1).astype(np.float32)
    scores = rng.uniform(0, 1, size=(b, a, c)).astype(np.float32)
    kw = dict(conf=0.3, iou=0.5, top_k=200, max_det=60)
    got = postprocess(boxes, scores, **kw)
    for i in range(b):
        want = np.array(_oracle_postprocess(boxes[i], scores[i], **kw), dtype=np.float32)
        assert 10 < len(want) <= 60
        np.testing.assert_array_equal(got[i], want)


def test_box_iou_and_early_stop():
    rng = np.random.default_rng(4)
    xy = rng.uniform(0, 50, size=(40, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 30, size=(40, 2))], axis=1)
    boxes[0, 2] = boxes[0, 0]  # a zero-area box: IoU 0 with everything, itself included
    want = [[_py_iou(a.tolist(), b.tolist()) for b in boxes] for a in boxes]
    np.testing.assert_allclose(box_iou(boxes, boxes), want, rtol=1e-12, atol=0)
    scores = rng.uniform(size=40)
    full = nms(boxes, scores, 0.3)
    assert 5 < len(full) < 40
    np.testing.assert_array_equal(nms(boxes, scores, 0.3, max_keep=5), full[:5])


def test_postprocess_rejects_bad_shapes():
    with pytest.raises(UsageError):
        postprocess(np.zeros((2, 5, 4)), np.zeros((2, 6, 3)))
    with pytest.raises(UsageError):
        postprocess(np.zeros((5, 4)), np.zeros((5, 3)))


# ---- synthetic COCO sets -------------------------------------------------------------------------------


def _make_set(root, images, categories=(1, 2), *, subdir="images"):
    """images: list of (width, height, [(x, y, w, h, category_id), ...]). Category k (in sorted order) is drawn
    as a rectangle lit only in colour channel k, on black, so a detector can find it from the pixels."""
    cats = sorted(categories)
    (root / subdir).mkdir(parents=True, exist_ok=True)
    js = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in categories]}
    for i, (w, h, boxes) in enumerate(images):
        arr = np.zeros((h, w, 3), np.uint8)
        for x, y, bw, bh, cat in boxes:
            arr[y : y + bh, x : x + bw, cats.index(cat)] = 255
            js["annotations"].append(
                {"id": len(js["annotations"]) + 1, "image_id": 10 + i, "category_id": cat, "bbox": [x, y, bw, bh],
                 "area": bw * bh, "iscrowd": 0}
            )
        name = f"img{i}.png"
        Image.fromarray(arr).save(root / subdir / name)
        js["images"].append({"id": 10 + i, "file_name": name, "width": w, "height": h})
    (root / "annotations.json").write_text(json.dumps(js))
    return js


def _gt_detections(ds: CocoDataset, shift=0.0):
    cats = ds.category_ids
    out = {i: [] for i in ds.image_ids}
    for a in ds.anns:
        x, y, w, h = a["bbox"]
        out[a["image_id"]].append([x + shift, y, x + w + shift, y + h, 1.0, cats.index(a["category_id"])])
    return {k: np.array(v, dtype=np.float64).reshape(-1, 6) for k, v in out.items()}


IMAGES = [
    (160, 100, [(10, 20, 40, 30, 1), (90, 40, 50, 50, 2)]),
    (90, 150, [(20, 30, 50, 60, 2)]),
    (128, 128, [(5, 5, 60, 40, 1), (70, 70, 40, 50, 2)]),
]  # at most one box per category and image: the colour detector below finds one box per channel


@pytest.fixture()
def dataset(tmp_path):
    _make_set(tmp_path, IMAGES)
    return CocoDataset(tmp_path)


def test_dataset_iterates_in_id_order_with_rgb_images(dataset):
    items = list(dataset)
    assert [i for i, _, _ in items] == [10, 11, 12]
    assert items[0][1].shape == (100, 160, 3) and items[0][1].dtype == np.uint8
    assert items[1][1][30:90, 20:70, 1].min() == 255  # category 2 -> channel 1
    assert dataset.category_ids == [1, 2] and len(CocoDataset(dataset.root, max_images=2)) == 2


def test_dataset_accepts_paths_relative_to_root(tmp_path):
    _make_set(tmp_path, IMAGES[:1], subdir="val")
    js = json.loads((tmp_path / "annotations.json").read_text())
    js["images"][0]["file_name"] = "val/img0.png"
    (tmp_path / "annotations.json").write_text(json.dumps(js))
    assert len(list(CocoDataset(tmp_path))) == 1


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda js: js["annotations"][0].update(bbox=[10, 20, -5, 30]), "positive width"),
        (lambda js: js["annotations"][0].update(bbox=[10, 20, 30]), r"\[x, y, width, height\]"),
        (lambda js: js["annotations"][0].update(category_id=99), "not in 'categories'"),
        (lambda js: js["annotations"][0].update(image_id=99), "not listed in 'images'"),
        (lambda js: js["images"][0].update(file_name="missing.png"), "missing.png"),
        (lambda js: js.pop("categories"), "categories"),
    ],
)
def test_dataset_validation_names_the_problem(tmp_path, mutate, match):
    js = _make_set(tmp_path, IMAGES)
    mutate(js)
    (tmp_path / "annotations.json").write_text(json.dumps(js))
    with pytest.raises(DataError, match=match):
        CocoDataset(tmp_path)


def test_dataset_missing_json_and_size_mismatch(tmp_path):
    with pytest.raises(DataError, match="annotations.json"):
        CocoDataset(tmp_path)
    js = _make_set(tmp_path, IMAGES[:1])
    js["images"][0]["width"] = 161
    (tmp_path / "annotations.json").write_text(json.dumps(js))
    with pytest.raises(DataError, match="misplaced"):
        list(CocoDataset(tmp_path))


# ---- COCO mAP: closed forms ----------------------------------------------------------------------------


def _single_box_set(tmp_path, n_gt=1):
    boxes = [(0, 0, 100, 100, 1), (150, 150, 40, 40, 1)][:n_gt]
    _make_set(tmp_path, [(200, 200, boxes)], categories=(1,))
    return CocoDataset(tmp_path)


def test_perfect_predictions_give_map_one(dataset):
    m = coco_map(dataset, _gt_detections(dataset))
    assert (m.map50_95, m.map50, m.map75) == (1.0, 1.0, 1.0)
    assert m.num_images == 3 and m.num_detections == 5


def test_single_prediction_iou_062_closed_form(tmp_path):
    ds = _single_box_set(tmp_path)
    # IoU = 62/100 = 0.62: a hit at thresholds 0.50, 0.55, 0.60 and a miss at 0.65..0.95 -> AP = 3/10.
    m = coco_map(ds, {10: np.array([[0, 0, 100, 62, 0.9, 0]])})
    assert m.map50 == pytest.approx(1.0) and m.map75 == pytest.approx(0.0)
    assert m.map50_95 == pytest.approx(0.3, abs=1e-9)


def test_false_positive_ranked_first_halves_precision(tmp_path):
    ds = _single_box_set(tmp_path)
    # At recall 1 precision is 1/2; interpolated precision is 0.5 at every recall point -> AP = 0.5.
    m = coco_map(ds, {10: np.array([[120, 120, 190, 190, 0.9, 0], [0, 0, 100, 100, 0.8, 0]])})
    assert m.map50_95 == pytest.approx(0.5, abs=1e-9)


def test_half_recall_closed_form(tmp_path):
    ds = _single_box_set(tmp_path, n_gt=2)
    # One of two boxes found: precision 1 at the 51 recall points 0, 0.01, ..., 0.50, 0 after -> 51/101.
    m = coco_map(ds, {10: np.array([[0, 0, 100, 100, 0.8, 0]])})
    assert m.map50_95 == pytest.approx(51 / 101, abs=1e-9)


def test_shifted_and_empty_predictions(dataset):
    shifted = coco_map(dataset, _gt_detections(dataset, shift=6.0))
    assert 0.0 < shifted.map50_95 < 1.0 and shifted.map50 == pytest.approx(1.0)
    empty = coco_map(dataset, {i: np.zeros((0, 6)) for i in dataset.image_ids})
    assert (empty.map50_95, empty.map50, empty.num_detections) == (0.0, 0.0, 0)
    assert coco_map(dataset, {}).map50 == 0.0


REAL_SET = Path(__file__).resolve().parents[2] / "evaldata" / "trees_holdout"


@pytest.mark.skipif(not (REAL_SET / "annotations.json").is_file(), reason="evaldata/trees_holdout not in checkout")
def test_real_tree_set_loads_and_scores_monotonically():
    ds = CocoDataset(REAL_SET)
    assert len(ds) == 16 and len(ds.anns) > 300
    maps = [coco_map(ds, _gt_detections(ds, shift=s)).map50_95 for s in (0.0, 2.0, 5.0)]
    assert maps[0] == 1.0 and maps[0] > maps[1] > maps[2] > 0.0


def test_category_map(tmp_path):
    remap = {1: 3, 2: 7}
    _make_set(tmp_path, [(w, h, [(*b[:4], remap[b[4]]) for b in bs]) for w, h, bs in IMAGES], categories=(7, 3))
    ds = CocoDataset(tmp_path)
    dets = _gt_detections(ds)  # class 0 -> category 3, class 1 -> 7 (sorted ids)
    assert coco_map(ds, dets).map50_95 == 1.0
    assert coco_map(ds, dets, category_map={0: 7, 1: 3}).map50_95 == 0.0
    assert coco_map(ds, dets, category_map=[3, 7]).map50_95 == 1.0
    with pytest.raises(UsageError, match="category_map"):
        coco_map(ds, dets, num_classes=80)
    with pytest.raises(UsageError, match="does not have"):
        coco_map(ds, dets, category_map=[3, 5])


def test_metrics_as_dict_is_rounded():
    d = DetectionMetrics(1 / 3, 0.5, 0.25, 2, 7).as_dict()
    assert d == {"map50_95": 0.333333, "map50": 0.5, "map75": 0.25, "num_images": 2, "num_detections": 7}


# ---- end to end: pixels -> letterbox -> predict -> NMS -> original pixels -> mAP ---------------------------


def _colour_detector(x: np.ndarray):
    """Finds, per image and colour channel, the box of pixels lit in that channel only (model-input pixels)."""
    n, c = x.shape[:2]
    boxes = np.zeros((n, c, 4), np.float32)
    scores = np.zeros((n, c, c), np.float32)
    for i in range(n):
        for k in range(c):
            others = np.delete(x[i], k, axis=0)
            ys, xs = np.nonzero((x[i, k] > 0.5) & (others.max(axis=0) < 0.5))
            if len(xs):
                boxes[i, k] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                scores[i, k, k] = 1.0
    return boxes, scores[:, :, :2]


@pytest.mark.parametrize("letterbox", [True, False])
def test_evaluate_detection_round_trip(dataset, letterbox):
    pp = Preprocess(size=(96, 128), letterbox=letterbox)
    dets = predict_dataset(_colour_detector, dataset, pp, batch_size=2, progress=False)
    gt = _gt_detections(dataset)
    for image_id, d in dets.items():
        want = gt[image_id][np.lexsort((gt[image_id][:, 0], gt[image_id][:, 5]))]
        got = d[np.lexsort((d[:, 0], d[:, 5]))]
        assert got.shape == want.shape
        np.testing.assert_allclose(got[:, :4], want[:, :4], atol=2.5)  # resampling blurs edges by ~1 px
        np.testing.assert_array_equal(got[:, 5], want[:, 5])
    m = evaluate_detection(_colour_detector, dataset, pp, batch_size=2, progress=False)
    assert m.map50 == 1.0 and m.map50_95 > 0.95 and m.num_detections == 5


def test_evaluate_detection_rejects_logits_and_bad_shapes(dataset):
    pp = Preprocess(size=(64, 64))
    with pytest.raises(ModelError, match="sigmoid"):
        evaluate_detection(lambda x: (np.zeros((len(x), 3, 4)), np.full((len(x), 3, 2), 5.0)), dataset, pp)
    with pytest.raises(ModelError, match="boxes"):
        evaluate_detection(lambda x: (np.zeros((1, 3, 4)), np.zeros((1, 3, 2))), dataset, pp, batch_size=2)


# ---- predictors ----------------------------------------------------------------------------------------


def _toy_onnx(batch, dtype=np.float32):
    """x [N,3,4,4] -> boxes = reshape(x, [N,12,4]), scores = sigmoid(boxes)."""
    from onnx import TensorProto, helper, numpy_helper

    et = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    shape = numpy_helper.from_array(np.array([-1, 12, 4], np.int64), "shape")
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["xf", "shape"], ["boxes"]),
        helper.make_node("Sigmoid", ["boxes"], ["scores"]),
    ]
    g = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("x", et, [batch, 3, 4, 4])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch, 12, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, 12, 4])],
        initializer=[shape],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("batch, dtype", [(1, np.float32), (2, np.float32), ("N", np.float32), (1, np.float16)])
def test_onnx_predictor_batches_fixed_and_dynamic_graphs(batch, dtype):
    x = np.random.default_rng(1).normal(size=(3, 3, 4, 4)).astype(np.float32)
    boxes, scores = onnx_predictor(_toy_onnx(batch, dtype).SerializeToString())(x)
    want = x.astype(dtype).astype(np.float32).reshape(3, 12, 4)
    np.testing.assert_allclose(boxes, want, rtol=1e-6)
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-want)), rtol=1e-5)


def test_onnx_predictor_checks_input_size(tmp_path):
    path = tmp_path / "toy.onnx"
    path.write_bytes(_toy_onnx(1).SerializeToString())
    with pytest.raises(ModelError, match="preprocessing size"):
        onnx_predictor(path)(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ModelError, match="not found"):
        onnx_predictor(tmp_path / "nope.onnx")
    m = _toy_onnx(1)
    m.graph.output.append(m.graph.output[0])  # (boxes, scores, boxes): e.g. a graph with NMS outputs
    with pytest.raises(ModelError, match="exactly"):
        onnx_predictor(m)


def test_torch_predictor_unpacks_decoded_pair_and_sets_eval():
    torch = pytest.importorskip("torch")

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x):
            b = self.drop(x.reshape(x.shape[0], -1, 4))
            return (b, torch.sigmoid(b)), ("raw", "head", "outputs")

    model = Toy().train()
    x = np.random.default_rng(2).normal(size=(2, 3, 4, 4)).astype(np.float32)
    boxes, scores = torch_predictor(model)(x)
    assert not model.training
    np.testing.assert_array_equal(boxes, x.reshape(2, 12, 4))  # dropout off in eval mode
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-boxes)), rtol=1e-5)


# ---- SQNR ----------------------------------------------------------------------------------------------


def test_sqnr_closed_forms():
    ones = np.ones(100, np.float32)
    assert sqnr_db(ones, ones * 1.1) == pytest.approx(20.0, abs=1e-5)
    assert sqnr_db(ones, ones) == math.inf
    assert sqnr_db(np.zeros(3), np.ones(3)) == -math.inf
    assert sqnr_db(ones, np.full(100, np.nan)) == -math.inf
    # Two outputs pooled: signal 4 + 16 = 20, noise 4 * 0.01 -> 10 log10(500) dB; per output 20 dB and inf.
    ref = (np.ones(4), 2 * np.ones(4))
    test = [np.ones(4) * 1.1, 2 * np.ones(4)]
    assert sqnr_db(ref, test) == pytest.approx(10 * math.log10(500), abs=1e-9)
    assert per_output_sqnr(ref, test) == [pytest.approx(20.0), math.inf]


def test_sqnr_accumulates_in_float64_and_accepts_tensors():
    big = np.full(10, 1e20, np.float32)  # squares overflow float32
    assert sqnr_db(big, big * np.float32(1.1)) == pytest.approx(20.0, abs=1e-4)
    torch = pytest.importorskip("torch")
    assert sqnr_db(torch.ones(5), torch.ones(5) * 1.1) == pytest.approx(20.0, abs=1e-4)


def test_sqnr_accumulator_equals_concatenation_and_errors():
    rng = np.random.default_rng(3)
    refs = [rng.normal(size=(4, 7)) for _ in range(3)]
    tests = [r + rng.normal(scale=0.05, size=r.shape) for r in refs]
    acc = SqnrAccumulator()
    for r, t in zip(refs, tests):
        acc.update((r, 2 * r), (t, 2 * r))
    assert acc.value() == pytest.approx(sqnr_db((np.concatenate(refs), 2 * np.concatenate(refs)),
                                               (np.concatenate(tests), 2 * np.concatenate(refs))), abs=1e-9)
    assert acc.per_output()[0] == pytest.approx(sqnr_db(np.concatenate(refs), np.concatenate(tests)), abs=1e-9)
    with pytest.raises(UsageError):
        sqnr_db(np.ones(3), np.ones(4))
    with pytest.raises(UsageError):
        sqnr_db(np.array([np.nan]), np.ones(1))
    with pytest.raises(UsageError):
        SqnrAccumulator().value()
