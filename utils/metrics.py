"""Anomaly-detection metrics on numpy arrays: image AUROC, pixel AUROC and two AUPRO variants.

``aupro`` is the MVTec AD definition (exact curve over every distinct score, integrated up to the FPR limit
with interpolation there, divided by the limit). ``aupro_cflow`` reproduces the estimator of the original
CFLOW-AD code (1000 evenly spaced thresholds, hole-filled regions, min-max rescaled FPR), computed with
histograms instead of a loop over thresholds. All functions are pure: arrays in, a float (or None when the
metric is undefined) out.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, roc_auc_score

from utils.errors import UserError

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_SEARCH_CHUNK = 1 << 20


def _finite_or_raise(low: float, high: float, what: str) -> None:
    if not (np.isfinite(low) and np.isfinite(high)):
        raise UserError(f'{what} contain NaN or infinite values; check the model outputs before computing '
                        'metrics.')


def _value_range(maps: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    """Smallest and largest score of the selected images, checked to be finite (no copy of the maps)."""
    low = float(np.min([maps[i].min() for i in idx]))
    high = float(np.max([maps[i].max() for i in idx]))
    _finite_or_raise(low, high, 'anomaly maps')
    return low, high


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise UserError(f'fpr_limit must lie in (0, 1], got {fpr_limit}.')


def _prepare(masks: np.ndarray, maps: np.ndarray,
             valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checks shapes and returns boolean masks, the maps and the indices of the images that count.

    Args:
        masks: (N, H, W) ground truth; nonzero marks a defect pixel.
        maps: (N, H, W) anomaly maps, higher is more anomalous.
        valid: (N,) booleans, or None for all images.
    Returns:
        masks as bool (N, H, W), maps (N, H, W) unchanged, indices (M,) of the valid images.
    """
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise UserError(f'masks and maps must both have shape (N, H, W); got {masks.shape} and {maps.shape}.')
    if not (np.issubdtype(maps.dtype, np.integer) or np.issubdtype(maps.dtype, np.floating)
            or maps.dtype == bool):
        raise UserError(f'anomaly maps must be real numbers, got dtype {maps.dtype}.')
    if masks.dtype != bool:
        masks = masks != 0
    if valid is None:
        return masks, maps, np.arange(maps.shape[0])
    valid = np.asarray(valid)
    if valid.shape != (maps.shape[0],):
        raise UserError(f'valid must have shape ({maps.shape[0]},), one flag per image; got {valid.shape}.')
    return masks, maps, np.flatnonzero(valid.astype(bool))


def _work_dtype(maps: np.ndarray) -> np.dtype:
    """float32 for maps of at most 32 bits, float64 otherwise (so float64 input keeps its precision)."""
    return np.result_type(maps.dtype, np.float32)


def per_region_labels(mask: np.ndarray) -> np.ndarray:
    """Connected components of a defect mask with 8-connectivity.

    Args:
        mask: (H, W) ground truth; nonzero marks a defect pixel.
    Returns:
        (H, W) int32 labels: 0 for background, 1..R for the R regions.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise UserError(f'a mask must have shape (H, W), got {mask.shape}.')
    labels, _ = ndimage.label(mask != 0, structure=_EIGHT_CONNECTED)
    return labels.astype(np.int32, copy=False)


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Detection AUROC (sklearn ``roc_auc_score``).

    Args:
        labels: (N,) 0 for a normal image, 1 for a defective one.
        scores: (N,) image anomaly scores.
    Returns:
        The AUROC in [0, 1], or None when only one class is present.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise UserError(f'labels and scores must both have shape (N,); '
                        f'got {labels.shape} and {scores.shape}.')
    if labels.size == 0:
        return None
    if not np.isin(labels, (0, 1)).all():
        raise UserError('image labels must be 0 (normal) or 1 (defective).')
    _finite_or_raise(float(np.min(scores)), float(np.max(scores)), 'image scores')
    if np.unique(labels).size < 2:
        return None
    return float(roc_auc_score(labels.astype(np.int64), scores))


def _split_scores(masks: np.ndarray, maps: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 scores of the defect pixels and of the normal pixels of the selected images, each sorted."""
    n_pos = sum(int(np.count_nonzero(masks[i])) for i in idx)
    n_neg = len(idx) * maps.shape[1] * maps.shape[2] - n_pos
    pos = np.empty(n_pos, dtype=np.float32)
    neg = np.empty(n_neg, dtype=np.float32)
    p = q = 0
    for i in idx:
        m = masks[i]
        values = maps[i][m]
        pos[p:p + values.size] = values
        p += values.size
        values = maps[i][~m]
        neg[q:q + values.size] = values
        q += values.size
    pos.sort()
    neg.sort()
    return pos, neg


def pixel_auroc(masks: np.ndarray, maps: np.ndarray, valid: np.ndarray | None = None) -> float | None:
    """Segmentation AUROC over all pixels of the valid images, flattened together.

    Equal to ``roc_auc_score(masks[valid].ravel(), maps[valid].ravel())`` on float32 scores (ties count
    one half), computed from one float32 copy of the scores: the defect and normal scores are sorted
    separately and each defect score is ranked among the normal ones with a binary search.

    Args:
        masks: (N, H, W) ground truth; nonzero marks a defect pixel.
        maps: (N, H, W) anomaly maps, higher is more anomalous.
        valid: (N,) booleans; only images flagged True count. None means all.
    Returns:
        The AUROC in [0, 1], or None when the valid pixels hold only one class.
    """
    masks, maps, idx = _prepare(masks, maps, valid)
    pos, neg = _split_scores(masks, maps, idx)
    if pos.size == 0 or neg.size == 0:
        return None
    _finite_or_raise(float(np.min([pos[0], neg[0]])), float(np.max([pos[-1], neg[-1]])), 'anomaly maps')
    twice_wins = 0
    for start in range(0, pos.size, _SEARCH_CHUNK):
        chunk = pos[start:start + _SEARCH_CHUNK]
        twice_wins += int(np.searchsorted(neg, chunk, side='left').sum())
        twice_wins += int(np.searchsorted(neg, chunk, side='right').sum())
    return twice_wins / (2.0 * pos.size * neg.size)


def _pro_curve(masks: np.ndarray, maps: np.ndarray, idx: np.ndarray,
               fpr_limit: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact PRO curve from (0, 0) up to the first point past ``fpr_limit`` (or to its end).

    Every distinct score t is a threshold (predicted: score >= t). Between two consecutive distinct normal
    scores the FPR is constant, so the thresholds set by defect scores alone only add vertical steps. The
    curve is therefore given exactly by two points per distinct normal score n: (FPR just above n, PRO(> n))
    and (FPR(n), PRO(>= n)). Only the normal scores down to the one where the FPR first exceeds the limit
    are sorted.

    Returns:
        fpr (P,) and pro (P,), both non-decreasing and starting at 0; None when there are no defect
        regions or no normal pixels.
    """
    dtype = _work_dtype(maps)
    n_regions = 0
    n_neg = sum(maps.shape[1] * maps.shape[2] - int(np.count_nonzero(masks[i])) for i in idx)
    neg = np.empty(n_neg, dtype=dtype)
    pos, weights = [], []
    q = 0
    for i in idx:
        m = masks[i]
        values = maps[i][~m]
        neg[q:q + values.size] = values
        q += values.size
        if m.any():
            lab, n = ndimage.label(m, structure=_EIGHT_CONNECTED)
            inv_sizes = np.concatenate(([0.0], 1.0 / np.bincount(lab.ravel())[1:]))
            pos.append(maps[i][m].astype(dtype, copy=False))
            weights.append(inv_sizes[lab[m]])
            n_regions += n
    if n_regions == 0 or n_neg == 0:
        return None
    rank = int(np.floor(fpr_limit * n_neg)) + 2
    if rank <= n_neg:
        neg.partition(n_neg - rank)
        neg = neg[neg >= neg[n_neg - rank]]
    neg.sort()
    pos = np.concatenate(pos)
    order = np.argsort(pos)
    pos = pos[order]
    cum_weight = np.concatenate(([0.0], np.cumsum(np.concatenate(weights)[order])))
    first = np.flatnonzero(np.concatenate(([True], neg[1:] != neg[:-1])))[::-1]
    levels = neg[first]
    fpr_at = (neg.size - first) / n_neg
    fpr_above = np.concatenate(([0.0], fpr_at[:-1]))
    pro_at = (cum_weight[-1] - cum_weight[np.searchsorted(pos, levels, side='left')]) / n_regions
    pro_above = (cum_weight[-1] - cum_weight[np.searchsorted(pos, levels, side='right')]) / n_regions
    fpr = np.concatenate(([0.0], np.column_stack((fpr_above, fpr_at)).ravel()))
    pro = np.concatenate(([0.0], np.clip(np.column_stack((pro_above, pro_at)).ravel(), 0.0, 1.0)))
    return fpr, pro


def _area_to_limit(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area under pro(fpr) from 0 to ``fpr_limit`` (linear interpolation there), over the limit."""
    n_in = int(np.searchsorted(fpr, fpr_limit, side='right'))
    x, y = fpr[:n_in], pro[:n_in]
    area = float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))
    if n_in < fpr.size and x[-1] < fpr_limit:
        x0, y0, x1, y1 = fpr[n_in - 1], pro[n_in - 1], fpr[n_in], pro[n_in]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_limit) * (fpr_limit - x0)
    return float(min(max(area / fpr_limit, 0.0), 1.0))


def aupro(masks: np.ndarray, maps: np.ndarray, valid: np.ndarray | None = None,
          fpr_limit: float = 0.3) -> float | None:
    """Normalised area under the per-region-overlap curve, as in the MVTec AD evaluation code.

    Regions are the 8-connected components of each ground-truth mask. At threshold t (every distinct
    score), PRO(t) is the mean over all regions of all valid images of the fraction of the region's
    pixels with score >= t, and FPR(t) is the fraction of all normal pixels of the valid images (good
    images included) with score >= t. The curve starts at (0, 0); it is integrated with the trapezoid
    rule up to exactly ``fpr_limit`` (interpolating linearly there) and divided by ``fpr_limit``.

    Args:
        masks: (N, H, W) ground truth; nonzero marks a defect pixel.
        maps: (N, H, W) anomaly maps, higher is more anomalous.
        valid: (N,) booleans; only images flagged True count. None means all.
        fpr_limit: upper end of the integration, in (0, 1].
    Returns:
        AUPRO in [0, 1], or None when there are no defect regions or no normal pixels.
    """
    _check_fpr_limit(fpr_limit)
    masks, maps, idx = _prepare(masks, maps, valid)
    if idx.size == 0:
        return None
    _value_range(maps, idx)
    curve = _pro_curve(masks, maps, idx, fpr_limit)
    if curve is None:
        return None
    return _area_to_limit(*curve, fpr_limit)


def _first_predicted(values: np.ndarray, taus: np.ndarray, delta: float) -> np.ndarray:
    """For each score v, the number of thresholds tau_k >= v, i.e. the first k at which v > tau_k.

    Args:
        values: (H, W) float64 scores, none above taus[0].
        taus: (K,) non-increasing thresholds taus[k] = taus[0] - k * delta.
        delta: their spacing.
    Returns:
        (H, W) int64 in [0, K]; K means never predicted.
    """
    n = taus.size
    if delta == 0.0:
        return np.full(values.shape, n, dtype=np.int64)
    guess = np.clip(np.floor((taus[0] - values) / delta) + 1.0, 0.0, n).astype(np.int64)
    while True:
        too_high = (guess > 0) & (taus[np.maximum(guess - 1, 0)] < values)
        too_low = (guess < n) & (taus[np.minimum(guess, n - 1)] >= values)
        if not (too_high.any() or too_low.any()):
            return guess
        guess -= too_high
        guess += too_low


def _cflow_curve(masks: np.ndarray, maps: np.ndarray, idx: np.ndarray,
                 num_thresholds: int) -> tuple[np.ndarray, np.ndarray] | None:
    """FPR and PRO of the original CFLOW-AD code at its thresholds tau_k = max - k * delta.

    Each pixel is predicted from the first k with tau_k < score on; that index per pixel and a histogram
    over k give the counts at every threshold at once.

    Returns:
        fpr (K,) and pro (K,) for k = 0..K-1, or None when there are no defect regions or no normal pixels.
    """
    low, high = _value_range(maps, idx)
    delta = (high - low) / num_thresholds
    taus = high - np.arange(num_thresholds, dtype=np.float64) * delta
    neg_hist = np.zeros(num_thresholds + 1, dtype=np.int64)
    pro_hist = np.zeros(num_thresholds + 1, dtype=np.float64)
    n_regions = 0
    for i in idx:
        first_k = _first_predicted(maps[i].astype(np.float64), taus, delta)
        m = masks[i]
        neg_hist += np.bincount(first_k[~m], minlength=num_thresholds + 1)
        if not m.any():
            continue
        lab, n = ndimage.label(m, structure=_EIGHT_CONNECTED)
        n_regions += n
        for r, box in enumerate(ndimage.find_objects(lab), start=1):
            region = lab[box] == r
            filled = ndimage.binary_fill_holes(region)
            pro_hist += np.bincount(first_k[box][filled], minlength=num_thresholds + 1) / region.sum()
    n_neg = int(neg_hist.sum())
    if n_regions == 0 or n_neg == 0:
        return None
    fpr = np.cumsum(neg_hist)[:num_thresholds] / n_neg
    pro = np.cumsum(pro_hist)[:num_thresholds] / n_regions
    return fpr, pro


def aupro_cflow(masks: np.ndarray, maps: np.ndarray, valid: np.ndarray | None = None,
                num_thresholds: int = 1000, fpr_limit: float = 0.3) -> float | None:
    """AUPRO as the original CFLOW-AD code computes it (inherited from DFR).

    Thresholds tau_k = max - k * (max - min) / K for k = 0..K-1 (max and min over the valid maps); a pixel
    is predicted when its score is > tau_k. A region's overlap is the number of predicted pixels in the
    region with its holes filled, divided by the region's area without holes (so it can exceed 1); PRO is
    the plain mean over all regions of all valid images, FPR is pooled over the normal pixels of the valid
    images. Thresholds with FPR <= ``fpr_limit`` are kept, their FPRs are min-max rescaled to [0, 1], and
    the result is sklearn ``auc`` of PRO over the rescaled FPR. No interpolation at the limit.

    Args:
        masks: (N, H, W) ground truth; nonzero marks a defect pixel.
        maps: (N, H, W) anomaly maps, higher is more anomalous.
        valid: (N,) booleans; only images flagged True count. None means all.
        num_thresholds: K, the number of thresholds.
        fpr_limit: largest FPR kept, in (0, 1].
    Returns:
        The value (normally in [0, 1]; hole-filled overlaps can push it slightly above 1), or None when
        there are no defect regions or no normal pixels, or when the kept FPRs do not span an interval
        (e.g. constant maps or maps that separate the classes perfectly; the original code gives NaN there).
    """
    _check_fpr_limit(fpr_limit)
    if int(num_thresholds) != num_thresholds or num_thresholds < 1:
        raise UserError(f'num_thresholds must be a positive integer, got {num_thresholds}.')
    masks, maps, idx = _prepare(masks, maps, valid)
    if idx.size == 0:
        return None
    curve = _cflow_curve(masks, maps, idx, int(num_thresholds))
    if curve is None:
        return None
    fpr, pro = curve
    keep = fpr <= fpr_limit
    fpr, pro = fpr[keep], pro[keep]
    if fpr.size < 2 or fpr.max() == fpr.min():
        return None
    rescaled = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    return float(auc(rescaled, pro))
