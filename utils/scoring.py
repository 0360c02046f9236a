"""From per-scale log-likelihoods to anomaly maps and image scores (pure tensor math)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def layer_maxima(log_probs: list[Tensor]) -> list[float]:
    """Maximum per-dimension log-likelihood of each scale over a whole image set."""
    return [float(lp.max()) for lp in log_probs]


def _upsampled_sum(log_probs: list[Tensor], per_scale: Callable[[int, Tensor], Tensor], out_size: int,
                   chunk: int) -> Tensor:
    """``sum_l upsample(per_scale(l, lp_l))`` over scales, ``chunk`` images at a time.

    ``per_scale`` turns a float64 (n, H_l, W_l) slice of scale l into per-position values; each is upsampled
    bilinearly (align_corners=True) to ``out_size`` and the float32 results are summed into (N, S, S).
    """
    n_images = log_probs[0].shape[0]
    out = torch.zeros(n_images, out_size, out_size, dtype=torch.float32)
    for start in range(0, n_images, chunk):
        stop = min(start + chunk, n_images)
        for layer, lp in enumerate(log_probs):
            values = per_scale(layer, lp[start:stop].double()).unsqueeze(1)
            up = F.interpolate(values, size=(out_size, out_size), mode='bilinear', align_corners=True)
            out[start:stop] += up[:, 0].float()
    return out


def anomaly_maps(log_probs: list[Tensor], out_size: int, norm_maxima: list[float] | None = None,
                 chunk: int = 64) -> Tensor:
    """Anomaly maps as CFLOW-AD builds them.

    Per scale l: ``q_l = exp(lp_l - m_l)``, upsampled bilinearly (align_corners=True) to the input size;
    ``score = sum_l q_l``; anomaly ``A = offset - score``. With ``norm_maxima=None`` (the paper's protocol)
    ``m_l`` is the maximum of ``lp_l`` over this image set and ``offset`` is the maximum of ``score`` over
    the set. With given maxima (e.g. from the training images) both are fixed: ``m_l = norm_maxima[l]`` and
    ``offset = L``, so each image's map depends on that image alone.

    Args:
        log_probs: per scale, (N, H_l, W_l) per-dimension log-likelihoods.
        out_size: side of the square output maps.
        norm_maxima: per-scale maxima, or None for test-set normalisation.
        chunk: images upsampled at a time (bounds temporary memory).
    Returns:
        (N, out_size, out_size) float32 anomaly maps; higher is more anomalous.
    """
    maxima = layer_maxima(log_probs) if norm_maxima is None else list(norm_maxima)
    if len(maxima) != len(log_probs):
        raise ValueError(f'{len(maxima)} maxima for {len(log_probs)} scales')
    score = _upsampled_sum(log_probs, lambda layer, lp: torch.exp(lp - maxima[layer]), out_size, chunk)
    offset = float(score.max()) if norm_maxima is None else float(len(log_probs))
    return offset - score


STD_FLOOR = 1e-3  # floor of a position's standard deviation (per-dimension log-likelihood units)


def position_stats(log_probs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Per scale, the mean and standard deviation over an image set of the log-likelihood at each position.

    Args:
        log_probs: per scale, (N, H_l, W_l) per-dimension log-likelihoods (typically of the training images).
    Returns:
        per scale, ``(mean, std)``, each (H_l, W_l) float32; std is the population std, floored at
        ``STD_FLOOR`` so that a position with no spread (or a single image) cannot divide by zero.
    """
    stats = []
    for lp in log_probs:
        x = lp.double()
        mean = x.mean(dim=0)
        std = x.std(dim=0, correction=0).clamp_min(STD_FLOOR)
        stats.append((mean.float(), std.float()))
    return stats


def position_maps(log_probs: list[Tensor], stats: list[tuple[Tensor, Tensor]], out_size: int,
                  chunk: int = 64) -> Tensor:
    """Anomaly maps from log-likelihoods standardised per position against reference statistics.

    Per scale l: ``z_l = (mean_l - lp_l) / std_l`` at each position of the scale's grid (``stats`` from
    :func:`position_stats`, e.g. of the training images), upsampled bilinearly (align_corners=True) to the
    input size; ``A = sum_l z_l``. Each image's map depends on that image alone.

    Returns:
        (N, out_size, out_size) float32 anomaly maps; higher is more anomalous.
    """
    if len(stats) != len(log_probs):
        raise ValueError(f'{len(stats)} statistics for {len(log_probs)} scales')
    for lp, (mean, std) in zip(log_probs, stats):
        if tuple(mean.shape) != tuple(lp.shape[1:]) or tuple(std.shape) != tuple(lp.shape[1:]):
            raise ValueError(f'statistics of shape {tuple(mean.shape)} for a {tuple(lp.shape[1:])} grid')
    return _upsampled_sum(log_probs, lambda layer, lp: (stats[layer][0].double() - lp) / stats[layer][1].double(),
                          out_size, chunk)


def image_scores(maps: Tensor) -> Tensor:
    """Image anomaly score = maximum of its anomaly map; maps (N, H, W) -> (N,)."""
    return maps.flatten(1).max(dim=1).values
