"""Whole-process speed of ``spinesegdiff segment``: a 15-slice 320 x 320 scan at 0.7 mm in plane, ensemble 5,
default steps, as a user runs it (start-up, reading, both networks, writing).

Prints per variant the median wall time, user and system CPU seconds and minor page faults of the child
processes, and the ratio to the default.  Variants: the default; ``SPINESEGDIFF_MALLOC=0`` (glibc's allocator
untuned: every large activation buffer is mapped and unmapped, see ``model.device.keep_freed_memory``).
Run on an otherwise idle machine:

    .venv/bin/python benchmarks/bench_cli.py [--repeats 3] [--slices all]
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


def make_scan(folder: Path) -> Path:
    from napari_spinesegdiff.io.writers import write_volume
    from napari_spinesegdiff.phantom import make_phantom

    ph = make_phantom(seed=3, spacing=(3.5, 0.7, 0.7), fov_mm=(52.5, 224.0, 224.0))
    assert ph.image.orientation.canonical_shape == (15, 320, 320), ph.image.orientation.canonical_shape
    return write_volume(ph.image.data, folder / "scan15.nii.gz", like=ph.image, kind="image", produced_by="bench")


def run_once(scan: Path, out: Path, env: dict[str, str], slices: str) -> dict[str, float]:
    exe = Path(sys.executable).with_name("spinesegdiff")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([str(exe), "segment", str(scan), "-o", str(out), "--slices", slices, "--no-progress"],
                   check=True, env=env, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": wall, "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
            "faults": after.ru_minflt - before.ru_minflt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slices", default="all")
    args = ap.parse_args()
    variants = {"default": {}, "allocator untuned (SPINESEGDIFF_MALLOC=0)": {"SPINESEGDIFF_MALLOC": "0"}}
    with tempfile.TemporaryDirectory() as tmp:
        scan = make_scan(Path(tmp))
        results = {}
        for name, extra in variants.items():
            env = {**os.environ, **extra}
            runs = [run_once(scan, Path(tmp) / "labels.nii.gz", env, args.slices) for _ in range(args.repeats)]
            results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    base = results["default"]["wall"]
    print(f"15-slice 320 x 320 scan (0.7 mm), ensemble 5, 10 steps, slices {args.slices}, "
          f"{os.cpu_count()} CPUs, median of {args.repeats} whole processes")
    print("| variant | wall s | user s | system s | minor page faults | wall / default |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['wall']:.1f} | {r['user']:.1f} | {r['sys']:.1f} | {r['faults']:.0f} | "
              f"{r['wall'] / base:.2f} |")


if __name__ == "__main__":
    main()
