import os

import pytest
import torch

# Keep the suite reproducible on the 2-core CI box.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """One calibration cache folder for the whole session, never the user's ~/.cache."""
    old = os.environ.get("QUANTKIT_CACHE_DIR")
    os.environ["QUANTKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("qk-cache"))
    yield
    if old is None:
        os.environ.pop("QUANTKIT_CACHE_DIR", None)
    else:
        os.environ["QUANTKIT_CACHE_DIR"] = old
