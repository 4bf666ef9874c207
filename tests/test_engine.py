"""ONNX Runtime engine: the exported networks compute what torch computes, the cache is used and survives
damage, a cached run never builds the torch network, and the engine setting reaches the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from napari_spinesegdiff.config import SegmentationConfig  # noqa: E402
from napari_spinesegdiff.model import engine  # noqa: E402
from napari_spinesegdiff.model.checkpoint import load_checkpoint  # noqa: E402
from napari_spinesegdiff.phantom import make_phantom  # noqa: E402
from napari_spinesegdiff.pipeline import SHIPPED_BASELINE, SHIPPED_DIFFUSION, SegmentationError, run  # noqa: E402


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SPINESEGDIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def test_diffusion_and_baseline_match_torch_on_sizes_that_need_padding(cache):
    torch.manual_seed(0)
    net, _ = load_checkpoint(SHIPPED_DIFFUSION)
    onnx_net, cfg = engine.onnx_model(SHIPPED_DIFFUSION, threads=1)
    c = cfg.network.num_classes
    # 50 x 37 is padded to 64 x 48 inside; batch 3 differs from the export's batch of 1
    image = torch.randn(3, 1, 50, 37)
    x_t = torch.randn(3, c, 50, 37)
    t = torch.tensor([10, 300, 999])
    with torch.inference_mode():
        ref_feats = net.encode(image)
        ref = net(x_t, t, image, ref_feats)
        ref_no_emb = net(x_t, t, image)
    feats = onnx_net.encode(image)
    assert [tuple(f.shape) for f in feats] == [tuple(f.shape) for f in ref_feats]
    out = onnx_net(x_t, t, image, feats)
    assert out.shape == (3, c, 50, 37)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(onnx_net(x_t, t, image).numpy(), ref_no_emb.numpy(), atol=2e-3, rtol=1e-3)
    assert float((out - ref).abs().max()) < 2e-3 < float(ref.abs().max())  # a real comparison, not zeros

    base, _ = load_checkpoint(SHIPPED_BASELINE)
    onnx_base, base_cfg = engine.onnx_model(SHIPPED_BASELINE, threads=1)
    assert base_cfg.kind == "baseline"
    with torch.inference_mode():
        ref_b = base(image)
    np.testing.assert_allclose(onnx_base(image).numpy(), ref_b.numpy(), atol=2e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="image must be"):
        onnx_base(torch.zeros(1, 2, 32, 32))
    assert sorted(p.name.split("-")[-1] for p in cache.iterdir()) == ["baseline.onnx", "denoiser.onnx",
                                                                      "encoder.onnx"]


def test_a_damaged_cache_file_is_exported_again(cache):
    engine.onnx_model(SHIPPED_BASELINE, threads=1)
    (path,) = cache.glob("*-baseline.onnx")
    good = path.read_bytes()
    path.write_bytes(b"not an onnx model")
    model, _ = engine.onnx_model(SHIPPED_BASELINE, threads=1)
    assert path.read_bytes() == good
    assert model(torch.zeros(1, 1, 32, 32)).shape[-2:] == (32, 32)


def test_an_unwritable_cache_falls_back_to_an_export_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("SPINESEGDIFF_CACHE", str(blocker))
    model, _ = engine.onnx_model(SHIPPED_BASELINE, threads=1)
    assert model(torch.zeros(2, 1, 40, 40)).shape == (2, model.num_classes, 40, 40)


def test_a_cached_run_neither_builds_the_torch_network_nor_imports_monai(cache, tmp_path):
    engine.onnx_model(SHIPPED_DIFFUSION, threads=1)
    engine.onnx_model(SHIPPED_BASELINE, threads=1)
    code = (
        "import sys, json\n"
        "from napari_spinesegdiff import pipeline\n"
        "from napari_spinesegdiff.config import SegmentationConfig\n"
        "m = pipeline.load_models(SegmentationConfig(engine='onnxruntime'))\n"
        "print(json.dumps([m.engine, type(m.diffusion).__name__, type(m.baseline).__name__,"
        " 'monai' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "SPINESEGDIFF_CACHE": str(cache.parent)})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["onnxruntime", "OnnxDiffusion", "OnnxBaseline",
                                                               False]


def test_engines_give_the_same_labels_on_a_phantom(cache):
    ph = make_phantom(seed=5)
    cfg = SegmentationConfig(steps=3, ensemble=2, slices="5:8")
    a = run(ph.image, cfg.replace(engine="onnxruntime"))
    b = run(ph.image, cfg.replace(engine="torch"))
    assert a.canonical_labels[5:8].any()
    agree = float(np.mean(a.canonical_labels == b.canonical_labels))
    assert agree > 0.999, agree
    np.testing.assert_allclose(a.uncertainty.data, b.uncertainty.data, atol=5e-3)


def test_engine_settings_are_checked():
    assert engine.resolve_engine("auto", "cpu") == "onnxruntime"
    assert engine.resolve_engine("auto", "cuda") == "torch"  # GPUs stay on torch
    assert engine.resolve_engine("torch", "cpu") == "torch"
    with pytest.raises(engine.EngineError, match="CPU only"):
        engine.resolve_engine("onnxruntime", "cuda")
    with pytest.raises(ValueError, match="engine must be"):
        SegmentationConfig(engine="tensorrt")


def test_missing_onnxruntime_is_one_sentence(monkeypatch):
    monkeypatch.setattr(engine, "onnxruntime_available", lambda: False)
    assert engine.resolve_engine("auto", "cpu") == "torch"
    with pytest.raises(engine.EngineError, match="needs the onnxruntime and onnx packages"):
        engine.resolve_engine("onnxruntime", "cpu")
    from napari_spinesegdiff import pipeline

    with pytest.raises(SegmentationError, match="needs the onnxruntime"):
        pipeline.load_models(SegmentationConfig(engine="onnxruntime"))
