"""Shared pytest fixtures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# The ONNX Runtime engine caches exported networks; the suite uses a folder of its own (never the user's
# ~/.cache) that subprocesses (CLI tests, pool and Dask workers) inherit.
os.environ.setdefault("SPINESEGDIFF_CACHE", tempfile.mkdtemp(prefix="spinesegdiff-test-cache-"))

#: Real data shared beside the repository (never committed): ``../shared/data``.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ``../shared/data``; skips the test when that folder is absent (e.g. a user's clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (it lives beside the repository, not in it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_file(shared_data: Path):
    """``shared_file("lumbar/IVD_11_image.nii.gz")`` -> the Path, skipping when that file is missing."""

    def get(relative: str) -> Path:
        path = shared_data / relative
        if not path.exists():
            pytest.skip(f"test data file {relative} not found under {shared_data}")
        return path

    return get
