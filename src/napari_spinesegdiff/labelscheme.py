"""The written label scheme (SPIDER's and the paper's) and how network channels become labels.

Written labels, ``vertebrae="whole"`` (the default): 0 background, 1 spinal canal, 2 vertebra (the whole
vertebra: body and posterior elements), 3 intervertebral disc.  ``vertebrae="split"``: the same with
2 = vertebral body and 4 = posterior elements (pedicles, laminae, processes), so body morphometry works.

Network channels are named in a checkpoint's ``class_names``.  Models since v4 have four sigmoid
channels, :data:`CHANNELS`: canal, vertebral body, disc and whole vertebra (the body channel is learned
where a dataset labels bodies, the whole-vertebra channel where it labels whole vertebrae).  Older and
official checkpoints have three (canal, "vertebrae", disc); their vertebra channel is written as label 2 and
cannot be split.  No torch, no Qt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

Vertebrae = Literal["whole", "split"]

#: Written label values.
CANAL, VERTEBRA, DISC, POSTERIOR = 1, 2, 3, 4
VERTEBRAL_BODY = VERTEBRA  # label 2 holds the bodies only with vertebrae="split"

#: Channel names of the four-channel models (v4 on), in channel order.
CHANNELS = ["spinal canal", "vertebral body", "intervertebral disc", "vertebra"]
#: Channel names of the three-channel models (v1-v3, the official checkpoint).
CHANNELS_V3 = ["spinal canal", "vertebrae", "intervertebral disc"]


def label_names(vertebrae: Vertebrae = "whole") -> dict[int, str]:
    """Written label value -> name."""
    if vertebrae == "split":
        return {CANAL: "spinal canal", VERTEBRA: "vertebral body", DISC: "intervertebral disc",
                POSTERIOR: "posterior elements"}
    return {CANAL: "spinal canal", VERTEBRA: "vertebra", DISC: "intervertebral disc"}


def check_vertebrae(value: str) -> Vertebrae:
    if value not in ("whole", "split"):
        raise ValueError(f"vertebrae must be 'whole' or 'split', got {value!r}.")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class ChannelRoles:
    """Which channel of a model holds which structure (None where the model has no such channel)."""

    canal: int | None
    body: int | None
    disc: int | None
    whole: int | None

    @classmethod
    def of(cls, class_names: Sequence[str]) -> "ChannelRoles":
        names = [n.strip().lower() for n in class_names]

        def find(*options: str) -> int | None:
            for o in options:
                if o in names:
                    return names.index(o)
            return None

        return cls(canal=find("spinal canal", "canal"), body=find("vertebral body", "vertebral bodies"),
                   disc=find("intervertebral disc", "disc", "ivd"), whole=find("vertebra", "vertebrae"))

    @property
    def known(self) -> bool:
        """The model's channels map onto canal, vertebra and disc (else labels are the channel index + 1)."""
        return None not in (self.canal, self.disc) and (self.body is not None or self.whole is not None)

    @property
    def can_split(self) -> bool:
        return self.body is not None and self.whole is not None


def structure_probabilities(probs: np.ndarray, roles: ChannelRoles) -> np.ndarray:
    """Channel probabilities (C, ...) -> (3, ...) probabilities of canal, (whole) vertebra and disc.

    A four-channel model's vertebra probability is the larger of its whole-vertebra and body channels (a
    body is part of its vertebra)."""
    vert = [probs[i] for i in (roles.whole, roles.body) if i is not None]
    v = vert[0] if len(vert) == 1 else np.maximum(vert[0], vert[1])
    return np.stack([probs[roles.canal], v, probs[roles.disc]])


def split_vertebrae(labels: np.ndarray, body_probability: np.ndarray) -> np.ndarray:
    """Whole-vertebra labels -> split labels: inside label 2, body where P(body) > 0.5, else 4."""
    out = labels.copy()
    out[(labels == VERTEBRA) & (body_probability <= 0.5)] = POSTERIOR
    return out


def merge_vertebrae(labels: np.ndarray) -> np.ndarray:
    """Split labels -> whole-vertebra labels (4 -> 2)."""
    out = np.asarray(labels).copy()
    out[out == POSTERIOR] = VERTEBRA
    return out


def labels_to_channels(labels: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """Written labels (whole or split) -> a model's one-hot channels (C, ...) as float32, for a labels prior.

    With whole-vertebra labels a body channel gets the whole vertebra (the diffusion refines it)."""
    roles = ChannelRoles.of(class_names)
    labels = np.asarray(labels)
    if not roles.known:
        return np.stack([labels == c for c in range(1, len(class_names) + 1)]).astype(np.float32)
    out = np.zeros((len(class_names), *labels.shape), np.float32)
    out[roles.canal] = labels == CANAL
    out[roles.disc] = labels == DISC
    if roles.whole is not None:
        out[roles.whole] = (labels == VERTEBRA) | (labels == POSTERIOR)
    if roles.body is not None:
        out[roles.body] = labels == VERTEBRA
    return out


def label_channels(label: int, class_names: Sequence[str], vertebrae: Vertebrae = "whole") -> list[int]:
    """The model channels whose probabilities (and uncertainty) make up written ``label``."""
    roles = ChannelRoles.of(class_names)
    if not roles.known:
        return [label - 1] if 1 <= label <= len(class_names) else []
    vert = [i for i in (roles.body, roles.whole) if i is not None]
    table = {CANAL: [roles.canal], DISC: [roles.disc],
             VERTEBRA: [roles.body] if vertebrae == "split" and roles.can_split else vert,
             POSTERIOR: [roles.whole] if vertebrae == "split" and roles.can_split else []}
    return [int(i) for i in table.get(label, []) if i is not None]


def label_probability(probs: np.ndarray, class_names: Sequence[str], label: int,
                      vertebrae: Vertebrae = "whole") -> np.ndarray:
    """P(written ``label``) from channel probabilities (C, ...): the largest of its channels' (posterior
    elements: whole vertebra and not body)."""
    roles = ChannelRoles.of(class_names)
    if label == POSTERIOR and vertebrae == "split" and roles.can_split:
        return np.minimum(probs[roles.whole], 1.0 - probs[roles.body])
    ch = label_channels(label, class_names, vertebrae)
    return np.max(probs[ch], axis=0) if ch else np.zeros(probs.shape[1:], probs.dtype)
