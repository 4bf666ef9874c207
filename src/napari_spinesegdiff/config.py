"""The one frozen configuration of a segmentation run, shared by the CLI, the napari widget and provenance."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

Prior = str  # "baseline", "none", "labels" (an array the caller passes), or a path to a labels file
Device = Literal["auto", "cpu", "cuda", "mps"]
Engine = Literal["auto", "torch", "openvino", "onnxruntime"]
ENGINES: tuple[str, ...] = get_args(Engine)  # the engine names, for validation and the CLI
Fusion = Literal["step_uncertainty", "diffunet"]
Uncertainty = Literal["labels", "steps+prior", "steps"]
UNCERTAINTY_MODES: tuple[str, ...] = get_args(Uncertainty)


@dataclass(frozen=True)
class SegmentationConfig:
    """Every parameter that decides a segmentation result.

    ``checkpoint=None`` means the model shipped inside the package.  ``slices`` is ``"all"``, ``"mid"``
    or ``"A:B"`` (canonical left-right slice indices, Python slice semantics).
    """

    checkpoint: str | None = None
    baseline_checkpoint: str | None = None  # None = the shipped baseline presegmenter
    steps: int = 10  # DDIM steps from t_start down to 0
    t_start: int = 300  # presegmentation noise level (0..T); ignored (= T) when prior is "none"
    ensemble: int = 5  # stochastic samples S, run as one batch
    aggregate_steps: int | None = None  # Ts: last steps fused; None = all steps
    fusion: Fusion = "step_uncertainty"
    # weight of the presegmenter's probabilities in the final ones, (1 - w) diffusion + w presegmentation;
    # only with prior "baseline" (a labels prior is never blended in); 0 = the diffusion alone (the paper);
    # 0.5 was chosen on the validation patients (README, model card)
    baseline_weight: float = 0.5
    # "labels": the binary entropy of the final probability of each written structure (after blending and
    # smoothing: the probability the labels are drawn from), max over structures, scaled so that 0.5 reads
    # 1/e; finds wrong voxels near the structures best (v4 validation, README's model card);
    # "steps": the paper's step-uncertainty map (max over the fused steps of -p log p, at most 1/e);
    # "steps+prior": its voxel-wise max with the presegmentation's own -p log p
    uncertainty: Uncertainty = "labels"
    prior: Prior = "baseline"
    num_classes: int | None = None  # None = take it from the checkpoint; a mismatch is refused
    device: Device = "auto"
    # inference engine: "auto" = on the CPU OpenVINO (bfloat16 where the CPU has it, about 2x faster than
    # torch eager), else ONNX Runtime (float32, about 1.4x), whichever is installed; torch on a GPU;
    # "torch" = torch eager everywhere; float32 engines agree to about 1e-4 in probability, bfloat16 to
    # about 1e-2, Dice to 4e-4 on the validation patients (model.engine, README)
    engine: Engine = "auto"
    seed: int = 0
    slices: str = "all"
    batch_slices: int = 4  # slices denoised together (memory stays flat in the scan's slice count)
    min_component_mm2: float = 10.0  # post-processing: drop 2-D components smaller than this area
    fill_holes: bool = True
    roi_margin_mm: float = 24.0  # refine only the prior's foreground box plus this margin (-1: whole slice)
    single_canal: bool = True  # keep only the largest 3-D connected component of the spinal canal
    # drop every 3-D piece of the labels farther than this (mm) from the spine column (the chain of vertebrae,
    # discs and canal; column.py): strays in the corners of a field of view; 0 = off
    column_margin_mm: float = 20.0
    # Gaussian sigma (mm) across sagittal slices applied to the probabilities before labelling: the diffusion
    # model sees one slice at a time (the 2.5-D presegmenter a few), this makes neighbouring slices agree; 0 = off
    smooth_mm: float = 2.0
    # written vertebra labels: "whole" = 2 vertebra (body + posterior elements, SPIDER and the paper);
    # "split" = 2 vertebral body + 4 posterior elements (needs a four-channel model, v4 on)
    vertebrae: str = "whole"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}.")
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be at least 1, got {self.ensemble}.")
        if self.t_start < 0:
            raise ValueError(f"t_start must be 0 or more, got {self.t_start}.")
        if self.aggregate_steps is not None and self.aggregate_steps < 1:
            raise ValueError(f"aggregate_steps must be at least 1, got {self.aggregate_steps}.")
        if not 0.0 <= self.baseline_weight <= 1.0:
            raise ValueError(f"baseline_weight must be between 0 and 1, got {self.baseline_weight}.")
        if self.column_margin_mm < 0:
            raise ValueError(f"column_margin_mm must be 0 (off) or more, got {self.column_margin_mm}.")
        if self.smooth_mm < 0:
            raise ValueError(f"smooth_mm must be 0 (off) or more, got {self.smooth_mm}.")
        if self.fusion not in ("step_uncertainty", "diffunet"):
            raise ValueError(f"fusion must be 'step_uncertainty' or 'diffunet', got {self.fusion!r}.")
        if self.uncertainty not in UNCERTAINTY_MODES:
            raise ValueError(f"uncertainty must be one of {', '.join(UNCERTAINTY_MODES)}, got {self.uncertainty!r}.")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device must be auto, cpu, cuda or mps, got {self.device!r}.")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be {', '.join(ENGINES)}, got {self.engine!r}.")
        if self.vertebrae not in ("whole", "split"):
            raise ValueError(f"vertebrae must be 'whole' or 'split', got {self.vertebrae!r}.")
        if self.batch_slices < 1:
            raise ValueError(f"batch_slices must be at least 1, got {self.batch_slices}.")
        parse_slices(self.slices, 10**9)  # validates the syntax

    def replace(self, **changes: Any) -> "SegmentationConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_slices(spec: str, n: int) -> range:
    """``"all"`` | ``"mid"`` | ``"A:B"`` -> the range of canonical slice indices (checked against ``n``)."""
    spec = spec.strip()
    if spec == "all":
        return range(n)
    if spec == "mid":
        return range(n // 2, n // 2 + 1)
    parts = spec.split(":")
    try:
        if len(parts) == 1:
            a = int(parts[0])
            b = a + 1
        elif len(parts) == 2:
            a = int(parts[0]) if parts[0] else 0
            b = int(parts[1]) if parts[1] else n
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"slices must be 'all', 'mid', 'K' or 'A:B', got {spec!r}.") from None
    r = range(n)[a:b]
    if len(r) == 0 and n < 10**9:
        raise ValueError(f"slices {spec!r} selects no slice of a scan with {n} sagittal slices.")
    return r
