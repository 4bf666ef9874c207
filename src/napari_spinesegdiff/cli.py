"""``spinesegdiff`` command line: segment scans headless, train models, evaluate them.

Exit codes: 0 success, 1 unexpected error, 2 bad input or arguments (one sentence on stderr), 130 cancelled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from . import __version__

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"spinesegdiff: error: {message}", file=sys.stderr)
    return code


# ------------------------------------------------------------------------------------------ segment
def _add_engine(p) -> None:
    from .config import ENGINES

    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="auto (default): on the CPU OpenVINO (bfloat16 where the CPU has it), else ONNX Runtime, "
                        "whichever is installed; torch on a GPU; torch: torch eager; onnxruntime: float32 on the CPU")


def _add_uncertainty_mode(p) -> None:
    from .config import UNCERTAINTY_MODES, SegmentationConfig

    p.add_argument("--uncertainty-mode", choices=UNCERTAINTY_MODES, default=SegmentationConfig.uncertainty,
                   help="labels (default): the entropy of the final probability of each written structure, the map "
                        "that finds wrong voxels best; steps: the paper's step-uncertainty map; steps+prior: its "
                        "max with the presegmentation's own -p log p")


def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment one scan (labels, uncertainty, probabilities)",
                       description="Segment a sagittal lumbar MRI with the diffusion model.")
    p.add_argument("scan", type=Path, help="NIfTI, MetaImage, NRRD file or DICOM folder/file")
    p.add_argument("-o", "--output", type=Path, required=True, help="labels file (.nii.gz, .nii, .mha)")
    p.add_argument("--uncertainty", type=Path, help="write the uncertainty map here")
    p.add_argument("--probabilities", type=Path,
                   help="write per-class probabilities here (one file per class, suffixed _<class>)")
    p.add_argument("--checkpoint", help="diffusion checkpoint (default: the shipped model)")
    p.add_argument("--baseline-checkpoint", help="baseline presegmenter checkpoint (default: shipped)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps from t_start to 0 (default 10)")
    p.add_argument("--t-start", type=int, default=300, help="presegmentation noise level 0..1000 (default 300)")
    p.add_argument("--ensemble", type=int, default=5, help="stochastic samples S (default 5)")
    p.add_argument("--aggregate-steps", type=int, help="fuse only the last Ts steps (default all)")
    p.add_argument("--fusion", choices=["step_uncertainty", "diffunet"], default="step_uncertainty")
    _add_uncertainty_mode(p)
    p.add_argument("--prior", default="baseline", help="baseline | none | PATH to a labels file (default baseline)")
    _blend_and_smoothing_args(p)
    p.add_argument("--classes", type=int, help="expected number of classes (checked against the checkpoint)")
    p.add_argument("--vertebrae", choices=["whole", "split"], default="whole",
                   help="whole (default): label 2 = the whole vertebra, as in SPIDER; split: 2 = vertebral "
                        "body and 4 = posterior elements (v4 models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    _add_engine(p)
    p.add_argument("--slices", default="all", help="all | mid | A:B (canonical left-right slice indices)")
    p.add_argument("--batch-slices", type=int, default=4, help="slices denoised together (memory)")
    p.add_argument("--truth", type=Path, help="ground-truth labels: print Dice per class")
    p.add_argument("--levels", type=Path,
                   help="write the levels table here (.csv or .parquet): a row per vertebra, disc and canal level, "
                        "heights, depths, ratios, canal diameter and slip in mm with their 90 %% intervals")
    p.add_argument("--instances", type=Path,
                   help="write the instance map here (scan's geometry, SPIDER's values: canal 100, vertebrae "
                        "from L5 = 1 upward, sacrum 25, discs from L5-S1 = 201 upward)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_segment)


def _blend_and_smoothing_args(p) -> None:
    from .config import SegmentationConfig

    d = SegmentationConfig()
    p.add_argument("--baseline-weight", type=float, default=d.baseline_weight,
                   help="weight of the presegmentation in the final probabilities, 0..1 (0 = the diffusion "
                        f"alone; default {d.baseline_weight})")
    p.add_argument("--smooth-mm", type=float, default=d.smooth_mm,
                   help="Gaussian sigma in mm across sagittal slices applied to the probabilities before "
                        f"labelling (0 = off; default {d.smooth_mm})")
    p.add_argument("--column-margin-mm", type=float, default=d.column_margin_mm,
                   help="drop labelled 3-D pieces farther than this from the spine column (the chain of "
                        f"vertebrae, discs and canal; 0 = off; default {d.column_margin_mm:g})")


class Cancelled(KeyboardInterrupt):
    """SIGTERM during ``segment``: handled like Ctrl+C (nothing partial is left behind)."""


@contextlib.contextmanager
def _sigterm_cancels():
    """Turn SIGTERM into :class:`Cancelled` (a ``KeyboardInterrupt``) while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        raise Cancelled(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _segment_inputs(args, cfg, volume=None) -> dict[str, Path]:
    """Every file the run reads (role -> path): no output may be one of them."""
    from .io.readers import _detached_data_files, dicom_files_in, file_suffix, is_dicom_file
    from .pipeline import SHIPPED_BASELINE, SHIPPED_DIFFUSION

    inputs: dict[str, Path] = {"input scan": args.scan}
    if volume is not None:  # the header's data file, the other half of a pair, every file of a DICOM series
        for f in volume.meta.get("source_files", []):
            if Path(f).resolve() != args.scan.resolve():
                inputs[f"input scan's file {Path(f).name}"] = Path(f)
    elif args.scan.is_file() and file_suffix(args.scan) in (".mha", ".mhd", ".nrrd", ".nhdr"):
        for f in _detached_data_files(args.scan):
            inputs[f"input scan's data file {f.name}"] = f
    elif args.scan.is_dir() or is_dicom_file(args.scan):  # the DICOM files the series may be read from
        for f in dicom_files_in(args.scan if args.scan.is_dir() else args.scan.parent, limit=5000):
            if f.resolve() != args.scan.resolve():
                inputs[f"input scan's file {f.name}"] = f
    inputs["diffusion checkpoint"] = Path(cfg.checkpoint) if cfg.checkpoint else SHIPPED_DIFFUSION
    if cfg.prior == "baseline":
        inputs["baseline checkpoint"] = (Path(cfg.baseline_checkpoint) if cfg.baseline_checkpoint
                                         else SHIPPED_BASELINE)
    elif cfg.prior != "none":
        inputs["prior labels file"] = Path(cfg.prior)
    if args.truth is not None:
        inputs["truth file"] = args.truth
    return inputs


def _segment_outputs(args, class_names=None) -> dict[str, Path]:
    """Every file the run writes (role -> path); per-class probability files once the classes are known."""
    outputs = {"labels": args.output, "sidecar JSON": _sidecar(args.output)}
    if getattr(args, "levels", None) is not None:
        outputs["levels table"] = args.levels
    if args.uncertainty is not None:
        outputs["uncertainty map"] = args.uncertainty
    if getattr(args, "instances", None) is not None:
        outputs["instance map"] = args.instances
    if args.probabilities is not None:
        if class_names is None:
            outputs["probabilities"] = args.probabilities
        else:
            for name in class_names:
                outputs[f"{name} probability map"] = _suffixed(args.probabilities, name.replace(" ", "_"))
    return outputs


def _check_segment_paths(args, cfg, volume=None, class_names=None) -> None:
    from .io.outputs import check_outputs

    if getattr(args, "levels", None) is not None:
        from .report.table import check_table_path

        check_table_path(args.levels)
    check_outputs(_segment_outputs(args, class_names), _segment_inputs(args, cfg, volume),
                  text_outputs=["sidecar JSON", "levels table"])


def _planned_class_names(cfg) -> list[str] | None:
    """The diffusion checkpoint's class names, read from its metadata only (None: known after loading)."""
    from .pipeline import SHIPPED_DIFFUSION

    path = Path(cfg.checkpoint) if cfg.checkpoint else SHIPPED_DIFFUSION
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from .model.checkpoint import read_config

    config = read_config(path)
    return list(config.class_names) if config is not None else None


def cmd_segment(args) -> int:
    """Check every input and output path first, run the model, then write all outputs or none.

    Outputs are written to temporaries beside their targets and moved into place together at the end;
    Ctrl+C or SIGTERM at any point leaves the complete set or nothing, and no temporary file.
    """
    from .io.guard import check_input_path, check_signal
    from .io.outputs import OutputSet
    from .io.readers import read_volume
    from .pipeline import Progress, run

    try:
        cfg = _config_from_args(args)
        check_input_path(args.scan)  # missing, a looping or broken link, unreadable: before anything else
        _check_segment_paths(args, cfg)  # cheap: before the scan is even read
        volume = read_volume(args.scan, kind="image")
        check_signal(volume)
        truth = read_volume(args.truth, kind="labels") if args.truth is not None else None
        class_names = _planned_class_names(cfg)
        _check_segment_paths(args, cfg, volume, class_names)  # with the scan's own files and class names
    except ValueError as exc:
        return _fail(str(exc))

    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=1, desc="segment", unit="step", file=sys.stderr)

    def on_event(ev) -> None:
        if bar is not None and isinstance(ev, Progress):
            bar.total = ev.total
            bar.n = ev.done
            bar.set_postfix_str(ev.message[:60])
            bar.refresh()

    with _sigterm_cancels():
        try:
            result = run(volume, cfg, callback=on_event, stream_every=0, keep_samples=args.levels is not None)
        except KeyboardInterrupt:
            return _fail("cancelled; no output was written.", EXIT_CANCELLED)
        except ValueError as exc:
            return _fail(str(exc))
        except MemoryError:  # the estimate before the run (io.limits) missed: still one sentence
            return _fail(f"the run on {args.scan} ran out of memory; no output was written.", EXIT_ERROR)
        finally:
            if bar is not None:
                bar.close()
        try:
            if class_names is None:  # a checkpoint without our metadata: its classes are known only now
                _check_segment_paths(args, cfg, volume, result.class_names)
            prov = dict(result.provenance)
            with OutputSet() as out:
                written = {"labels": str(out.add_volume(result.labels.data, args.output, like=volume,
                                                        kind="labels", produced_by=prov))}
                if args.uncertainty:
                    written["uncertainty"] = str(out.add_volume(result.uncertainty.data, args.uncertainty,
                                                                like=volume, kind="image", produced_by=prov))
                if args.probabilities:
                    for name, vol in zip(result.class_names, result.probabilities):
                        path = _suffixed(args.probabilities, name.replace(" ", "_"))
                        written[f"probability {name}"] = str(out.add_volume(vol.data, path, like=volume,
                                                                            kind="image", produced_by=prov))
                instances = None
                if args.instances is not None or args.levels is not None:
                    from .report.instances import find_instances

                    instances = find_instances(result.canonical_labels, result.labels.orientation.canonical_spacing,
                                               vertebrae=cfg.vertebrae)
                    prov["levels_anchor"], prov["levels_flags"] = instances.anchor, list(instances.flags)
                if args.instances is not None:
                    written["instances"] = str(out.add_volume(
                        volume.with_canonical(instances.canonical, kind="labels").data, args.instances,
                        like=volume, kind="labels", produced_by=prov))
                if args.levels is not None:
                    from .report.levels import levels_for_result
                    from .report.table import write_levels_table

                    levels = levels_for_result(result, cfg.vertebrae, instances=instances)
                    written["levels"] = str(write_levels_table(levels, args.levels, outputs=out))
                prov["outputs"] = written
                if truth is not None:
                    prov["dice"] = _print_dice(result.labels, truth, cfg.vertebrae)
                sidecar = out.add_text(_sidecar(args.output), json.dumps(prov, indent=1, default=str))
                out.commit()
        except KeyboardInterrupt:
            return _fail("cancelled; no output was written.", EXIT_CANCELLED)
        except ValueError as exc:
            return _fail(str(exc))
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            return _fail(f"the outputs could not be written ({reason}), so none was written.", EXIT_ERROR)
    t = prov["timings"]["total_s"]
    print(f"wrote {args.output} ({len(result.slices)} slices, {t:.1f} s) and {sidecar.name}")
    return EXIT_OK


def _print_dice(labels, truth_path, vertebrae: str) -> dict[str, float]:
    """Dice per written label against a truth file (a path or the volume read from it) in the same scheme
    (phantom --vertebrae, SPIDER)."""
    from .evaluation.metrics import dice
    from .io.labels import to_classes
    from .io.readers import read_volume
    from .labelscheme import label_names

    truth_volume = truth_path if hasattr(truth_path, "canonical") else read_volume(truth_path, kind="labels")
    truth = to_classes(truth_volume.canonical())
    pred = labels.canonical()
    scores = {}
    for value, name in label_names(vertebrae).items():
        if (truth == value).any() or (pred == value).any():
            scores[name] = float(dice(pred == value, truth == value))
            print(f"Dice {name}: {scores[name]:.4f}")
    return scores


def _suffixed(path: Path, tag: str) -> Path:
    from .io.readers import file_stem, file_suffix

    return path.with_name(f"{file_stem(path)}_{tag}{file_suffix(path)}")


def _sidecar(path: Path) -> Path:
    from .io.readers import file_stem

    return path.with_name(file_stem(path) + ".json")


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------- train
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the diffusion model or the baseline presegmenter",
                       description="Train on sagittal slices. Data sources: lumbar:PATH, slabs:PATH, spider:PATH, "
                                   "nnunet:PATH, phantom:N[:SEED] (repeat --data). Under torchrun it runs "
                                   "DistributedDataParallel.")
    p.add_argument("--kind", choices=["diffusion", "baseline"], default="diffusion")
    p.add_argument("--data", action="append", required=True, help="data source (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log.csv)")
    p.add_argument("--splits", type=Path, help="patient-level folds JSON (created if missing)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--preset", default="small", help="network preset: tiny | small | medium | midl2025")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, nargs=2, default=(160, 160))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--phantom-share", type=float, default=0.3, help="share of batches drawn from phantoms")
    p.add_argument("--source-share", action="append", default=[], metavar="SOURCE=SHARE",
                   help="a real source's share of the real batches, e.g. lumbar=0.6 (repeatable; the sources "
                        "not named split the rest equally; default: all sources equal)")
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--spacing", type=float, nargs=2, default=(1.0, 1.0), help="model in-plane spacing (mm)")
    p.add_argument("--soft-targets", action="store_true",
                   help="partial-volume targets: each model pixel's share of a structure, so boundaries fall "
                        "between model pixels (the image is then resampled as at inference)")
    p.add_argument("--context", type=int, default=0,
                   help="baseline only: neighbouring slices on each side as extra input channels (2.5-D; "
                        "0 = the slice alone)")
    p.add_argument("--context-mm", type=float, default=2.0,
                   help="how far away the neighbouring slices are (mm; the nearest slice, at least the adjacent)")
    p.add_argument("--mirror", action="store_true",
                   help="with --context: half the crops with the neighbours on either side swapped (the patient "
                        "mirrored left to right)")
    p.add_argument("--randomize-contrast", type=float, default=0.0, metavar="P",
                   help="the share of training crops given a random contrast (inversion, random curves, "
                        "per-structure intensities, bias, blur, thick slices, noise); both kinds; default 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--init", help="start from these weights")
    p.add_argument("--prior", help="diffusion only: a baseline checkpoint; a share of the low-t samples starts "
                                   "from its prediction noised to t, as at inference with presegmentation")
    p.add_argument("--prior-share", type=float, default=0.5,
                   help="share of low-t samples that start from --prior (default 0.5)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last_state.pt")
    p.add_argument("--stop-at", type=int, help="stop after this iteration (checkpointed; resume later), keeping "
                                             "the learning-rate schedule of --iterations")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)


def _parse_shares(specs: list[str]) -> tuple[tuple[str, float], ...]:
    """``["lumbar=0.6"]`` -> ``(("lumbar", 0.6),)``; one clear sentence for a malformed item."""
    out: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            share = float(value)
        except ValueError:
            share = None
        if not sep or not name.strip() or share is None:
            raise ValueError(f"--source-share expects SOURCE=SHARE (for example lumbar=0.6), got {spec!r}")
        if name.strip() in out:
            raise ValueError(f"--source-share names {name.strip()} twice")
        out[name.strip()] = share
    return tuple(out.items())


def cmd_train(args) -> int:
    from .training.recipe import balanced_weights, gather, split_cases
    from .training.train import TrainConfig, train

    try:
        source_shares = _parse_shares(args.source_share)
    except ValueError as exc:
        return _fail(str(exc))
    if not 0.0 <= args.randomize_contrast <= 1.0:
        return _fail(f"--randomize-contrast is a share of the crops, between 0 and 1; got {args.randomize_contrast}")
    from .model.device import DeviceError, resolve_device

    try:  # before the data are read: a device this machine lacks is one sentence, not a traceback later
        resolve_device(args.device)
    except DeviceError as exc:
        return _fail(str(exc))
    t0 = time.perf_counter()
    try:
        cases = gather(args.data, tuple(args.spacing), soft=args.soft_targets)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    if not cases:
        return _fail("no training cases were found in the given --data sources.")
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 writes the splits file
    train_cases, val_cases, split = split_cases(cases, args.splits, args.folds, args.fold, args.seed,
                                                write=rank0)
    try:
        balanced_weights(train_cases, args.phantom_share, dict(source_shares))
    except ValueError as exc:
        return _fail(str(exc))
    print(f"{len(train_cases)} training cases, {len(val_cases)} validation cases, "
          f"{len(split['test'])} test patients held out; data ready in {time.perf_counter() - t0:.0f} s")
    cfg = TrainConfig(kind=args.kind, preset=args.preset, iterations=args.iterations,
                      batch_size=args.batch_size, crop=tuple(args.crop), lr=args.lr, warmup=args.warmup,
                      phantom_share=args.phantom_share, source_shares=source_shares,
                      spacing_mm=tuple(args.spacing), soft_targets=args.soft_targets,
                      context=args.context, context_mm=args.context_mm, mirror=args.mirror,
                      randomize_contrast=args.randomize_contrast,
                      val_every=args.val_every, seed=args.seed,
                      threads=args.threads, device=args.device, init=args.init, prior=args.prior,
                      prior_share=args.prior_share, stop_at=args.stop_at, data=list(args.data),
                      command="spinesegdiff " + " ".join(sys.argv[1:]))
    best = train(cfg, train_cases, val_cases, args.out, resume=args.resume, progress=not args.no_progress)
    print(f"best checkpoint: {best}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------- evaluate
def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice / HD95 / uncertainty AUROC on held-out cases, with a report")
    p.add_argument("--data", action="append", required=True,
                   help="lumbar:PATH | slabs:PATH | spider:PATH | nnunet:PATH | phantom:N:SEED")
    p.add_argument("--splits", type=Path, help="folds JSON: evaluate only the test patients of --fold")
    p.add_argument("--subset", choices=["test", "val"], default="test",
                   help="with --splits: the fold's test patients (default) or its validation patients, "
                        "to choose settings without looking at the test set")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--checkpoint", help="diffusion checkpoint (default: shipped)")
    p.add_argument("--baseline-checkpoint", help="baseline checkpoint (default: shipped)")
    p.add_argument("--out", type=Path, required=True, help="folder for CSV, report.md and figures")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--t-start", type=int, default=300)
    p.add_argument("--ensemble", type=int, default=5)
    _blend_and_smoothing_args(p)
    p.add_argument("--methods", default="presegmentation,diffusion,default",
                   help="comma-separated: presegmentation (baseline alone), diffusion (diffusion output alone), "
                        "default (the blend); default all three")
    p.add_argument("--sweep", action="store_true", help="also sweep steps / t_start / ensemble (slow)")
    p.add_argument("--contrast-suite", action="store_true",
                   help="instead: the contrast suite, every case unchanged and under each of --transforms "
                        "(contrast_per_case.csv, contrast.md)")
    p.add_argument("--transforms", default="none,inverted,curve,gamma,bias,noise,thick,coarse",
                   help="with --contrast-suite, comma-separated: none, inverted, curve, gamma, bias, noise, "
                        "thick (3.6 mm slices), coarse (1.2 mm pixels); default all")
    p.add_argument("--contrast-seed", type=int, default=0, help="with --contrast-suite: the transforms' seed")
    p.add_argument("--middle-mm", type=float,
                   help="with --contrast-suite: segment and score only the middle MM of every scan "
                        "(default: every slice)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    _add_engine(p)
    _add_uncertainty_mode(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from .config import SegmentationConfig
    from .evaluation.contrast_suite import contrast_suite
    from .evaluation.evaluate import evaluate

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        cfg = SegmentationConfig(checkpoint=args.checkpoint, baseline_checkpoint=args.baseline_checkpoint,
                                 steps=args.steps, t_start=args.t_start, ensemble=args.ensemble, seed=args.seed,
                                 device=args.device, baseline_weight=args.baseline_weight,
                                 smooth_mm=args.smooth_mm, engine=args.engine, uncertainty=args.uncertainty_mode,
                                 column_margin_mm=args.column_margin_mm)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if args.contrast_suite:
            report = contrast_suite(args.data, cfg, args.out, splits=args.splits, fold=args.fold,
                                    subset=args.subset, methods=methods, seed=args.contrast_seed,
                                    transforms=[t.strip() for t in args.transforms.split(",") if t.strip()],
                                    middle_mm=args.middle_mm)
        else:
            report = evaluate(args.data, cfg, args.out, splits=args.splits, fold=args.fold, sweep=args.sweep,
                              subset=args.subset, methods=methods)
    except ValueError as exc:
        return _fail(str(exc))
    print(f"wrote {report}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ phantom
def _add_phantom(sub) -> None:
    p = sub.add_parser("phantom", help="write a synthetic lumbar spine scan (and its truth) to try things on")
    p.add_argument("output", type=Path, help="scan file (.nii.gz, .nii, .mha)")
    p.add_argument("--truth", type=Path, help="also write the ground-truth labels here")
    p.add_argument("--contrast", choices=["T2w", "T1w"], default="T2w")
    p.add_argument("--degenerated", type=int, default=0, help="number of degenerated discs")
    p.add_argument("--vertebrae", choices=["whole", "split"], default="whole",
                   help="truth labels: whole (default) 2 = whole vertebra; split: 2 = body, 4 = posterior elements")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_phantom)


def cmd_phantom(args) -> int:
    from .io.writers import write_volume
    from .phantom import make_phantom

    ph = make_phantom(seed=args.seed, contrast=args.contrast, degenerated=args.degenerated)
    note = f"spinesegdiff {__version__} phantom seed {args.seed}"
    write_volume(ph.image.data, args.output, like=ph.image, kind="image", produced_by=note)
    if args.truth:
        write_volume(ph.truth(args.vertebrae).data, args.truth, like=ph.image, kind="labels", produced_by=note)
    print(f"wrote {args.output}" + (f" and {args.truth}" if args.truth else ""))
    return EXIT_OK


# ------------------------------------------------------------------------------------------ measure
def _add_measure(sub) -> None:
    p = sub.add_parser("measure", help="measure any label map level by level (the levels table, no intervals)",
                       description="Measure a label map (the project's schemes, SPIDER's instance scheme, a manual "
                                   "segmentation) with the code and columns of segment --levels.")
    p.add_argument("labels", type=Path, help="labels file (NIfTI, MetaImage, NRRD)")
    p.add_argument("--image", type=Path, help="the scan the labels belong to (its geometry wins)")
    p.add_argument("-o", "--output", type=Path, required=True, help="levels table (.csv or .parquet)")
    p.set_defaults(func=cmd_measure)


def cmd_measure(args) -> int:
    from .io.outputs import check_outputs
    from .io.readers import read_volume
    from .report.levels import levels_for_labels
    from .report.table import check_table_path, write_levels_table

    try:
        check_table_path(args.output)
        inputs = {"labels file": args.labels, **({"scan": args.image} if args.image else {})}
        check_outputs({"levels table": args.output}, inputs, text_outputs=["levels table"])
        for role, path in inputs.items():
            if not path.exists():
                return _fail(f"The {role} {path} does not exist.")
        labels = read_volume(args.labels, kind="labels")
        image = read_volume(args.image, kind="image") if args.image else None
        rows = levels_for_labels(labels, image)
        if not rows:
            return _fail(f"{args.labels} holds no vertebra, disc or canal to measure.")
        write_levels_table(rows, args.output)
    except ValueError as exc:
        return _fail(str(exc))
    print(f"wrote {args.output} ({len(rows)} rows)")
    return EXIT_OK


# -------------------------------------------------------------------------------------------- batch
EXIT_SOME_FAILED = 3  # batch: every scan was tried and at least one failed (see results.csv)


def _segmentation_settings_args(p) -> None:
    """The settings of ``segment`` that decide a result (defaults from SegmentationConfig)."""
    from .config import SegmentationConfig

    d = SegmentationConfig()
    p.add_argument("--checkpoint", help="diffusion checkpoint (default: the shipped model)")
    p.add_argument("--baseline-checkpoint", help="baseline presegmenter checkpoint (default: shipped)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"DDIM steps from t_start to 0 (default {d.steps})")
    p.add_argument("--t-start", type=int, default=d.t_start,
                   help=f"presegmentation noise level 0..1000 (default {d.t_start})")
    p.add_argument("--ensemble", type=int, default=d.ensemble, help=f"stochastic samples S (default {d.ensemble})")
    p.add_argument("--aggregate-steps", type=int, help="fuse only the last Ts steps (default all)")
    p.add_argument("--fusion", choices=["step_uncertainty", "diffunet"], default=d.fusion)
    _add_uncertainty_mode(p)
    p.add_argument("--prior", choices=["baseline", "none"], default="baseline",
                   help="baseline (default): the shipped presegmenter; none: from pure noise")
    _blend_and_smoothing_args(p)
    p.add_argument("--classes", type=int, help="expected number of classes (checked against the checkpoint)")
    p.add_argument("--vertebrae", choices=["whole", "split"], default=d.vertebrae,
                   help="whole (default): label 2 = the whole vertebra; split: 2 = vertebral body and "
                        "4 = posterior elements (v4 models)")
    p.add_argument("--seed", type=int, default=d.seed, help="the same seed for every scan (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=d.device)
    _add_engine(p)
    p.add_argument("--slices", default=d.slices, help="all | mid | A:B (canonical left-right slice indices)")
    p.add_argument("--batch-slices", type=int, default=d.batch_slices, help="slices denoised together (memory)")


def _config_from_args(args):
    from .config import SegmentationConfig

    return SegmentationConfig(
        checkpoint=args.checkpoint, baseline_checkpoint=args.baseline_checkpoint, steps=args.steps,
        t_start=args.t_start, ensemble=args.ensemble, aggregate_steps=args.aggregate_steps,
        fusion=args.fusion, uncertainty=args.uncertainty_mode, prior=args.prior, num_classes=args.classes,
        device=args.device, seed=args.seed, slices=args.slices, batch_slices=args.batch_slices,
        baseline_weight=args.baseline_weight, smooth_mm=args.smooth_mm, vertebrae=args.vertebrae,
        engine=args.engine, column_margin_mm=args.column_margin_mm,
    )


def _add_batch(sub) -> None:
    p = sub.add_parser(
        "batch", help="segment a cohort: a folder, glob or table of scans -> mirrored outputs + results table",
        description="Segment many scans with one configuration. Outputs mirror the input tree under OUTDIR "
                    "(<name>_labels, <name>_uncertainty, <name>_levels.parquet, <name>.json) with "
                    "OUTDIR/results.parquet and results.csv (one row per scan: status, error, volumes, "
                    "uncertainty, QA flags, the level report's findings) and OUTDIR/levels.parquet and "
                    "levels.csv (one row per scan and structure). Scans "
                    "whose outputs exist for the same input, model and settings are skipped, so a stopped "
                    "batch continues where it stopped. Exit codes: 0 every scan ok or skipped, 3 some scans "
                    "failed (rows with their error), 2 bad arguments, 130 cancelled.")
    p.add_argument("input", help="folder (recursive: NIfTI, MetaImage, NRRD, DICOM series folders), glob "
                                 "pattern (quote it), or a CSV/Parquet table with a 'path' column")
    p.add_argument("-o", "--output-dir", type=Path, required=True, help="output folder (OUTDIR)")
    p.add_argument("--workers", type=int,
                   help="local worker processes (default: cores // threads-per-worker, limited by memory; "
                        "0 = in this process)")
    p.add_argument("--threads-per-worker", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="send the scans to a Dask distributed scheduler (tcp://host:8786), or 'local:N' for a "
                        "LocalCluster of N worker processes; workers must see the inputs and OUTDIR at the "
                        "same paths")
    p.add_argument("--format", choices=["nii.gz", "nii", "mha", "nrrd"], default="nii.gz",
                   help="output file format (default nii.gz)")
    p.add_argument("--report", action="store_true",
                   help="also write <name>_report.png: the mid-sagittal slice with the level names, the measured "
                        "lines and the measurements (needs matplotlib; drawn from the outputs of scans already "
                        "done)")
    _segmentation_settings_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_batch)


def cmd_batch(args) -> int:
    from .batch import LEVELS_CSV, LEVELS_PARQUET, BatchError, run_batch

    if args.workers is not None and args.workers < 0:
        return _fail(f"--workers must be 0 or more, got {args.workers}.")
    try:
        cfg = _config_from_args(args)
        summary = run_batch(args.input, args.output_dir, cfg, workers=args.workers, scheduler=args.scheduler,
                            threads=args.threads_per_worker, suffix="." + args.format, report=args.report,
                            progress=not args.no_progress)
    except (BatchError, ValueError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"the batch cannot write its outputs ({exc}).", EXIT_ERROR)
    ok, skipped, failed = (summary.count(s) for s in ("ok", "skipped", "failed"))
    print(f"{len(summary.rows)} scans: {ok} ok, {skipped} skipped, {failed} failed; "
          f"wrote {summary.parquet}, {summary.csv.name}, {LEVELS_PARQUET} and {LEVELS_CSV}")
    for row in summary.rows:
        if row.get("status") == "failed":
            print(f"failed: {row['scan']}: {row['error']}", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinesegdiff", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"spinesegdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_phantom(sub)
    _add_batch(sub)
    _add_measure(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _fail("cancelled.", EXIT_CANCELLED)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
