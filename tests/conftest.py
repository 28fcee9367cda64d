import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture
def tiny():
    """A fresh tiny SD-shaped model (tests attach adapters to it, so never shared)."""
    from calora_ray.models import build_tiny

    return build_tiny(seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny model saved as a standard diffusers directory (the from_pretrained path)."""
    from calora_ray.models import build_tiny, save_components

    return save_components(build_tiny(seed=0), tmp_path_factory.mktemp("tiny") / "tiny-sd")
