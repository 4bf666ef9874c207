"""ONNX Runtime and OpenVINO engines: the exported networks compute what torch computes (OpenVINO in
bfloat16 where the CPU has it, so to a looser tolerance), the cache is used and survives damage, a cached run
never builds the torch network, and the engine setting reaches the run and its provenance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from napari_spinesegdiff.config import SegmentationConfig  # noqa: E402
from napari_spinesegdiff.model import engine  # noqa: E402
from napari_spinesegdiff.model.checkpoint import load_checkpoint, read_config  # noqa: E402
from napari_spinesegdiff.phantom import make_phantom  # noqa: E402
from napari_spinesegdiff.pipeline import SHIPPED_BASELINE, SHIPPED_DIFFUSION, SegmentationError, run  # noqa: E402

#: image channels of the shipped presegmenter (3 since v4.4: a slice and its neighbours)
BASE_IN = read_config(SHIPPED_BASELINE).network.in_channels


needs_openvino = pytest.mark.skipif(not engine.openvino_available(), reason="OpenVINO is not installed")


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
    image_b = torch.randn(3, BASE_IN, 50, 37)
    with torch.inference_mode():
        ref_b = base(image_b)
    np.testing.assert_allclose(onnx_base(image_b).numpy(), ref_b.numpy(), atol=2e-3, rtol=1e-3)
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
    assert model(torch.zeros(1, BASE_IN, 32, 32)).shape[-2:] == (32, 32)


def test_an_unwritable_cache_falls_back_to_an_export_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("SPINESEGDIFF_CACHE", str(blocker))
    model, _ = engine.onnx_model(SHIPPED_BASELINE, threads=1)
    assert model(torch.zeros(2, BASE_IN, 40, 40)).shape == (2, model.num_classes, 40, 40)


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("openvino", marks=needs_openvino)])
def test_a_cached_run_neither_builds_the_torch_network_nor_imports_monai(cache, tmp_path, runtime):
    engine.onnx_model(SHIPPED_DIFFUSION, threads=1)
    engine.onnx_model(SHIPPED_BASELINE, threads=1)
    code = (
        "import sys, json\n"
        "from napari_spinesegdiff import pipeline\n"
        "from napari_spinesegdiff.config import SegmentationConfig\n"
        f"m = pipeline.load_models(SegmentationConfig(engine={runtime!r}))\n"
        "print(json.dumps([m.engine, type(m.diffusion).__name__, type(m.baseline).__name__,"
        " 'monai' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "SPINESEGDIFF_CACHE": str(cache.parent)})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [runtime, "OnnxDiffusion", "OnnxBaseline", False]


def test_engines_give_the_same_labels_on_a_phantom(cache):
    ph = make_phantom(seed=5)
    cfg = SegmentationConfig(steps=3, ensemble=2, slices="5:8")
    a = run(ph.image, cfg.replace(engine="onnxruntime"))
    b = run(ph.image, cfg.replace(engine="torch"))
    assert a.canonical_labels[5:8].any()
    agree = float(np.mean(a.canonical_labels == b.canonical_labels))
    assert agree > 0.999, agree
    np.testing.assert_allclose(a.uncertainty.data, b.uncertainty.data, atol=5e-3)


@needs_openvino
def test_openvino_computes_what_torch_computes_and_says_in_what_precision(cache):
    torch.manual_seed(1)
    net, _ = load_checkpoint(SHIPPED_DIFFUSION)
    ov_net, cfg = engine.onnx_model(SHIPPED_DIFFUSION, threads=2, runtime="openvino")
    c = cfg.network.num_classes
    image = torch.randn(2, 1, 70, 45)  # padded inside
    x_t = torch.randn(2, c, 70, 45)
    t = torch.tensor([30, 250])
    with torch.inference_mode():
        ref = net(x_t, t, image, net.encode(image))
    out = ov_net(x_t, t, image, ov_net.encode(image))
    assert out.shape == ref.shape == (2, c, 70, 45)
    assert ov_net.precision in ("bf16", "f32")
    err = (out - ref).abs()
    # bfloat16 keeps 8 bits of mantissa: small errors relative to the logits, the same decisions
    tol = 0.05 if ov_net.precision == "bf16" else 2e-3
    assert float(err.mean()) < tol * float(ref.abs().mean()), (float(err.mean()), float(ref.abs().mean()))
    strong = ref.abs() > 1.0
    assert bool(strong.any()) and float(((out > 0) == (ref > 0))[strong].float().mean()) > 0.999
    # the same files serve both runtimes: nothing more is exported
    assert len(list(cache.glob("*-encoder.onnx"))) == len(list(cache.glob("*-denoiser.onnx"))) == 1

    base, _ = load_checkpoint(SHIPPED_BASELINE)
    ov_base, _ = engine.onnx_model(SHIPPED_BASELINE, threads=1, runtime="openvino")
    image_b = torch.randn(2, BASE_IN, 70, 45)
    with torch.inference_mode():
        ref_b = base(image_b)
    out_b = ov_base(image_b)
    assert out_b.shape == ref_b.shape
    assert float((out_b - ref_b).abs().mean()) < tol * float(ref_b.abs().mean())


@needs_openvino
def test_openvino_sessions_run_in_several_threads_at_once(cache):
    model, _ = engine.onnx_model(SHIPPED_BASELINE, threads=1, runtime="openvino")
    images = [torch.randn(1, BASE_IN, 48, 40, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    alone = [model(im) for im in images]
    together: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        for _ in range(3):
            together[i] = model(images[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in range(4):  # each call had a request of its own: no result mixed with another thread's
        torch.testing.assert_close(together[i], alone[i])
    assert not torch.equal(alone[0], alone[1])
    assert 1 <= len(model._session._idle) <= 4  # the requests stay with the session, for the next calls


@needs_openvino
@pytest.mark.skipif(sys.platform == "win32", reason="the compile lock is fcntl's")
def test_openvino_compiles_under_a_lock_and_without_the_cache_when_the_cache_fails(cache, monkeypatch):
    """Dask workers starting together once broke each other's OpenVINO cache ("cannot set permissions: No such
    file or directory [...blob]"): cached compiles hold a lock other processes wait on, and a compile that
    fails through the cache is done again without it."""
    import fcntl

    import openvino as ov

    original = ov.Core.compile_model
    calls: list[tuple[bool, bool]] = []  # (through the cache, the lock was held)

    def flaky(self, model, device=None, config=None):
        cached = "CACHE_DIR" in (config or {})
        held = False
        if cached:
            with open(Path(config["CACHE_DIR"]) / ".lock", "a+b") as fh:  # another open file: as another process
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                except BlockingIOError:
                    held = True
        calls.append((cached, held))
        if cached:
            raise RuntimeError("filesystem error: cannot set permissions: No such file or directory")
        return original(self, model, device, config)

    monkeypatch.setattr(ov.Core, "compile_model", flaky)
    model, _ = engine.onnx_model(SHIPPED_BASELINE, threads=1, runtime="openvino")
    assert calls == [(True, True), (False, False)]
    base, _ = load_checkpoint(SHIPPED_BASELINE)
    image = torch.randn(1, BASE_IN, 48, 40, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = base(image)
    out = model(image)
    assert float((out - ref).abs().mean()) < 0.05 * float(ref.abs().mean())
    with open(cache / "openvino" / ".lock", "a+b") as fh:  # released afterwards
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


@needs_openvino
def test_openvino_run_agrees_with_onnxruntime_and_records_its_engine(cache, tmp_path):
    from napari_spinesegdiff import pipeline

    ph = make_phantom(seed=5)
    cfg = SegmentationConfig(steps=3, ensemble=2, slices="5:8")
    a = run(ph.image, cfg.replace(engine="openvino"))
    b = run(ph.image, cfg.replace(engine="onnxruntime"))
    assert a.canonical_labels[5:8].any()
    agree = float(np.mean(a.canonical_labels[5:8] == b.canonical_labels[5:8]))
    assert agree > 0.995, agree
    models = pipeline.load_models(cfg.replace(engine="auto"))
    assert models.engine == "openvino"
    assert a.provenance["engine"] == {"name": "openvino", "precision": models.precision}
    assert b.provenance["engine"] == {"name": "onnxruntime", "precision": "f32"}


def test_an_unknown_runtime_is_refused(cache):
    with pytest.raises(engine.EngineError, match="runtime must be one of"):
        engine.onnx_model(SHIPPED_BASELINE, threads=1, runtime="tensorrt")


def test_engine_settings_are_checked(monkeypatch):
    monkeypatch.setattr(engine, "openvino_available", lambda: False)
    assert engine.resolve_engine("auto", "cpu") == "onnxruntime"
    assert engine.resolve_engine("auto", "cuda") == "torch"  # GPUs stay on torch
    assert engine.resolve_engine("torch", "cpu") == "torch"
    with pytest.raises(engine.EngineError, match="CPU only"):
        engine.resolve_engine("onnxruntime", "cuda")
    with pytest.raises(ValueError, match="engine must be"):
        SegmentationConfig(engine="tensorrt")


def test_auto_prefers_openvino_then_onnxruntime(monkeypatch):
    monkeypatch.setattr(engine, "openvino_available", lambda: True)
    monkeypatch.setattr(engine, "onnxruntime_available", lambda: True)
    assert engine.resolve_engine("auto", "cpu") == "openvino"
    assert engine.resolve_engine("auto", "cuda") == "torch"
    assert engine.resolve_engine("onnxruntime", "cpu") == "onnxruntime"
    with pytest.raises(engine.EngineError, match="CPU only"):
        engine.resolve_engine("openvino", "cuda")
    monkeypatch.setattr(engine, "openvino_available", lambda: False)
    with pytest.raises(engine.EngineError, match="needs the openvino and onnx packages"):
        engine.resolve_engine("openvino", "cpu")


def test_missing_onnxruntime_is_one_sentence(monkeypatch):
    monkeypatch.setattr(engine, "onnxruntime_available", lambda: False)
    monkeypatch.setattr(engine, "openvino_available", lambda: False)
    assert engine.resolve_engine("auto", "cpu") == "torch"
    with pytest.raises(engine.EngineError, match="needs the onnxruntime and onnx packages"):
        engine.resolve_engine("onnxruntime", "cpu")
    from napari_spinesegdiff import pipeline

    with pytest.raises(SegmentationError, match="needs the onnxruntime"):
        pipeline.load_models(SegmentationConfig(engine="onnxruntime"))
