"""Registry look-ups, user-file factories and safe weight loading."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from quantkit.errors import DataError, ModelError, UsageError, WeightsError
from quantkit.models.loading import ModelSource, build_model, load_weights, read_state_dict
from quantkit.models.registry import count_parameters, get_entry, list_models


class NotATensor:  # torch.save of this needs pickle code to load back
    def __init__(self):
        self.payload = [1, 2, 3]


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_registry_table():
    names = [e.name for e in list_models()]
    assert names == ["yolo_nas_s", "yolo_nas_m", "yolo_nas_l", "trees"]
    trees = get_entry("trees")
    assert trees.factory == "quantkit.models.bundled:tree_detector"
    assert (trees.input_size, trees.num_classes) == ((320, 320), 1)
    assert get_entry("yolo_nas_m").input_size == (640, 640)
    with pytest.raises(UsageError, match=r"Did you mean 'yolo_nas_s'.*yolo_nas_m, yolo_nas_l, trees"):
        get_entry("yolo-nas-s")
    with pytest.raises(UsageError, match="Registered models"):
        get_entry("resnet50")


def test_count_parameters_counts_shared_once():
    conv = nn.Conv2d(3, 4, 3)  # 4*3*3*3 + 4 = 112
    assert count_parameters(nn.Sequential(conv, conv)) == 112


def test_build_registered_model_with_num_classes():
    model, info = build_model("yolo_nas_s", num_classes=3)
    assert not model.training and model.heads.head1.cls_pred.out_channels == 3
    assert info.source is ModelSource.REGISTRY and info.factory == "quantkit.models.yolo_nas:yolo_nas_s"
    assert (info.input_size, info.num_classes, info.num_parameters) == ((640, 640), 3, 19_053_888 - 77 * 451)


def test_build_from_user_file(tmp_path):
    src = tmp_path / "my_model.py"
    src.write_text(textwrap.dedent(
        """
        import torch.nn as nn

        def make(num_classes=2):
            net = nn.Sequential(nn.Conv2d(3, num_classes, 1))
            net.default_input_size = (64, 96)
            return net

        def not_a_model():
            return 42

        def broken():
            raise RuntimeError("boom")

        def needs_data():
            from quantkit.errors import DataError
            raise DataError("fetch the data first")

        def scripted():
            import torch
            return torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()))
        """
    ))
    model, info = build_model(f"{src}:make", num_classes=5)
    assert isinstance(model, nn.Sequential) and model[0].out_channels == 5
    assert info.source is ModelSource.FILE and info.input_size == (64, 96) and info.num_classes == 5
    with pytest.raises(ModelError, match=r"no callable 'missing'.*broken, make, needs_data, not_a_model"):
        build_model(f"{src}:missing")
    with pytest.raises(ModelError, match="returned int, not a torch.nn.Module"):
        build_model(f"{src}:not_a_model")
    with pytest.raises(ModelError, match="RuntimeError: boom"):
        build_model(f"{src}:broken")
    # a TorchScript module (torch.jit.load of a shipped .jit) said so, not "matches no quantizable layer" later
    with pytest.raises(ModelError, match="returned a TorchScript module.*FP32 ONNX"):
        build_model(f"{src}:scripted")
    with pytest.raises(DataError, match="^fetch the data first$"):  # quantkit errors pass through as they are
        build_model(f"{src}:needs_data")
    with pytest.raises(ModelError, match="takes no num_classes"):
        build_model(f"{src}:not_a_model", num_classes=3)
    with pytest.raises(ModelError, match="not found"):
        build_model(f"{tmp_path / 'nope.py'}:make")
    bad = tmp_path / "bad.py"
    bad.write_text("import not_a_real_package_xyz\n")
    with pytest.raises(ModelError, match="importing .*bad.py failed with ModuleNotFoundError"):
        build_model(f"{bad}:make")


def test_plain_state_dict_roundtrip(tmp_path):
    torch.manual_seed(0)
    src, dst = small_net().eval(), small_net().eval()
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    assert load_weights(dst, path) == "state_dict"
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(src(x), dst(x))


def test_trainer_checkpoint_prefers_ema_and_strips_module(tmp_path):
    torch.manual_seed(1)
    net, ema = small_net(), small_net()
    ckpt = {
        "net": net.state_dict(),
        "ema_net": {"module." + k: v for k, v in ema.state_dict().items()},
        "epoch": 7,
        "acc": torch.tensor(0.5),
    }
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    dst = small_net()
    assert load_weights(dst, path) == "ema_net"
    assert torch.equal(dst[0].weight, ema[0].weight) and not torch.equal(dst[0].weight, net[0].weight)
    torch.save({"net": net.state_dict(), "epoch": 7}, path)
    assert load_weights(dst, path) == "net" and torch.equal(dst[0].weight, net[0].weight)
    torch.save({"state_dict": {"module.module." + k: v for k, v in ema.state_dict().items()}}, path)
    state, section = read_state_dict(path)
    assert section == "state_dict" and set(state) == set(ema.state_dict())


def test_pickle_requiring_file_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"net": small_net().state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(WeightsError, match=r"refuses for safety.*torch.save\(model.state_dict\(\)"):
        load_weights(small_net(), path)
    whole = tmp_path / "module.pt"
    torch.save(small_net(), whole)  # a pickled nn.Module is refused the same way
    with pytest.raises(WeightsError, match="refuses for safety"):
        load_weights(small_net(), whole)


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    state = small_net().state_dict()
    state.pop("0.weight")
    state["3.weight"] = torch.zeros(7, 4, 1, 1)
    state["extra.bias"] = torch.zeros(3)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        load_weights(small_net(), path)
    msg = str(err.value)
    assert "missing (1): 0.weight" in msg and "unexpected (1): extra.bias" in msg
    assert "3.weight (7, 4, 1, 1) vs (2, 4, 1, 1)" in msg

    big = nn.Sequential(*[nn.Linear(2, 2) for _ in range(30)])
    torch.save({"other.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match=r"missing \(60\): .*\(\+40 more\)"):
        load_weights(big, path)


def test_hints_for_fused_checkpoint_and_class_count(tmp_path):
    from quantkit.models.qarepvgg import QARepVGGBlock

    fused = QARepVGGBlock(4, 4)
    fused.partial_fusion()
    path = tmp_path / "fused.pt"
    torch.save(nn.Sequential(fused).state_dict(), path)
    with pytest.raises(WeightsError, match="saved after QA-RepVGG fusion"):
        load_weights(nn.Sequential(QARepVGGBlock(4, 4)), path)
    unfused = nn.Sequential(QARepVGGBlock(4, 4))
    unfused[0].partial_fusion()
    load_weights(unfused, path)  # loading into a model fused the same way works

    class Head(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.cls_pred = nn.Conv2d(8, c, 1)

    torch.save(Head(3).state_dict(), path)
    with pytest.raises(WeightsError, match="has 3 classes: pass num_classes=3"):
        load_weights(Head(80), path)


def test_bad_files(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_weights(small_net(), tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a torch file")
    with pytest.raises(WeightsError, match="not a readable torch weights file"):
        load_weights(small_net(), junk)
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, junk)
    with pytest.raises(WeightsError, match="without weights.*ema_net, net, state_dict, model"):
        load_weights(small_net(), junk)
    torch.save([torch.zeros(1)], junk)
    with pytest.raises(WeightsError, match="holds a list"):
        load_weights(small_net(), junk)


def test_build_with_weights(tmp_path):
    model, _ = build_model("yolo_nas_s", num_classes=2)
    path = tmp_path / "s.pt"
    torch.save({"ema_net": model.state_dict()}, path)
    again, info = build_model("yolo_nas_s", num_classes=2, weights=str(path))
    assert info.weights == str(path)
    assert torch.equal(again.heads.head3.reg_pred.weight, model.heads.head3.reg_pred.weight)
    with pytest.raises(WeightsError, match="has 2 classes"):
        build_model("yolo_nas_s", weights=str(path))
