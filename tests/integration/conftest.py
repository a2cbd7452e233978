"""A small user model (file.py:factory) with residual adds, depthwise/grouped convs, concat, pooling and a
linear head, its weights and a .npy of calibration inputs — the "any nn.Module" path of quantkit export."""

import textwrap

import numpy as np
import pytest
import torch

NET_PY = textwrap.dedent('''
    import os, time
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes=5):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False)
            self.bn = nn.BatchNorm2d(16)
            self.pw = nn.Conv2d(16, 16, 1)
            self.g = nn.Conv2d(16, 32, 3, 2, 1, groups=4)
            self.act = nn.Hardswish()
            self.b1 = nn.Conv2d(32, 16, 1)
            self.b2 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(32, 16, 1), nn.SiLU())
            self.fuse = nn.Conv2d(32, 32, 3, 1, 1)
            self.fc = nn.Linear(32, num_classes)
            self.delay = float(os.environ.get("QK_TEST_DELAY", "0"))

        def forward(self, x):
            if self.delay:
                time.sleep(self.delay)
            x = self.stem(x)
            x = torch.relu(self.pw(torch.relu(self.bn(self.dw(x))))) + x
            x = self.act(self.g(x))
            y = torch.cat([self.b1(x), self.b2(x)], 1)
            y = torch.nn.functional.relu6(self.fuse(y)) + x
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    def build(num_classes=5):
        return Net(num_classes)

    class Dead(Net):
        """A layer whose input is always zero: its calibrated amax is 0."""

        def forward(self, x):
            return super().forward(x * 0.0)

    class Blowup(Net):
        """Activations overflow to inf."""

        def forward(self, x):
            return super().forward(x * 1e38 * 1e38)

    def build_dead(num_classes=5):
        return Dead(num_classes)

    def build_blowup(num_classes=5):
        return Blowup(num_classes)
''')


@pytest.fixture(scope="session")
def user_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("user_model")
    (d / "net.py").write_text(NET_PY)
    ns = {}
    exec(compile(NET_PY, str(d / "net.py"), "exec"), ns)
    torch.manual_seed(0)
    net = ns["build"]()
    with torch.no_grad():  # non-trivial BN statistics so folding matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    torch.save(net.state_dict(), d / "net.pt")
    # real photographs, not random numbers: skimage's bundled images would do; we use the shipped tree tiles
    from quantkit.data.images import list_images, load_image
    from quantkit.data.preprocess import Preprocess, preprocess_image
    from quantkit.paths import BUNDLED_CALIBRATION

    pp = Preprocess(size=(64, 64))
    arr = np.stack([preprocess_image(load_image(f), pp)[0] for f in list_images(BUNDLED_CALIBRATION)[:24]])
    np.save(d / "calib.npy", arr.astype(np.float32))
    return {"dir": d, "spec": f"{d / 'net.py'}:build", "weights": str(d / "net.pt"), "npy": str(d / "calib.npy")}
