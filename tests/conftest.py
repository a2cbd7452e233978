import os

import pytest
import torch

# Keep the suite quiet and reproducible on the 2-core CI box, and never touch the user's cache.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE_DIR", str(tmp_path / "qk-cache"))
