"""Whole-process speed of ``spinesegdiff segment``: a 15-slice 320 x 320 scan at 0.7 mm in plane, ensemble 5,
default steps, as a user runs it (start-up, reading, both networks, writing).

Prints per variant the median wall time, user and system CPU seconds and minor page faults of the child
processes, and the ratio to the default.  Variants:

- the default: OpenVINO on the CPU (bfloat16 where the CPU has it), networks from the export cache
  (``model.engine``);
- ``--levels``: the default plus the levels table (every ensemble member labelled, the structures named and
  measured on the final labels and each member; issue 36 allows it 10 % over the default);
- ``--engine onnxruntime``: ONNX Runtime, float32, the same cached files;
- the first run on a fresh machine: an empty export cache, so the networks are built and exported first;
- ``--engine torch``: torch eager (the engine on GPUs);
- ``--engine torch`` with ``SPINESEGDIFF_MALLOC=0``: glibc's allocator untuned, every large activation
  buffer mapped and unmapped (see ``model.device.keep_freed_memory``).

Then one denoiser pass (batch 20 = 4 slices x ensemble 5, 224 x 160 pixels: this scan's region of interest on
the 1 mm model grid) per engine, its floating-point operations counted by torch's FlopCounterMode, the achieved
GFLOP/s beside 2048 x 2048 matmuls (float32 and bfloat16) measured in the same run.  The variants' runs are
interleaved (one of each in turn), so a drift of the machine's speed hits them alike.  Run on an otherwise idle
machine:

    .venv/bin/python benchmarks/bench_cli.py [--repeats 3] [--slices all] [--variants default,onnxruntime,...]
        [--compare-baseline OLD_PRESEGMENTER.safetensors]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


#: the variants' short names, for ``--variants`` (in the order of the printed table)
VARIANTS = ("default", "levels", "onnxruntime", "fresh", "torch", "untuned")


def make_scan(folder: Path) -> Path:
    from napari_spinesegdiff.io.writers import write_volume
    from napari_spinesegdiff.phantom import make_phantom

    ph = make_phantom(seed=3, spacing=(3.5, 0.7, 0.7), fov_mm=(52.5, 224.0, 224.0))
    assert ph.image.orientation.canonical_shape == (15, 320, 320), ph.image.orientation.canonical_shape
    return write_volume(ph.image.data, folder / "scan15.nii.gz", like=ph.image, kind="image", produced_by="bench")


def run_once(scan: Path, out: Path, env: dict[str, str], slices: str, extra: list[str]) -> dict[str, float]:
    exe = Path(sys.executable).with_name("spinesegdiff")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([str(exe), "segment", str(scan), "-o", str(out), "--slices", slices, "--no-progress", *extra],
                   check=True, env=env, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": wall, "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
            "faults": after.ru_minflt - before.ru_minflt}


def _median_seconds(fn, repeats: int = 5) -> float:
    """Median wall time of ``fn`` after one warm-up call."""
    from bench_inference import median_time  # this folder is on sys.path when a benchmark runs as a script

    fn()
    return median_time(fn, repeats)


def throughput() -> list[str]:
    """Achieved GFLOP/s of one denoiser pass per engine, and of a float32 matmul, in this process."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from napari_spinesegdiff.model.checkpoint import load_checkpoint
    from napari_spinesegdiff.model.device import keep_freed_memory
    from napari_spinesegdiff.model.engine import onnx_model
    from napari_spinesegdiff.pipeline import SHIPPED_DIFFUSION

    keep_freed_memory()  # as the CLI runs torch
    torch.manual_seed(0)
    net, cfg = load_checkpoint(SHIPPED_DIFFUSION)
    b, h, w = 20, 224, 160
    image = torch.randn(b, 1, h, w)
    x = torch.randn(b, cfg.network.num_classes, h, w)
    t = torch.full((b,), 150)
    with torch.inference_mode():
        feats = net.encode(image)
        with FlopCounterMode(display=False) as counter:
            net(x, t, image, feats)
    flops = counter.get_total_flops()
    with torch.inference_mode():  # before the other engines start their threads
        t_torch = _median_seconds(lambda: net(x, t, image, feats))
    timed = []
    for runtime in ("openvino", "onnxruntime"):
        served, _ = onnx_model(SHIPPED_DIFFUSION, threads=torch.get_num_threads(), runtime=runtime)
        served_feats = served.encode(image)
        sec = _median_seconds(lambda: served(x, t, image, served_feats))
        timed.append((f"{runtime} ({served.precision})", sec))
    timed.append(("torch eager (f32)", t_torch))
    a = torch.randn(2048, 2048)
    t_mm = _median_seconds(lambda: a @ a)
    mm = 2 * 2048**3 / t_mm / 1e9
    a16 = a.to(torch.bfloat16)
    t_mm16 = _median_seconds(lambda: a16 @ a16)
    lines = [f"one denoiser pass, batch {b} at {h} x {w}: {flops / 1e9:.1f} GFLOP "
             f"({torch.get_num_threads()} threads)",
             "| engine | s per pass | GFLOP/s | share of the float32 matmul's GFLOP/s |", "|---|---|---|---|"]
    for name, sec in timed:
        lines.append(f"| {name} | {sec:.3f} | {flops / sec / 1e9:.1f} | {flops / sec / 1e9 / mm:.0%} |")
    lines.append(f"| float32 matmul 2048 x 2048 | {t_mm:.4f} | {mm:.1f} | 100% |")
    mm16 = 2 * 2048**3 / t_mm16 / 1e9
    lines.append(f"| bfloat16 matmul 2048 x 2048 (torch) | {t_mm16:.4f} | {mm16:.1f} | {mm16 / mm:.0%} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slices", default="all")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated subset of {', '.join(VARIANTS)}")
    ap.add_argument("--no-throughput", action="store_true", help="skip the GFLOP/s measurement")
    ap.add_argument("--compare-baseline", type=Path, default=None, metavar="CKPT",
                    help="add the default with this presegmenter checkpoint as a variant (interleaved)")
    args = ap.parse_args()
    wanted = {v.strip() for v in args.variants.split(",")}
    unknown = wanted - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache")
        fresh = Path(tmp) / "fresh"
        variants = {
            "default (auto: openvino where installed, cached export)": ("default", {"SPINESEGDIFF_CACHE": cache}, []),
            "default with --levels (the levels table and its intervals)": (
                "levels", {"SPINESEGDIFF_CACHE": cache}, ["--levels", str(Path(tmp) / "levels.csv")]),
            "--engine onnxruntime (float32, cached export)": ("onnxruntime", {"SPINESEGDIFF_CACHE": cache},
                                                              ["--engine", "onnxruntime"]),
            "first run on a fresh machine (export included)": ("fresh", {"SPINESEGDIFF_CACHE": str(fresh)}, []),
            "--engine torch": ("torch", {}, ["--engine", "torch"]),
            "--engine torch, allocator untuned (SPINESEGDIFF_MALLOC=0)": ("untuned", {"SPINESEGDIFF_MALLOC": "0"},
                                                                          ["--engine", "torch"]),
        }
        variants = {name: (env, extra) for name, (key, env, extra) in variants.items() if key in wanted}
        to_cache: list[list[str]] = [[]]  # the cached variants' exports, made before the timed runs
        if args.compare_baseline is not None:
            if not args.compare_baseline.is_file():
                ap.error(f"--compare-baseline: no such file: {args.compare_baseline}")
            other = ["--baseline-checkpoint", str(args.compare_baseline)]
            variants[f"default, presegmenter {args.compare_baseline.name} (cached export)"] = (
                {"SPINESEGDIFF_CACHE": cache}, other)
            to_cache.append(other)
        scan = make_scan(Path(tmp))
        out = Path(tmp) / "labels.nii.gz"
        for extra in to_cache:  # fills the cache
            run_once(scan, out, {**os.environ, "SPINESEGDIFF_CACHE": cache}, "mid", extra)
        results, spread = {}, {}
        runs_of: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for _ in range(args.repeats):  # interleaved: one run of each variant in turn
            for name, (env_extra, extra) in variants.items():
                if name.startswith("first run"):
                    subprocess.run(["rm", "-rf", str(fresh)], check=True)
                runs_of[name].append(run_once(scan, out, {**os.environ, **env_extra}, args.slices, extra))
        for name, runs in runs_of.items():
            results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            spread[name] = f"{min(r['wall'] for r in runs):.1f}-{max(r['wall'] for r in runs):.1f}"
        os.environ["SPINESEGDIFF_CACHE"] = cache
        flops_lines = [] if args.no_throughput else throughput()
    base = next(iter(results.values()))["wall"]
    load = os.getloadavg()[0]
    print(f"15-slice 320 x 320 scan (0.7 mm), ensemble 5, 10 steps, slices {args.slices}, "
          f"{os.cpu_count()} CPUs, median of {args.repeats} whole processes; load average {load:.2f} after")
    print("| variant | wall s (median) | min-max | user s | system s | minor page faults | wall / first row |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['wall']:.1f} | {spread[name]} | {r['user']:.1f} | {r['sys']:.1f} | {r['faults']:.0f} | "
              f"{r['wall'] / base:.2f} |")
    print()
    print("\n".join(flops_lines))


if __name__ == "__main__":
    main()
