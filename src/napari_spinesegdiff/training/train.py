"""Training of the diffusion model and of the baseline presegmenter (one loop, two kinds).

* diffusion: x0 = 2y - 1 is noised to a random t (``q_sample``); pixels whose label is unknown get pure
  noise instead, and the loss is masked there.  t is drawn uniformly on [0, T) half of the time and on
  [0, ``t_focus``) otherwise, because presegmented inference only visits small t.
* baseline: a plain U-Net on the image alone (Dice + BCE).

AdamW with linear warm-up then cosine decay, gradient clipping, a CSV log, checkpoints with the embedded
config (``last.safetensors`` every ``val_every`` iterations, resumable with its optimiser state in a
``.pt`` beside it; ``best.safetensors`` chosen on the validation split only).  Runs on one CPU, one GPU or
under ``torchrun`` (DistributedDataParallel: each rank draws different batches; rank 0 writes).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..labelscheme import CHANNELS
from ..model.sampler import logits_to_x0
from ..preprocess import context_stack
from .batches import SliceBatches
from .data import NUM_CLASSES, TrainCase
from .losses import segdiff_loss

CLASS_NAMES = list(CHANNELS)


@dataclass
class TrainConfig:
    kind: str = "diffusion"  # or "baseline"
    preset: str = "small"
    iterations: int = 2000
    batch_size: int = 8
    crop: tuple[int, int] = (160, 160)
    lr: float = 1e-3
    weight_decay: float = 1e-3
    warmup: int = 100
    t_focus: int = 400
    phantom_share: float = 0.3
    source_shares: tuple[tuple[str, float], ...] = ()  # (source, share of the real batches); others equal
    spacing_mm: tuple[float, float] = (1.0, 1.0)
    soft_targets: bool = False  # partial-volume targets on the model grid (training.data._finish)
    context: int = 0  # baseline only: neighbouring slices on each side as input channels (2.5-D)
    context_mm: float = 2.0  # how far away they lie (preprocess.context_stack)
    mirror: bool = False  # 2.5-D only: half the crops with the neighbours reversed (a left-right mirror)
    randomize_contrast: float = 0.0  # share of crops with a random contrast (training.randomize)
    val_every: int = 250
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    init: str | None = None  # start from these weights (fine-tuning)
    prior: str | None = None  # diffusion only: a baseline checkpoint whose predictions are noised as inputs
    prior_share: float = 0.5  # share of low-t samples that start from the prior instead of the truth
    stop_at: int | None = None  # stop (checkpointed) after this iteration, keeping the schedule of `iterations`
    data: list[str] = field(default_factory=list)
    command: str = ""


def _lr_at(it: int, cfg: TrainConfig) -> float:
    if it < cfg.warmup:
        return cfg.lr * (it + 1) / cfg.warmup
    frac = (it - cfg.warmup) / max(1, cfg.iterations - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def build_model(cfg: TrainConfig):
    from ..model.baseline import BaselineNet
    from ..model.network import PRESETS, SpineSegDiffNet

    net_cfg = dataclasses.replace(PRESETS[cfg.preset], num_classes=NUM_CLASSES)
    if cfg.context < 0 or (cfg.context and cfg.kind != "baseline"):
        raise ValueError("context (neighbouring slices as input channels) is for the baseline presegmenter only.")
    if cfg.mirror and not cfg.context:
        raise ValueError("mirror (the neighbours swapped) needs a 2.5-D presegmenter: give --context too.")
    if cfg.kind == "baseline":
        net_cfg = dataclasses.replace(net_cfg, in_channels=2 * cfg.context + 1)
        return BaselineNet(net_cfg), net_cfg
    if cfg.kind == "diffusion":
        return SpineSegDiffNet(net_cfg), net_cfg
    raise ValueError(f"kind must be 'diffusion' or 'baseline', got {cfg.kind!r}.")


def load_init_weights(net: torch.nn.Module, state: dict[str, torch.Tensor], log: Callable[[str], None] = print) -> None:
    """Start ``net`` from ``state`` (fine-tuning).  A three-channel model (v1-v3: canal, vertebral body,
    disc) grows into the four-channel layout: every tensor whose size differs by one along a single axis
    (the denoiser's mask input, the output convolution and its bias) keeps its old slices.  The new
    whole-vertebra output starts as a copy of the vertebral-body output (the second-to-last old slice); the
    new whole-vertebra input starts at zero, so the grown network computes exactly what the old one did.
    A one-slice presegmenter grows into a 2.5-D one (image channels 1 -> 2k + 1): the old input weights
    become the centre slice's, the neighbours' start at zero, so again it starts as the old network."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"The initial weights lack {len(missing)} tensors of this network (e.g. {missing[0]}).")
    first = "unet.conv_0.conv_0.conv.weight"
    if first in state and first in own and state[first].shape[0] < own[first].shape[0]:
        net.load_state_dict(widen_basic_unet(state, own))
        log(f"widened a presegmenter from {state[first].shape[0]} to {own[first].shape[0]} first-level features "
            "(the new channels start unread, so it computes what the narrow one did)")
        return
    grown = 0
    for key, old in state.items():
        if key not in own:
            raise ValueError(f"The initial weights have a tensor {key} that this network does not.")
        new = own[key]
        if old.shape == new.shape:
            own[key] = old
            continue
        diff = [d for d in range(old.ndim) if old.shape[d] != new.shape[d]]
        if diff == [1] and old.ndim == 4 and old.shape[1] == 1 and new.shape[1] % 2 == 1:
            grown_in = torch.zeros_like(new)
            grown_in[:, new.shape[1] // 2] = old[:, 0]
            own[key] = grown_in
            log(f"grew {key} from 1 to {new.shape[1]} image channels (the neighbouring slices start at zero)")
            continue
        if old.ndim != new.ndim or len(diff) != 1 or new.shape[diff[0]] != old.shape[diff[0]] + 1:
            raise ValueError(f"The initial weights' {key} has shape {tuple(old.shape)}; this network needs "
                             f"{tuple(new.shape)}.")
        d = diff[0]
        extra = old.narrow(d, old.shape[d] - 2, 1) if d == 0 else torch.zeros_like(old.narrow(d, 0, 1))
        own[key] = torch.cat([old, extra], dim=d)
        grown += 1
    net.load_state_dict(own)
    if grown:
        log(f"grew {grown} tensors from 3 to 4 channels (whole vertebra starts as the vertebral body)")


def widen_basic_unet(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A wider MONAI BasicUNet (``own``: its freshly initialised tensors) that computes what ``state`` does.

    Every layer keeps its old channels first; the new output channels keep their random initialisation, and
    the weights from new input channels into old output channels are zero, so no old channel (and so not the
    output) reads a new one until training moves those weights.  The decoder's first convolution of each level
    reads a concatenation (skip features, then upsampled features), so the old channels of each part are placed
    at the start of that part.  The image input and the class outputs keep their size."""
    out: dict[str, torch.Tensor] = {}
    for key, new in own.items():
        old = state[key]
        if old.shape == new.shape:
            out[key] = old.clone()
            continue
        if old.ndim != new.ndim or any(o > n for o, n in zip(old.shape, new.shape)):
            raise ValueError(f"Cannot widen {key} from {tuple(old.shape)} to {tuple(new.shape)}.")
        w = new.clone()
        if old.ndim == 1:  # bias or normalisation: old channels first, new ones as initialised
            w[: old.shape[0]] = old
            out[key] = w
            continue
        deconv = key.endswith("deconv.weight")  # ConvTranspose: (in, out, k, k)
        if deconv:
            w, old = w.transpose(0, 1), old.transpose(0, 1)  # views: (out, in, k, k)
        n_out = old.shape[0]
        dst_in = list(range(old.shape[1]))
        if ".convs.conv_0.conv.weight" in key and key.startswith("unet.upcat_"):
            up_key = key.replace("convs.conv_0.conv.weight", "upsample.deconv.weight")
            up_old, up_new = state[up_key].shape[1], own[up_key].shape[1]
            skip_old, skip_new = old.shape[1] - up_old, w.shape[1] - up_new
            dst_in = list(range(skip_old)) + list(range(skip_new, skip_new + up_old))
        w[:n_out] = 0.0
        w[:n_out, dst_in] = old
        out[key] = w.transpose(0, 1).contiguous() if deconv else w
    return out


def checkpoint_config(cfg: TrainConfig, net_cfg, metrics: dict, extra: dict) -> dict:
    return {
        "kind": cfg.kind,
        "network": net_cfg.to_dict(),
        "class_names": CLASS_NAMES,
        "schedule": {"name": "cosine", "T": 1000},
        "x0_mode": "sigmoid",
        "spacing_mm": list(cfg.spacing_mm),
        "crop": list(cfg.crop),
        "intensity": {"method": "percentile", "low": 0.5, "high": 99.5},
        "context_mm": float(cfg.context_mm),
        "training": {**asdict(cfg), **extra},
        "metrics": metrics,
    }


def forward_loss(net, batch: dict[str, torch.Tensor], cfg: TrainConfig, schedule, gen: torch.Generator,
                 prior_net: torch.nn.Module | None = None):
    """The training loss of one batch for either kind.

    With ``prior_net`` (a baseline segmenter) a share of the low-t diffusion samples is the baseline's
    probability map noised to t, on every channel, as at inference with presegmentation: the model learns
    to correct the presegmentation's errors from the image instead of trusting a noised ground truth.
    """
    stack, target, known = batch["image"], batch["target"], batch["known"]
    centre = stack.shape[1] // 2
    image = stack[:, centre:centre + 1]  # the slice itself; its neighbours are for a 2.5-D presegmenter
    if cfg.kind == "baseline":
        logits = net(stack)
        return segdiff_loss(logits, target, known, weights=(1.0, 1.0, 0.0))
    b = image.shape[0]
    t_uniform = torch.randint(0, schedule.T, (b,), generator=gen)
    t_low = torch.randint(0, cfg.t_focus, (b,), generator=gen)
    t = torch.where(torch.rand(b, generator=gen) < 0.5, t_uniform, t_low).to(image.device)
    noise = torch.randn(target.shape, generator=gen).to(image.device)
    x_t = schedule.q_sample(target * 2 - 1, t, noise)
    pure = torch.randn(target.shape, generator=gen).to(image.device)
    x_t = torch.where(known > 0, x_t, pure)
    if prior_net is not None:
        from_prior = (torch.rand(b, generator=gen) < cfg.prior_share).to(image.device) & (t < cfg.t_focus)
        if bool(from_prior.any()):
            with torch.no_grad():
                x0_prior = logits_to_x0(prior_net(stack), "sigmoid")
            x_prior = schedule.q_sample(x0_prior, t, noise)
            x_t = torch.where(from_prior[:, None, None, None], x_prior, x_t)
    logits = net(x_t, t, image)
    return segdiff_loss(logits, target, known)


@torch.no_grad()
def validate(net, cases: Sequence[TrainCase], cfg: TrainConfig, schedule, device,
             max_slices: int = 12, prior_net: torch.nn.Module | None = None,
             channels: int = 1) -> dict[str, float]:
    """Cheap, deterministic proxy for model selection: Dice of one prediction per labelled slice (at most
    ``max_slices`` evenly spaced labelled slices per case).

    baseline: the prediction from the image.  diffusion: the x0 prediction from the ground truth noised
    to t in {100, 300, 600, 999} with fixed noise (t = 999 is the image alone); with ``prior_net`` the
    baseline's prediction noised to t in {100, 300} instead (what inference with presegmentation sees).
    ``channels``: the image channels of the batches (2.5-D: the slice and its neighbours, the diffusion
    model seeing the centre one).  Dice is 3-D per case and channel over known pixels, averaged over the
    channels that have labelled structure in the case (a channel known only to be absent, like SPIDER's vertebral bodies outside the
    vertebrae, has no Dice: one stray pixel would score it 0).
    """
    net.eval()
    gen = torch.Generator().manual_seed(1234)
    scores: list[float] = []
    for case in cases:
        sel = np.flatnonzero(case.target[:, case.known].reshape(len(case.target), -1).any(axis=1))
        if sel.size == 0:
            continue
        sel = sel[np.linspace(0, sel.size - 1, min(sel.size, max_slices)).round().astype(int)]
        stack = torch.as_tensor(context_stack(case.image, sel, channels, case.slice_mm, cfg.context_mm)).to(device)
        image = stack[:, channels // 2:channels // 2 + 1]
        target = torch.as_tensor(case.target[sel], dtype=torch.float32).to(device)
        hard = (target > 0.5).float()  # partial-volume targets are scored as the labels they round to
        known = torch.as_tensor(np.stack([case.known_mask(k) for k in sel]), dtype=torch.float32).to(device)
        if cfg.kind == "baseline":
            ts = [None]
        else:
            ts = [100, 300] if prior_net is not None else [100, 300, 600, 999]
        for tv in ts:
            preds = []
            for i in range(0, len(sel), 8):
                img, tgt, ctx = image[i:i + 8], target[i:i + 8], stack[i:i + 8]
                if tv is None:
                    logits = net(ctx)
                else:
                    t = torch.full((len(img),), tv, device=device)
                    noise = torch.randn(tgt.shape, generator=gen).to(device)
                    x0 = tgt * 2 - 1 if prior_net is None else logits_to_x0(prior_net(ctx), "sigmoid")
                    logits = net(schedule.q_sample(x0, t, noise), t, img)
                preds.append((logits > 0).float())
            pred = torch.cat(preds) * known
            tgt = hard * known
            for c in np.flatnonzero(case.known):
                if not bool(tgt[:, c].any()):
                    continue  # nothing of this channel is labelled here (SPIDER's bodies): no Dice to take
                inter = (pred[:, c] * tgt[:, c]).sum()
                denom = pred[:, c].sum() + tgt[:, c].sum()
                scores.append(float(2 * inter / denom))
    net.train()
    return {"val_dice": float(np.mean(scores)) if scores else float("nan")}


def train(cfg: TrainConfig, train_cases: Sequence[TrainCase], val_cases: Sequence[TrainCase], out_dir: Path,
          resume: bool = False, log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Train and return the path of the best checkpoint (``best.safetensors``)."""
    from ..model.checkpoint import CheckpointConfig, load_checkpoint, save_checkpoint
    from ..model.device import resolve_device
    from ..model.diffusion import CosineSchedule

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if torch.cuda.is_available() \
            else torch.device("cpu")
    else:
        device, msg = resolve_device(cfg.device)
        log(msg)
    torch.manual_seed(cfg.seed + rank)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net, net_cfg = build_model(cfg)
    if cfg.init:
        init_net, _ = load_checkpoint(cfg.init)
        load_init_weights(net, init_net.state_dict(), log)
    net.to(device).train()
    prior_net = None
    if cfg.prior and cfg.kind == "diffusion":
        prior_net, prior_meta = load_checkpoint(cfg.prior)
        if prior_meta.kind != "baseline":
            raise ValueError(f"The prior {cfg.prior} is a {prior_meta.kind} checkpoint, not a baseline.")
        if prior_net.num_classes != net.num_classes:
            raise ValueError(f"The prior {cfg.prior} has {prior_net.num_classes} classes; the model has "
                             f"{net.num_classes}.")
        prior_net.to(device).eval().requires_grad_(False)
        if prior_net.config.in_channels > 1:  # a 2.5-D prior: the batches carry its neighbouring slices
            cfg = dataclasses.replace(cfg, context=0, context_mm=float(prior_meta.context_mm))
    channels = prior_net.config.in_channels if prior_net is not None else net.config.in_channels
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = CosineSchedule(1000)
    start, best, wall0 = 0, -1.0, 0.0
    state_path = out_dir / "last_state.pt"
    if resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["optim"])
        start, best, wall0 = int(st["iteration"]), float(st["best"]), float(st["wall_s"])
        log(f"resumed at iteration {start} (best val Dice {best:.4f})")
    model = torch.nn.parallel.DistributedDataParallel(net) if distributed else net
    from .recipe import balanced_weights

    batches = SliceBatches(train_cases, cfg.crop, cfg.batch_size, seed=cfg.seed * 1000 + rank + start,
                           case_weights=balanced_weights(train_cases, cfg.phantom_share, dict(cfg.source_shares)),
                           channels=channels, context_mm=cfg.context_mm, mirror=cfg.mirror,
                           randomize=cfg.randomize_contrast)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + rank + start)
    log_path = out_dir / "log.csv"
    new_log = not (resume and log_path.exists())
    t0 = time.perf_counter() - wall0
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.iterations, initial=start, desc=f"train {cfg.kind}", unit="it")
    with open(log_path, "w" if new_log else "a", newline="") as fh:
        writer = csv.writer(fh)
        if new_log:
            writer.writerow(["iteration", "lr", "loss", "dice", "bce", "mse", "val_dice", "wall_s"])
        running: list[float] = []
        stop = min(cfg.iterations, cfg.stop_at) if cfg.stop_at else cfg.iterations
        for it in range(start, stop):
            for g in opt.param_groups:
                g["lr"] = _lr_at(it, cfg)
            batch = {k: v.to(device) for k, v in next(batches).items()}
            losses = forward_loss(model, batch, cfg, schedule, gen, prior_net=prior_net)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            running.append(float(losses["loss"].detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(running[-20:]):.4f}")
            last = it + 1 == stop
            if rank == 0 and ((it + 1) % cfg.val_every == 0 or last):
                val = (validate(net, val_cases, cfg, schedule, device, prior_net=prior_net, channels=channels)
                       if val_cases
                       else {"val_dice": float("nan")})
                wall = time.perf_counter() - t0
                writer.writerow([it + 1, f"{_lr_at(it, cfg):.3g}", f"{np.mean(running):.5f}",
                                 f"{float(losses['dice']):.5f}", f"{float(losses['bce']):.5f}",
                                 f"{float(losses['mse']):.5f}", f"{val['val_dice']:.5f}", f"{wall:.1f}"])
                fh.flush()
                running = []
                extra = {"iteration": it + 1, "wall_s": round(wall, 1), "torch": torch.__version__,
                         "machine": platform.machine(), "train_cases": [c.name for c in train_cases],
                         "val_cases": [c.name for c in val_cases]}
                meta = CheckpointConfig.from_dict(checkpoint_config(cfg, net_cfg, val, extra))
                save_checkpoint(out_dir / "last.safetensors", net, meta)
                score = val["val_dice"] if not math.isnan(val["val_dice"]) else 0.0
                if score >= best:
                    best = score
                    save_checkpoint(out_dir / "best.safetensors", net, meta)
                tmp = state_path.with_suffix(".tmp")
                torch.save({"model": net.state_dict(), "optim": opt.state_dict(), "iteration": it + 1,
                            "best": best, "wall_s": wall}, tmp)
                os.replace(tmp, state_path)
                log(f"iteration {it + 1}: val Dice {val['val_dice']:.4f} (best {best:.4f}), {wall:.0f} s")
    if bar is not None:
        bar.close()
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    (out_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    return out_dir / "best.safetensors"
