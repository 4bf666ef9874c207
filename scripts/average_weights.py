"""Average the weights of checkpoints fine-tuned from one start (a "model soup") into one checkpoint.

    .venv/bin/python scripts/average_weights.py OUT.safetensors A.safetensors B.safetensors [...]

The inputs must be the same kind of network with the same config (shape, classes, grid, intensity, context);
floating-point tensors are averaged, integer buffers are taken from the first.  The result's training record
names its sources.  Only sensible for networks that share an initialisation (cycles of one presegmenter).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from napari_spinesegdiff.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def average(paths: list[Path]):
    nets, configs = zip(*(load_checkpoint(p) for p in paths))
    first = configs[0]
    for p, c in zip(paths[1:], configs[1:]):
        if c.replace(training={}, metrics={}) != first.replace(training={}, metrics={}):
            raise CheckpointError(f"{p.name} is not the same kind of network as {paths[0].name}.")
    states = [n.state_dict() for n in nets]
    avg = {}
    for k, v in states[0].items():
        avg[k] = torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
    nets[0].load_state_dict(avg)
    training = {"averaged_from": [p.name if p.parent == paths[0].parent else str(p) for p in paths],
                "sources": [dict(c.training) for c in configs]}
    return nets[0], first.replace(training=training, metrics={})


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out, *inputs = (Path(a) for a in argv)
    if out.exists() or out in inputs:
        print(f"{out} exists; choose a new file for the average.", file=sys.stderr)
        return 2
    net, config = average(inputs)
    save_checkpoint(out, net, config)
    print(f"wrote {out}: the mean of {len(inputs)} checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
