"""Shared pytest fixtures.

`demo_data` is a tiny synthetic MGSV-EC dataset (scripts/make_demo_data.py) built once
per test session in a temporary folder; reuse it instead of making your own:

    def test_something(demo_data):
        train_csv = demo_data / "dataset/MGSV-EC/train_data.csv"
        features = demo_data / "features/Kuai_feature"

It holds DEMO_SIZES (60 tracks, 300 train + 40 val + 40 test videos, seed 0) with music
features for strides 2.5 and 5. Treat it as READ-ONLY (other tests share it; e.g. a
packed store written into it would change which backend FeatureStore picks). Tests that
write into the dataset take `demo_data_copy`, a private copy.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so `import utils` works however pytest is started
    sys.path.insert(0, str(REPO_ROOT))

# Real MGSV-EC CSVs, not in the repository (licence): <repo>/../shared/data/MGSV-EC.
REAL_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "MGSV-EC"
DEMO_SIZES = dict(num_music=60, num_videos=300, val_size=40, test_size=40, seed=0, strides=(2.5, 5.0))


def load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    module_name = f"_mgsv_script_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses need the module registered while executing
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`),
    restored afterwards. Tiny tensors: a second thread only adds synchronisation, and on a busy
    2-core CI machine the two threads spin-wait for each other."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of the shared tiny synthetic dataset (read-only; see module docstring)."""
    root = tmp_path_factory.mktemp("demo_data")
    load_script("make_demo_data").make_demo_data(root, **DEMO_SIZES)
    return root


@pytest.fixture
def demo_data_copy(demo_data: Path, tmp_path: Path) -> Path:
    """A private, writable copy of `demo_data` for tests that modify files."""
    dst = tmp_path / "demo_copy"
    shutil.copytree(demo_data, dst)
    return dst


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Folder of the real val/test CSVs; skips the test when they are not available."""
    if not (REAL_DATA_DIR / "val_data.csv").is_file():
        pytest.skip(f"real MGSV-EC CSVs not found in {REAL_DATA_DIR}")
    return REAL_DATA_DIR


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A folder in the layout scripts/demo.sh leaves, with a random-weight small model, an index and
    synthesised media (tests/app_helpers.py). READ-ONLY apart from its app_out/ folder."""
    from tests.app_helpers import make_tiny_demo
    return make_tiny_demo(tmp_path_factory.mktemp("tiny_demo"))
