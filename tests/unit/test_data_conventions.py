"""The field's data conventions: recursive image folders, Ultralytics dataset YAML with YOLO txt labels,
COCO JSON given explicitly, arrays / tensors / iterables of batches — and every bad input as a DataError."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quantkit import paths
from quantkit.data.calib import open_calibration_data
from quantkit.data.preprocess import Preprocess
from quantkit.data.sources import open_calibration_source, open_eval_dataset
from quantkit.data.yolo import label_path, load_dataset_yaml
from quantkit.errors import DataError
from quantkit.data.coco import CocoDataset
from quantkit.eval.detection import coco_map

PP = Preprocess(size=(64, 64))
HOLDOUT = paths.BUNDLED_EVAL


def make_yolo_dataset(root: Path, *, val_images: int | None = None) -> Path:
    """evaldata/trees_holdout converted to YOLO txt labels: images/{train,val}/, labels/{train,val}/, data.yaml.
    The first 6 images (by id) are train, the rest val (or the next ``val_images``)."""
    coco = json.loads((HOLDOUT / "annotations.json").read_text())
    images = sorted(coco["images"], key=lambda im: im["id"])
    val = images[6:] if val_images is None else images[6 : 6 + val_images]
    for split, ims in (("train", images[:6]), ("val", val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for im in ims:
            shutil.copy(HOLDOUT / "images" / im["file_name"], root / "images" / split / im["file_name"])
            lines = []
            for a in coco["annotations"]:
                if a["image_id"] == im["id"]:
                    x, y, w, h = a["bbox"]
                    lines.append(f"0 {(x + w / 2) / im['width']:.8f} {(y + h / 2) / im['height']:.8f} "
                                 f"{w / im['width']:.8f} {h / im['height']:.8f}")
            (root / "labels" / split / Path(im["file_name"]).with_suffix(".txt").name).write_text("\n".join(lines))
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: tree\n")
    return root / "data.yaml"


def test_yolo_labels_convert_to_the_same_ground_truth_and_map(tmp_path):
    """Oracle: the original COCO annotations. Same boxes (to the 1e-8 rounding of the txt), same mAP."""
    yaml_path = make_yolo_dataset(tmp_path)
    ds = open_eval_dataset(yaml_path)
    ref = CocoDataset(HOLDOUT)
    ref_images = sorted(ref.images, key=lambda im: im["id"])[6:]
    assert [Path(im["file_name"]).name for im in ds.images] == [im["file_name"] for im in ref_images]
    by_name = {im["file_name"]: im["id"] for im in ref_images}
    for im in ds.images:
        got = sorted(tuple(a["bbox"]) for a in ds.anns if a["image_id"] == im["id"])
        want = sorted(tuple(a["bbox"]) for a in ref.anns if a["image_id"] == by_name[Path(im["file_name"]).name])
        assert len(got) == len(want) > 0
        assert np.allclose(got, want, atol=1e-4)
    # the same (deliberately imperfect) detections score the same on both ground truths
    rng = np.random.default_rng(0)
    dets_yolo, dets_ref = {}, {}
    for im in ds.images:
        boxes = np.array([a["bbox"] for a in ds.anns if a["image_id"] == im["id"]])
        xyxy = np.c_[boxes[:, :2], boxes[:, :2] + boxes[:, 2:]] + rng.normal(0, 2.0, (len(boxes), 4))
        rows = np.c_[xyxy, rng.uniform(0.1, 1.0, len(boxes)), np.zeros(len(boxes))]
        dets_yolo[im["id"]] = rows
        dets_ref[by_name[Path(im["file_name"]).name]] = rows
    ref_sub = CocoDataset.from_coco_dict(
        {"images": ref_images, "annotations": [a for a in ref.coco_dict()["annotations"]
                                               if a["image_id"] in set(by_name.values())],
         "categories": ref.categories},
        root=HOLDOUT, source="subset", image_paths={i["id"]: HOLDOUT / "images" / i["file_name"] for i in ref_images})
    m1, m2 = coco_map(ds, dets_yolo), coco_map(ref_sub, dets_ref)
    assert 0.2 < m1.map50_95 < 1.0 and m1.map50_95 == pytest.approx(m2.map50_95, abs=1e-6)


def test_yaml_calibration_uses_the_named_split(tmp_path):
    yaml_path = make_yolo_dataset(tmp_path)
    train = open_calibration_source(yaml_path, PP, batch_size=4)
    val = open_calibration_source(yaml_path, PP, batch_size=4, split="val")
    assert train.num_samples == 6 and val.num_samples == 10 and train.kind == "images"
    assert train.names[0].startswith("images/train/") and train.fingerprint() != val.fingerprint()
    assert next(train.batches()).shape == (4, 3, 64, 64)


def test_label_path_follows_ultralytics():
    assert label_path(Path("/d/images/train/a.b.jpg")) == Path("/d/labels/train/a.b.txt")
    assert label_path(Path("/images/x/images/val/a.png")) == Path("/images/x/labels/val/a.txt")
    assert label_path(Path("/flat/a.jpg")) == Path("/flat/a.txt")


def test_txt_lists_polygons_and_unlabelled_images(tmp_path):
    yaml_path = make_yolo_dataset(tmp_path, val_images=2)
    val = sorted((tmp_path / "images" / "val").iterdir())
    (tmp_path / "val.txt").write_text(f"./images/val/{val[0].name}\n\n{val[1]}\n")
    (tmp_path / "labels" / "val" / val[1].with_suffix(".txt").name).unlink()  # no label file: no boxes
    (tmp_path / "labels" / "val" / val[0].with_suffix(".txt").name).write_text("0 0.1 0.1 0.3 0.1 0.3 0.4 0.1 0.4\n")
    yaml_path.write_text("train: images/train\nval: val.txt\nnames: [tree]\n")
    ds = open_eval_dataset(yaml_path)
    assert len(ds) == 2 and len(ds.anns) == 1
    w, h = ds.images[0]["width"], ds.images[0]["height"]
    assert np.allclose(ds.anns[0]["bbox"], [0.1 * w, 0.1 * h, 0.2 * w, 0.3 * h])


BAD = {
    "malformed_line": ("labels", "0 0.5 0.5 0.2\n", "5 values"),
    "not_numbers": ("labels", "tree 0.5 0.5 0.2 0.2\n", "not numbers"),
    "class_out_of_range": ("labels", "3 0.5 0.5 0.2 0.2\n", "not a class index 0..0"),
    "pixels_not_normalized": ("labels", "0 120 80 20 20\n", "normalized"),
    "zero_size": ("labels", "0 0.5 0.5 0 0.2\n", "must be > 0"),
    "no_val": ("yaml", "train: images/train\nnames: [tree]\n", "no 'val' split"),
    "missing_folder": ("yaml", "train: images/train\nval: images/nope\nnames: [tree]\n", "does not exist"),
    "no_names": ("yaml", "train: images/train\nval: images/val\n", "'names' is missing"),
    "nc_mismatch": ("yaml", "train: images/train\nval: images/val\nnc: 2\nnames: [tree]\n", "nc is 2"),
    "bad_root": ("yaml", "path: nowhere\ntrain: images/train\nval: images/val\nnames: [tree]\n", "dataset root"),
    "not_yaml": ("yaml", "train: [images/train\n", "not valid YAML"),
    "missing_listed_image": ("list", "images/val/ghost.png\n", "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_dataset_inputs_name_the_fix(tmp_path, case):
    yaml_path = make_yolo_dataset(tmp_path, val_images=2)
    where, text, expect = BAD[case]
    if where == "labels":
        first = sorted((tmp_path / "labels" / "val").iterdir())[0]
        first.write_text(text)
    elif where == "yaml":
        yaml_path.write_text(text)
    else:
        (tmp_path / "val.txt").write_text(text)
        yaml_path.write_text("train: images/train\nval: val.txt\nnames: [tree]\n")
    with pytest.raises(DataError, match=expect):
        open_eval_dataset(yaml_path)


def test_missing_yaml_and_both_yaml_and_annotations(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset_yaml(tmp_path / "data.yaml")
    yaml_path = make_yolo_dataset(tmp_path, val_images=1)
    with pytest.raises(DataError, match="not both"):
        open_eval_dataset(yaml_path, annotations=HOLDOUT / "annotations.json")


def test_coco_json_given_explicitly(tmp_path):
    ann = tmp_path / "elsewhere" / "gt.json"
    ann.parent.mkdir()
    shutil.copy(HOLDOUT / "annotations.json", ann)
    ds = open_eval_dataset(HOLDOUT / "images", annotations=ann, max_images=3)
    ref = CocoDataset(HOLDOUT, max_images=3)
    assert ds.coco_dict() == ref.coco_dict()
    with pytest.raises(DataError, match="not found"):
        open_eval_dataset(HOLDOUT / "images", annotations=tmp_path / "missing.json")


# ---- image folders ---------------------------------------------------------------------------------------


def _img(path, color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path)


def test_folders_are_searched_recursively_and_hidden_entries_skipped(tmp_path):
    _img(tmp_path / "b.png")
    _img(tmp_path / "sub" / "a.png", (0, 200, 0))
    _img(tmp_path / "sub" / "deeper" / "c.jpg")
    _img(tmp_path / ".cache" / "x.png")
    _img(tmp_path / ".hidden.png")
    data = open_calibration_data(tmp_path, PP, batch_size=8)
    assert data.names == ["b.png", "sub/a.png", "sub/deeper/c.jpg"] and data.num_samples == 3


def test_flat_folder_fingerprint_is_unchanged(tmp_path):
    """A flat folder hashes exactly what it hashed before sub-folders counted (file name + content digest),
    so existing calibration caches stay valid. Oracle: that formula written out."""
    for i in range(3):
        _img(tmp_path / f"{i}.png", (i * 50, 0, 0))
    data = open_calibration_data(tmp_path, PP)
    h = hashlib.sha256(b"images")
    h.update(json.dumps(PP.as_dict(), sort_keys=True).encode())
    for i in range(3):
        h.update(f"{i}.png".encode())
        h.update(hashlib.sha256((tmp_path / f"{i}.png").read_bytes()).digest())
    assert data.fingerprint() == h.hexdigest()


def test_empty_nested_folder_says_subfolders_were_searched(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    with pytest.raises(DataError, match="sub-folders"):
        open_calibration_data(tmp_path, PP)


# ---- arrays, tensors, iterables (the Python API) ---------------------------------------------------------

ARR = np.random.default_rng(1).random((10, 3, 32, 32), dtype=np.float32)


@pytest.mark.parametrize("form", ["ndarray", "tensor", "dataloader", "generator", "list_of_pairs", "samples"])
def test_in_memory_sources_give_the_same_batches(form):
    t = torch.from_numpy(ARR.copy())
    src = {
        "ndarray": ARR,
        "tensor": t,
        "dataloader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(t, torch.zeros(10)), batch_size=3),
        "generator": (t[i : i + 4] for i in range(0, 10, 4)),
        "list_of_pairs": [(t[:5], "labels"), (t[5:], "labels")],
        "samples": [t[i] for i in range(10)],  # a Dataset yields CHW samples
    }[form]
    data = open_calibration_source(src, PP, batch_size=4)
    assert data.preprocessed and data.input_shape == (3, 32, 32) and data.num_samples == 10
    assert np.array_equal(np.concatenate([b.numpy() for b in data.batches()]), ARR)
    assert data.fingerprint() == open_calibration_source(ARR, PP).fingerprint()
    assert list(data.batches()) and len(list(data.batches())) == 3  # re-iterable, even from a generator


def test_max_images_stops_reading_an_iterable():
    seen = []

    def gen():
        for i in range(10):
            seen.append(i)
            yield torch.from_numpy(ARR[i : i + 1])

    data = open_calibration_source(gen(), PP, max_images=3)
    assert data.num_samples == 3 and seen == [0, 1, 2]


@pytest.mark.parametrize("case,expect", [
    ("float64", "dtype float64"), ("uint8", "dtype uint8"), ("dict", "is a dict"), ("empty", "no batches"),
    ("shapes", "share one"), ("nan", "NaN"), ("one_d", r"expected a float32 array \(N, \.\.\.\)"), ("object", "not supported"),
])
def test_bad_in_memory_sources(case, expect):
    src = {
        "float64": ARR.astype(np.float64),
        "uint8": [torch.zeros(2, 3, 8, 8, dtype=torch.uint8)],
        "dict": [{"image": torch.from_numpy(ARR)}],
        "empty": [],
        "shapes": [torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 16, 16)],
        "nan": np.full((2, 3, 8, 8), np.nan, np.float32),
        "one_d": np.zeros(4, np.float32),  # (N, L) is valid now (audio frames); a sample axis is still needed
        "object": 42,
    }[case]
    with pytest.raises(DataError, match=expect):
        open_calibration_source(src, PP)
