"""From per-scale log-likelihoods to anomaly maps and image scores (pure tensor math)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def layer_maxima(log_probs: list[Tensor]) -> list[float]:
    """Maximum per-dimension log-likelihood of each scale over a whole image set."""
    return [float(lp.max()) for lp in log_probs]


UPSAMPLE_CHUNK_PIXELS = 1 << 20  # output pixels upsampled at a time (bounds temporary memory)

MapChunks = Callable[[int, int], Tensor]
"""``maps(start, stop)``: the (stop - start, S, S) float32 anomaly maps of images start..stop-1."""


def scale_weights(weights: Sequence[float] | None, n_scales: int) -> tuple[float, ...]:
    """Per-scale weights of the sum over scales: all 1 for None; otherwise one non-negative weight per scale,
    not all zero."""
    if weights is None:
        return (1.0,) * n_scales
    w = tuple(float(x) for x in weights)
    if len(w) != n_scales or any(not 0 <= x < math.inf for x in w) or not any(x > 0 for x in w):
        raise ValueError(f'need {n_scales} non-negative scale weights, not all zero; got {w}')
    return w


def _upsampled_sum(log_probs: list[Tensor], per_scale: Callable[[int, Tensor], Tensor], out_size: int,
                   start: int, stop: int, chunk: int, w: tuple[float, ...]) -> Tensor:
    """``sum_l w_l * upsample(per_scale(l, lp_l))`` over scales for images start..stop-1, ``chunk`` images at a
    time.

    ``per_scale`` turns a float64 (n, H_l, W_l) slice of scale l into per-position values; each is upsampled
    bilinearly (align_corners=True) to ``out_size`` and the float32 results are weighted by ``w`` (from
    :func:`scale_weights`) and summed into (n, S, S); a scale of weight 0 is skipped.
    """
    out = torch.zeros(stop - start, out_size, out_size, dtype=torch.float32)
    for first in range(start, stop, chunk):
        last = min(first + chunk, stop)
        for layer, lp in enumerate(log_probs):
            if w[layer] == 0:
                continue
            values = per_scale(layer, lp[first:last].double()).unsqueeze(1)
            up = F.interpolate(values, size=(out_size, out_size), mode='bilinear', align_corners=True)
            out[first - start:last - start] += w[layer] * up[:, 0].float()
    return out


def _images_per_chunk(out_size: int) -> int:
    return max(1, UPSAMPLE_CHUNK_PIXELS // (out_size * out_size))


def anomaly_map_chunks(log_probs: list[Tensor], out_size: int, norm_maxima: list[float] | None = None,
                       chunk: int | None = None, weights: Sequence[float] | None = None) -> MapChunks:
    """:func:`anomaly_maps` a range of images at a time, so that the maps of a whole set need not be held.

    With ``norm_maxima=None`` the test-set offset (the maximum of ``sum_l w_l q_l`` over all images) is found
    here, by one pass over the set in chunks."""
    w = scale_weights(weights, len(log_probs))
    maxima = layer_maxima(log_probs) if norm_maxima is None else list(norm_maxima)
    if len(maxima) != len(log_probs):
        raise ValueError(f'{len(maxima)} maxima for {len(log_probs)} scales')

    def per_scale(layer: int, lp: Tensor) -> Tensor:
        return torch.exp(lp - maxima[layer])

    n_images = log_probs[0].shape[0]
    chunk = chunk or _images_per_chunk(out_size)
    offset = float(sum(w))
    if norm_maxima is None:
        offset = max((float(_upsampled_sum(log_probs, per_scale, out_size, s, min(s + chunk, n_images),
                                           chunk, w).max()) for s in range(0, n_images, chunk)), default=0.0)

    def maps(start: int, stop: int) -> Tensor:
        return offset - _upsampled_sum(log_probs, per_scale, out_size, start, stop, chunk, w)
    return maps


def anomaly_maps(log_probs: list[Tensor], out_size: int, norm_maxima: list[float] | None = None,
                 chunk: int | None = None, weights: Sequence[float] | None = None) -> Tensor:
    """Anomaly maps as CFLOW-AD builds them.

    Per scale l: ``q_l = exp(lp_l - m_l)``, upsampled bilinearly (align_corners=True) to the input size;
    ``score = sum_l w_l q_l`` (``w_l = 1``, the paper, unless ``weights`` are given); anomaly
    ``A = offset - score``. With ``norm_maxima=None`` (the paper's protocol) ``m_l`` is the maximum of ``lp_l``
    over this image set and ``offset`` is the maximum of ``score`` over the set. With given maxima (e.g. from
    the training images) both are fixed: ``m_l = norm_maxima[l]`` and ``offset = sum_l w_l``, so each image's
    map depends on that image alone.

    Args:
        log_probs: per scale, (N, H_l, W_l) per-dimension log-likelihoods.
        out_size: side of the square output maps.
        norm_maxima: per-scale maxima, or None for test-set normalisation.
        chunk: images upsampled at a time (bounds temporary memory); None: about a megapixel's worth.
    Returns:
        (N, out_size, out_size) float32 anomaly maps; higher is more anomalous.
    """
    return anomaly_map_chunks(log_probs, out_size, norm_maxima, chunk, weights)(0, log_probs[0].shape[0])


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


def position_map_chunks(log_probs: list[Tensor], stats: list[tuple[Tensor, Tensor]], out_size: int,
                        chunk: int | None = None, weights: Sequence[float] | None = None) -> MapChunks:
    """:func:`position_maps` a range of images at a time."""
    w = scale_weights(weights, len(log_probs))
    if len(stats) != len(log_probs):
        raise ValueError(f'{len(stats)} statistics for {len(log_probs)} scales')
    for lp, (mean, std) in zip(log_probs, stats):
        if tuple(mean.shape) != tuple(lp.shape[1:]) or tuple(std.shape) != tuple(lp.shape[1:]):
            raise ValueError(f'statistics of shape {tuple(mean.shape)} for a {tuple(lp.shape[1:])} grid')

    def per_scale(layer: int, lp: Tensor) -> Tensor:
        return (stats[layer][0].double() - lp) / stats[layer][1].double()

    chunk = chunk or _images_per_chunk(out_size)

    def maps(start: int, stop: int) -> Tensor:
        return _upsampled_sum(log_probs, per_scale, out_size, start, stop, chunk, w)
    return maps


def position_maps(log_probs: list[Tensor], stats: list[tuple[Tensor, Tensor]], out_size: int,
                  chunk: int | None = None, weights: Sequence[float] | None = None) -> Tensor:
    """Anomaly maps from log-likelihoods standardised per position against reference statistics.

    Per scale l: ``z_l = (mean_l - lp_l) / std_l`` at each position of the scale's grid (``stats`` from
    :func:`position_stats`, e.g. of the training images), upsampled bilinearly (align_corners=True) to the
    input size; ``A = sum_l w_l z_l`` (``w_l = 1`` unless ``weights`` are given). Each image's map depends on
    that image alone.

    Returns:
        (N, out_size, out_size) float32 anomaly maps; higher is more anomalous.
    """
    return position_map_chunks(log_probs, stats, out_size, chunk, weights)(0, log_probs[0].shape[0])


def gaussian_kernel(sigma: float, radius: int) -> Tensor:
    """Normalised 1-D Gaussian weights at offsets -radius..radius, float64."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def smooth_maps(maps: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Gaussian smoothing of each map, separable, with mirror padding at the borders.

    The kernel reaches ``round(truncate * sigma)`` pixels each way (scipy's ``gaussian_filter`` rule), at most
    one less than the map's side; with that radius the result equals
    ``scipy.ndimage.gaussian_filter(m, sigma, mode='mirror', truncate=truncate)`` per map. ``sigma <= 0``
    returns the maps unchanged.

    Args:
        maps: (N, H, W) float maps.
        sigma: standard deviation in pixels.

    Returns:
        (N, H, W) maps, in the input's dtype.
    """
    if sigma <= 0:
        return maps
    n, h, w = maps.shape
    out = maps.double().unsqueeze(1)
    for dim, size in ((3, w), (2, h)):
        radius = min(int(truncate * sigma + 0.5), size - 1)
        if radius < 1:
            continue
        k = gaussian_kernel(sigma, radius)
        kernel = k.view(1, 1, 1, -1) if dim == 3 else k.view(1, 1, -1, 1)
        pad = (radius, radius, 0, 0) if dim == 3 else (0, 0, radius, radius)
        out = F.conv2d(F.pad(out, pad, mode='reflect'), kernel)
    return out[:, 0].to(maps.dtype)


def smoothed_map_chunks(maps: MapChunks, sigma: float) -> MapChunks:
    """``maps`` with each chunk smoothed by :func:`smooth_maps` (the identity for ``sigma <= 0``)."""
    if sigma <= 0:
        return maps

    def smoothed(start: int, stop: int) -> Tensor:
        return smooth_maps(maps(start, stop), sigma)
    return smoothed


def image_scores(maps: Tensor) -> Tensor:
    """Image anomaly score = maximum of its anomaly map; maps (N, H, W) -> (N,)."""
    return maps.flatten(1).max(dim=1).values
