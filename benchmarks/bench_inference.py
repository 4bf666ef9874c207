"""Inference speed of the shipped model: denoiser pass, slice, 15-slice 320x320 scan.

Prints medians of repeated runs and the ratio between our default setting (presegmentation prior,
S=5, 10 steps) and the reference setting (no prior, S=15, 50 steps), plus the achieved GFLOP/s of the
denoiser against a float32 matmul measured in the same run.  Run:

    python benchmarks/bench_inference.py [--repeats 3] [--threads 2] [--full-reference]

Without ``--full-reference`` the reference setting is timed on 3 slices and scaled to 15 (labelled so);
the full run takes several minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n**3 / median_time(lambda: a @ b, repeats) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full-reference", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from torch.utils.flop_counter import FlopCounterMode

    from napari_spinesegdiff.config import SegmentationConfig
    from napari_spinesegdiff.phantom import make_phantom
    from napari_spinesegdiff.pipeline import load_models, run

    ph = make_phantom(seed=3, spacing=(3.5, 0.625, 0.625), fov_mm=(52.5, 200.0, 200.0))
    scan = ph.image
    n_slices = scan.orientation.canonical_shape[0]
    print(f"scan: canonical shape {scan.orientation.canonical_shape}, spacing {scan.orientation.canonical_spacing}")
    default = SegmentationConfig(prior="baseline", ensemble=5, steps=10, t_start=300)
    reference = SegmentationConfig(prior="none", ensemble=15, steps=50)
    models = load_models(default)
    net = models.diffusion
    ck = models.diffusion_config
    h = w = int(round(320 * 0.625 / ck.spacing_mm[0]))
    print(f"model: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, "
          f"slices resampled to {h}x{w} at {ck.spacing_mm} mm")

    with torch.inference_mode():
        x = torch.rand(5, 1, h, w)
        xt = torch.randn(5, ck.network.num_classes, h, w)
        t = torch.full((5,), 100)
        emb = net.encode(x)
        net(xt, t, x, emb)
        with FlopCounterMode(display=False) as fc:
            net(xt, t, x, emb)
        flops = fc.get_total_flops()
        t_pass = median_time(lambda: net(xt, t, x, emb), args.repeats * 3)
    peak = matmul_gflops()
    print(f"denoiser pass, batch 5 at {h}x{w}: median {t_pass * 1000:.1f} ms "
          f"({t_pass / 5 * 1000:.1f} ms per image), {flops / 1e9:.2f} GFLOP -> {flops / t_pass / 1e9:.1f} GFLOP/s; "
          f"matmul 1024^3: {peak:.1f} GFLOP/s (ratio {flops / t_pass / 1e9 / peak:.2f})")

    t_slice = median_time(lambda: run(scan, default.replace(slices="mid"), models=models, stream_every=0),
                          args.repeats)
    t_scan = median_time(lambda: run(scan, default, models=models, stream_every=0), args.repeats)
    print(f"default (prior, S=5, 10 steps): per slice {t_slice:.2f} s, per {n_slices}-slice scan "
          f"{t_scan:.2f} s (median of {args.repeats})")
    ref_models = load_models(reference)
    if args.full_reference:
        t_ref = median_time(lambda: run(scan, reference, models=ref_models, stream_every=0), 1)
        label = "measured"
    else:
        mid = n_slices // 2
        part = reference.replace(slices=f"{mid - 1}:{mid + 2}", batch_slices=3)
        t_ref = median_time(lambda: run(scan, part, models=ref_models, stream_every=0), 1) * n_slices / 3
        label = f"3 slices measured, scaled to {n_slices}"
    print(f"reference (no prior, S=15, 50 steps): per scan {t_ref:.1f} s ({label})")
    print(f"ratio reference / default per scan: {t_ref / t_scan:.1f}x")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
