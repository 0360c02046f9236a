"""Learning-rate schedule of CFLOW-AD: cosine per meta-epoch with a per-batch linear warm-up."""
from __future__ import annotations

import math


def cosine_lr(base_lr: float, meta_epoch: int, meta_epochs: int, decay_rate: float = 0.1) -> float:
    """Cosine level of a meta-epoch, from ``base_lr`` down towards ``base_lr * decay_rate**3``."""
    eta_min = base_lr * decay_rate ** 3
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * meta_epoch / meta_epochs)) / 2


def learning_rate(base_lr: float, meta_epoch: int, batch_index: int, batches_per_meta_epoch: int,
                  meta_epochs: int, warm_epochs: int = 2, decay_rate: float = 0.1) -> float:
    """The learning rate used for one image batch.

    Args:
        base_lr: the ``--lr`` value.
        meta_epoch: e in 0..meta_epochs-1.
        batch_index: j, the image batch index within the meta-epoch (0..T-1, counting all sub-epochs).
        batches_per_meta_epoch: T = batches per sub-epoch x sub-epochs.
        meta_epochs: M.
        warm_epochs: meta-epochs of linear warm-up from ``base_lr / 10`` to the cosine level of
            meta-epoch ``warm_epochs``.
    """
    if meta_epoch < warm_epochs:
        progress = (batch_index + meta_epoch * batches_per_meta_epoch) / (warm_epochs * batches_per_meta_epoch)
        warm_from = base_lr / 10
        warm_to = cosine_lr(base_lr, warm_epochs, meta_epochs, decay_rate)
        return warm_from + progress * (warm_to - warm_from)
    return cosine_lr(base_lr, meta_epoch, meta_epochs, decay_rate)
