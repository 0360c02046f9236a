"""Anomaly-detection metrics on numpy arrays: image AUROC, pixel AUROC and two AUPRO variants.

``aupro`` is the MVTec AD definition (exact curve over every distinct score, integrated up to the FPR limit
with interpolation there, divided by the limit). ``aupro_cflow`` reproduces the estimator of the original
CFLOW-AD code (1000 evenly spaced thresholds, hole-filled regions, min-max rescaled FPR), computed with
histograms instead of a loop over thresholds. The pixel metrics are computed by :class:`PixelMetrics`, which
sees the maps in chunks (usually twice) and keeps only the defect pixels' scores, so that a test set's maps
never have to be in memory at once; ``pixel_auroc``, ``aupro`` and ``aupro_cflow`` apply it to arrays. No
I/O anywhere: arrays in, a float (or None when the metric is undefined) out.
"""
from __future__ import annotations

import time

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, roc_auc_score

from utils.errors import UserError

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _finite_or_raise(low: float, high: float, what: str) -> None:
    if not (np.isfinite(low) and np.isfinite(high)):
        raise UserError(f'{what} contain NaN or infinite values; check the model outputs before computing '
                        'metrics.')


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


MAX_DEFECT_PIXELS = 1 << 21  # defect pixels whose scores PixelMetrics holds at once, by default
COARSE_BINS = 1 << 16  # bins of the score histogram that plans the ranges when the score axis is cut


class PixelMetrics:
    """Exact pixel AUROC, AUPRO and CFLOW-AD AUPRO of image subsets, from anomaly maps shown in chunks.

    The maps never have to be in memory all at once. The caller shows every image once per pass, in chunks
    of any size and order and the same maps every time, with :meth:`add`, and calls :meth:`end_pass` after
    each pass until :attr:`done`. Usually there are two passes, and memory grows with the number of defect
    pixels (their scores and region weights are kept), not with the number of normal pixels. When the
    subsets hold more than ``max_defect_pixels`` defect pixels, the score axis is cut into ranges of at most
    half that many each (planned on a histogram made in one extra pass) and the defect pixels are kept one
    range at a time, one more pass per range; memory then stays bounded whatever the test set's size.

    How: the defect pixels' scores of a range (of all scores when there is one range) are sorted into
    distinct values U, with how many defect pixels have each and the sum of their 1/region-area weights. A
    later pass puts each normal pixel of the range in a *slot* of U: the open gap between two consecutive
    defect scores, or equality with one of them. Every normal pixel of a slot has the same number of defect
    pixels above and tied with it, and the same PRO above and at it, so the slot counts (with the counts and
    weights of the ranges above and below) give both AUCs exactly: AUROC as the mean over normal pixels of
    (defect pixels above + half the ties), the AUPRO as the area swept slot by slot from the highest score
    down (the exact curve of :func:`aupro`, whose FPR only moves at normal scores). The CFLOW-AD variant
    needs per-threshold histograms only (see :func:`aupro_cflow`), made in the second pass.

    Args:
        n_images: how many images there are (indices 0..n_images-1).
        subsets: name -> (n_images,) booleans, the images each result is computed over (e.g. the valid
            images, or the normal images plus one defect type).
        pro: also compute both AUPRO variants (needs the defect regions: labelling and per-threshold counts).
        fpr_limit: upper FPR end of both AUPRO variants, in (0, 1].
        cflow_thresholds: number of thresholds of the CFLOW-AD AUPRO.
        max_defect_pixels: how many defect pixels' scores may be held at once (see above).
    """

    def __init__(self, n_images: int, subsets: dict[str, np.ndarray], pro: bool = True, fpr_limit: float = 0.3,
                 cflow_thresholds: int = 1000, max_defect_pixels: int = MAX_DEFECT_PIXELS):
        _check_fpr_limit(fpr_limit)
        if int(cflow_thresholds) != cflow_thresholds or cflow_thresholds < 1:
            raise UserError(f'num_thresholds must be a positive integer, got {cflow_thresholds}.')
        if max_defect_pixels < 2:
            raise UserError(f'max_defect_pixels must be at least 2, got {max_defect_pixels}.')
        self.member: dict[str, np.ndarray] = {}  # the distinct subsets; a repeated one is an alias
        self._alias: dict[str, str] = {}
        for name, sel in subsets.items():
            sel = np.asarray(sel, dtype=bool).reshape(-1)
            if sel.shape != (n_images,):
                raise UserError(f'subset {name!r} must have shape ({n_images},), one flag per image; '
                                f'got {sel.shape}.')
            same = next((other for other, known in self.member.items() if np.array_equal(known, sel)), None)
            if same is None:
                self.member[name] = sel
            else:
                self._alias[name] = same
        self.pro, self.fpr_limit, self.n_thresholds = pro, fpr_limit, int(cflow_thresholds)
        self.max_defect_pixels = int(max_defect_pixels)
        self.seconds = {'aupro': 0.0, 'aupro_cflow': 0.0}  # work specific to each AUPRO variant
        self.passes = 0  # passes ended so far
        self.done = False
        self._used = np.zeros(n_images, dtype=bool)
        for sel in self.member.values():
            self._used |= sel
        self._seen = np.zeros(n_images, dtype=bool)
        self._low = np.full(n_images, np.inf)
        self._high = np.full(n_images, -np.inf)
        self._n_pos = np.zeros(n_images, dtype=np.int64)
        self._n_pixels = np.zeros(n_images, dtype=np.int64)
        self._n_regions = np.zeros(n_images, dtype=np.int64)
        self._dtype: np.dtype | None = None
        # what the current pass does: keep the defect pixels of range `collect`, count the normal pixels of
        # range `count` (its defect scores in `_range_stats`), make the coarse histogram, the CFLOW-AD counts
        self._step = {'collect': 0, 'count': None, 'coarse': False, 'cflow': False}
        self._schedule: list[dict] = []
        self._ranges: list[tuple[int, int]] | None = None  # bin intervals, once the score axis is cut
        self._kept: _DefectBuffer | None = None  # the defect pixels kept in this pass
        self._overflow = False
        self._range_stats: dict[str, dict] = {}  # per subset: defect scores of the counted range, slot counts
        self._coarse: dict[str, dict] = {}  # per subset: counts per coarse bin (when the axis is cut)
        self._coarse_defects = np.zeros(0, dtype=np.int64)  # defect pixels of any subset per coarse bin
        self._totals: dict[str, dict] = {}

    # ----- passes -----

    def add(self, index: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> None:
        """Show a chunk of the current pass: ``index`` (n,) image indices, ``maps`` and ``masks`` (n, H, W)."""
        if self.done:
            raise ValueError('PixelMetrics: all passes are done')
        step = self._step
        for i, values, mask in self._images(index, maps, masks):
            labels = None
            if self.passes == 0:
                low, high = float(values.min()), float(values.max())
                _finite_or_raise(low, high, 'anomaly maps')
                self._low[i], self._high[i] = low, high
                self._n_pos[i] = int(np.count_nonzero(mask))
                self._n_pixels[i] = mask.size
                if self.pro and self._n_pos[i]:
                    labels = self._label(mask)
                    self._n_regions[i] = labels[1]
            elif self.pro and (step['cflow'] or step['coarse'] or step['collect'] is not None) and mask.any():
                labels = self._label(mask)
            names = [name for name, sel in self.member.items() if sel[i]]
            # the normal pixels' scores, sorted once for every step of the pass that needs them
            normal = np.sort(values[~mask]) if step['cflow'] or step['coarse'] or step['count'] is not None \
                else None
            if step['cflow']:
                t = time.perf_counter()
                self._add_cflow(values, normal, labels, names)
                self.seconds['aupro_cflow'] += time.perf_counter() - t
            if step['coarse']:
                self._add_coarse(normal, values[mask], mask, labels, names)
            if step['count'] is not None:
                self._add_normals(normal, names)
            if step['collect'] is not None:
                self._keep_defects(i, values[mask], mask, labels)

    def end_pass(self) -> None:
        """End the current pass (every image of a subset must have been shown once) and set up the next."""
        missing = np.flatnonzero(self._used & ~self._seen)
        if missing.size:
            raise ValueError(f'{missing.size} images were not shown in pass {self.passes} (first: {missing[0]})')
        self._seen[:] = False
        step = self._step
        if self.passes == 0:
            self._start_totals()
            if self._overflow:  # too many defect pixels to keep at once: cut the score axis
                self._schedule = [{'collect': None, 'count': None, 'coarse': True, 'cflow': self.pro}]
            else:
                self._schedule = [{'collect': None, 'count': 0, 'coarse': False, 'cflow': self.pro}]
        if step['count'] is not None:
            for name in self.member:
                self._finish_range(name, step['count'])
        if step['collect'] is not None and not self._overflow:
            self._range_stats = self._stats_of_kept()
        if step['coarse']:
            self._plan_ranges()
        self._overflow = False
        self.passes += 1
        if self._schedule:
            self._step = self._schedule.pop(0)
        else:
            self.done = True
            self._step = {'collect': None, 'count': None, 'coarse': False, 'cflow': False}

    # ----- steps of a pass -----

    def _images(self, index: np.ndarray, maps: np.ndarray, masks: np.ndarray):
        """(image index, map, mask) of the chunk's images that belong to some subset."""
        maps = np.asarray(maps)
        masks = np.asarray(masks)
        index = np.asarray(index).reshape(-1)
        if maps.ndim != 3 or masks.shape != maps.shape or index.shape != (maps.shape[0],):
            raise UserError(f'a chunk needs (n,) indices and (n, H, W) masks and maps; got {index.shape}, '
                            f'{masks.shape} and {maps.shape}.')
        if not (np.issubdtype(maps.dtype, np.integer) or np.issubdtype(maps.dtype, np.floating)
                or maps.dtype == bool):
            raise UserError(f'anomaly maps must be real numbers, got dtype {maps.dtype}.')
        if self._dtype is None:
            self._dtype = np.result_type(maps.dtype, np.float32)  # float32, or float64 for 64-bit input
        for k, i in enumerate(index):
            i = int(i)
            if self._seen[i]:
                raise ValueError(f'image {i} was shown twice in pass {self.passes}')
            self._seen[i] = True
            if self._used[i]:
                yield i, maps[k].astype(self._dtype, copy=False), masks[k] != 0

    def _label(self, mask: np.ndarray) -> tuple[np.ndarray, int]:
        """:func:`per_region_labels` of the mask and its number of regions (timed as AUPRO work)."""
        t = time.perf_counter()
        lab = per_region_labels(mask)
        self.seconds['aupro'] += time.perf_counter() - t
        return lab, int(lab.max())

    def _bin(self, values: np.ndarray) -> np.ndarray:
        """Coarse bin of each score: a non-decreasing function of the score, the same in every pass."""
        low, high = self._bin_range
        scale = COARSE_BINS / (high - low) if high > low else 0.0
        return np.clip(np.floor((values.astype(np.float64) - low) * scale), 0, COARSE_BINS - 1).astype(np.int64)

    def _in_range(self, bins: np.ndarray, r: int) -> np.ndarray:
        start, stop = self._ranges[r]
        return (bins >= start) & (bins < stop)

    def _keep_defects(self, i: int, scores: np.ndarray, mask: np.ndarray,
                      labels: tuple[np.ndarray, int] | None) -> None:
        """Keep the image's defect-pixel ``scores`` (``mask`` order) that fall in the collected range."""
        if self._overflow or not mask.any():
            return
        weights = _region_weights(labels[0], mask) if self.pro else None
        if self._ranges is not None:
            keep = self._in_range(self._bin(scores), self._step['collect'])
            scores = scores[keep]
            weights = None if weights is None else weights[keep]
        if self._kept is None:
            self._kept = _DefectBuffer(self._dtype, self._range_size())
        if self._ranges is None and self._kept.size + scores.size > self.max_defect_pixels:
            self._overflow = True  # pass 0 keeps all defect pixels only while they fit
            self._kept = None
            return
        self._kept.append(i, scores, weights)

    def _range_size(self) -> int:
        """How many defect pixels the collected range holds (known once the score axis is cut), else a start."""
        if self._ranges is None:
            return min(self.max_defect_pixels, 1 << 16)
        start, stop = self._ranges[self._step['collect']]
        return int(self._coarse_defects[start:stop].sum())

    def _stats_of_kept(self) -> dict[str, dict]:
        """Per subset: the kept defect pixels' distinct scores, their counts and weight sums, zero slot counts
        for the normal pixels of the same range, and the map from the slots of the union of all subsets'
        scores (the universe: a normal pixel is searched once, not once per subset) to the subset's slots."""
        kept = self._kept or _DefectBuffer(self._dtype or np.dtype(np.float32), 0)
        self._kept = None
        scores, weights, owners = kept.arrays()
        universe, inverse = np.unique(scores, return_inverse=True)
        inverse = inverse.ravel()
        self._universe = universe
        stats = {}
        for name, sel in self.member.items():
            mine = sel[owners]
            counts = np.bincount(inverse[mine], minlength=universe.size)
            sums = np.bincount(inverse[mine], weights=weights[mine], minlength=universe.size) if self.pro \
                else np.zeros(universe.size)
            present = counts > 0  # the universe scores that the subset holds
            values, counts, sums = universe[present], counts[present], sums[present]
            slot_map = None  # identity when the subset holds every universe score
            if values.size != universe.size:
                below = np.cumsum(present) - present  # the subset's scores below universe[j]
                slot_map = np.empty(2 * universe.size + 1, dtype=np.int32 if values.size < 2 ** 30 else np.int64)
                slot_map[0:-1:2] = 2 * below  # the open gap below universe[j] lies in the gap below values[below]
                slot_map[1::2] = 2 * below + present  # equal to universe[j]: a tie slot if held, else a gap
                slot_map[-1] = 2 * values.size
                del below
            del mine, present
            stats[name] = {'values': values, 'counts': counts.astype(np.int64), 'weights': sums,
                           'slots': np.zeros(2 * values.size + 1, dtype=np.int64), 'slot_map': slot_map}
        return stats

    def _add_normals(self, normal: np.ndarray, names: list[str]) -> None:
        """Count the image's sorted normal scores of the counted range in the slots of each subset in ``names``
        (sorted keys are searched faster, and counts are all that is needed)."""
        if self._ranges is not None:
            normal = normal[self._in_range(self._bin(normal), self._step['count'])]
        universe_slots = _slots(self._universe, normal)  # non-decreasing, as the normal scores are sorted
        for name in names:
            stats = self._range_stats[name]
            slot_map = stats['slot_map']
            _add_runs(stats['slots'], universe_slots if slot_map is None else slot_map[universe_slots])

    def _add_cflow(self, values: np.ndarray, normal: np.ndarray, labels: tuple[np.ndarray, int] | None,
                   names: list[str]) -> None:
        """Counts of the image's normal pixels (``normal``: their scores, sorted) and of its hole-filled
        regions' pixels (weighted by 1 / region area) by the first threshold that predicts them, for each subset
        in ``names``."""
        regions = []
        if labels is not None:
            lab = labels[0]
            for r, box in enumerate(ndimage.find_objects(lab), start=1):
                region = lab[box] == r
                filled = np.sort(values[box][ndimage.binary_fill_holes(region)].astype(np.float64))
                regions.append((filled, float(region.sum())))
        normal = normal.astype(np.float64)
        for name in names:
            totals = self._totals[name]
            totals['neg_hist'] += _threshold_histogram(normal, totals['taus'])
            for filled, area in regions:
                totals['pro_hist'] += _threshold_histogram(filled, totals['taus']) / area

    def _add_coarse(self, normal: np.ndarray, scores: np.ndarray, mask: np.ndarray,
                    labels: tuple[np.ndarray, int] | None, names: list[str]) -> None:
        """Per coarse bin: the image's normal pixels, defect pixels (``scores``, ``mask`` order) and their
        region weight, for each subset in ``names``."""
        defect_bins = self._bin(scores)
        normal = np.bincount(self._bin(normal), minlength=COARSE_BINS)
        defect = np.bincount(defect_bins, minlength=COARSE_BINS)
        weight = None
        if self.pro and labels is not None:
            weight = np.bincount(defect_bins, weights=_region_weights(labels[0], mask), minlength=COARSE_BINS)
        self._coarse_defects += defect
        for name in names:
            coarse = self._coarse[name]
            coarse['normal'] += normal
            coarse['defect'] += defect
            if weight is not None:
                coarse['weight'] += weight

    def _start_totals(self) -> None:
        """After pass 0: per subset, pixel and region counts, score range and the CFLOW-AD thresholds."""
        for name, sel in self.member.items():
            n_pos = int(self._n_pos[sel].sum())
            totals = {'n_pos': n_pos, 'n_neg': int(self._n_pixels[sel].sum()) - n_pos,
                      'n_regions': int(self._n_regions[sel].sum()),
                      'low': float(self._low[sel].min()) if sel.any() else 0.0,
                      'high': float(self._high[sel].max()) if sel.any() else 0.0,
                      'twice_wins': 0.0, 'area': 0.0, 'f1': -1.0, 'f1_threshold': None}
            if self.pro:
                delta = (totals['high'] - totals['low']) / self.n_thresholds
                totals.update(taus=totals['high'] - np.arange(self.n_thresholds, dtype=np.float64) * delta,
                              neg_hist=np.zeros(self.n_thresholds + 1, dtype=np.int64),
                              pro_hist=np.zeros(self.n_thresholds + 1, dtype=np.float64))
            self._totals[name] = totals
        if self._overflow:
            used = self._used
            self._bin_range = (float(self._low[used].min()), float(self._high[used].max()))
            self._coarse_defects = np.zeros(COARSE_BINS, dtype=np.int64)
            self._coarse = {name: {'normal': np.zeros(COARSE_BINS, dtype=np.int64),
                                   'defect': np.zeros(COARSE_BINS, dtype=np.int64),
                                   'weight': np.zeros(COARSE_BINS)} for name in self.member}

    def _plan_ranges(self) -> None:
        """Cut the coarse bins into consecutive ranges of at most half the defect-pixel budget each (a single
        bin with more is a range of its own) and schedule a pass per range: keep its defect pixels, then, in
        the pass after, count its normal pixels (while keeping the next range's)."""
        half = self.max_defect_pixels // 2
        ranges, start, held = [], 0, 0
        for b, count in enumerate(self._coarse_defects.tolist()):
            if held and held + count > half:
                ranges.append((start, b))
                start, held = b, 0
            held += count
        ranges.append((start, COARSE_BINS))
        self._ranges = ranges
        self._schedule = [{'collect': 0, 'count': None, 'coarse': False, 'cflow': False}] + \
            [{'collect': r + 1 if r + 1 < len(ranges) else None, 'count': r, 'coarse': False, 'cflow': False}
             for r in range(len(ranges))]
        for coarse in self._coarse.values():  # above / below each range, per subset
            for key in ('normal', 'defect', 'weight'):
                coarse[key + '_cum'] = np.concatenate(([0], np.cumsum(coarse.pop(key))))

    def _offsets(self, name: str, r: int) -> tuple[int, int, int, float]:
        """Normal pixels above and below range r, defect pixels and region weight above it."""
        if self._ranges is None:
            return 0, 0, 0, 0.0
        coarse = self._coarse[name]
        start, stop = self._ranges[r]

        def above(key: str) -> float:
            return coarse[key + '_cum'][-1] - coarse[key + '_cum'][stop]
        return int(above('normal')), int(coarse['normal_cum'][start]), int(above('defect')), float(above('weight'))

    def _finish_range(self, name: str, r: int) -> None:
        """Add range r's share of the AUROC wins, of the AUPRO area and the range's best F1 to the totals."""
        stats, totals = self._range_stats[name], self._totals[name]
        counts, slots, weights = stats['counts'], stats['slots'], stats['weights']
        n_pos, n_neg = totals['n_pos'], totals['n_neg']
        normal_above, normal_below, defect_above, weight_above = self._offsets(name, r)
        in_range = int(counts.sum())
        # defect pixels of the range above the normal pixels of gap j (and of tie j: above_gap[j + 1])
        above_gap = (in_range - np.concatenate(([0], np.cumsum(counts)))).astype(np.float64)
        totals['twice_wins'] += 2.0 * float(np.dot(slots[0::2], above_gap)) \
            + float(np.dot(slots[1::2], 2.0 * above_gap[1:] + counts)) + 2.0 * in_range * normal_below
        if n_pos and counts.size:  # F1 at each defect score of the range; ranges end in ascending order
            true_pos = defect_above + above_gap[:-1]
            normal_at_or_above = np.cumsum(slots[::-1])[::-1][1::2]  # normal pixels >= values[j] in the range
            f1 = 2.0 * true_pos / (true_pos + normal_at_or_above + (normal_above + n_pos))
            j = int(np.argmax(f1))
            if f1[j] > totals['f1'] or totals['f1_threshold'] is None:
                totals['f1'], totals['f1_threshold'] = float(f1[j]), float(stats['values'][j])
            del true_pos, normal_at_or_above, f1
        del above_gap
        if self.pro and totals['n_regions'] and n_neg:
            t = time.perf_counter()
            totals['area'] += self._area(slots, weights, normal_above, weight_above, n_neg, totals['n_regions'])
            self.seconds['aupro'] += time.perf_counter() - t
        stats.clear()

    def _area(self, slots: np.ndarray, weights: np.ndarray, normal_above: int, weight_above: float, n_neg: int,
              n_regions: int) -> float:
        """Area under PRO(FPR) up to the FPR limit swept by one range's slots, from its highest score down.

        Slot 2j (normal scores in the gap below defect score j) has PRO(> x) = PRO(>= x) = p_j, the weight
        of the defect pixels from score j up; slot 2j + 1 (normal scores equal to defect score j) goes from
        PRO(> x) = p_(j+1) to PRO(>= x) = p_j; the top gap has p_U, the weight above the range.
        """
        limit = self.fpr_limit
        if normal_above / n_neg >= limit:
            return 0.0
        n_values = weights.size
        pro = np.concatenate((weights[::-1].cumsum()[::-1], [0.0]))
        pro += weight_above
        pro /= n_regions
        np.clip(pro, 0.0, 1.0, out=pro)  # p_0 .. p_U
        x1 = np.cumsum(slots[::-1]).astype(np.float64)  # FPR after each slot, from the top slot down
        x1 += normal_above
        x1 /= n_neg
        n_full = int(np.searchsorted(x1, limit, side='right'))  # slots with FPR <= limit after them
        first = 2 * n_values + 1 - n_full  # lowest fully counted slot, in ascending order
        gaps = np.arange((first + 1) // 2, n_values + 1)  # gap slots 2j >= first
        ties = np.arange(first // 2, n_values)  # tie slots 2j + 1 >= first
        area = (float(np.dot(slots[2 * gaps], pro[gaps]))
                + 0.5 * float(np.dot(slots[2 * ties + 1], pro[ties] + pro[ties + 1]))) / n_neg
        if n_full < x1.size:  # the slot where FPR passes the limit counts in part
            x0 = x1[n_full - 1] if n_full else normal_above / n_neg
            slot = first - 1
            j = slot // 2
            a, b = (pro[j], pro[j]) if slot % 2 == 0 else (pro[j + 1], pro[j])
            y_limit = a + (b - a) * (limit - x0) / (x1[n_full] - x0)
            area += 0.5 * (a + y_limit) * (limit - x0)
        return area

    # ----- results -----

    def _finished(self, name: str) -> dict:
        if not self.done:
            raise ValueError('PixelMetrics: results are available once every pass has ended')
        return self._totals[self._alias.get(name, name)]

    def pixel_auroc(self, name: str) -> float | None:
        """Pixel AUROC of subset ``name`` (ties count one half), or None with only one class of pixels."""
        t = self._finished(name)
        if t['n_pos'] == 0 or t['n_neg'] == 0:
            return None
        return t['twice_wins'] / (2.0 * t['n_pos'] * t['n_neg'])

    def _region_totals(self, name: str) -> dict | None:
        """The subset's totals for an AUPRO variant, or None without defect regions or normal pixels."""
        t = self._finished(name)
        if not self.pro:
            raise ValueError('the AUPRO variants need PixelMetrics(pro=True)')
        return None if t['n_regions'] == 0 or t['n_neg'] == 0 else t

    def aupro(self, name: str) -> float | None:
        """MVTec AUPRO of subset ``name`` (as :func:`aupro`), or None without regions or normal pixels."""
        t = self._region_totals(name)
        return None if t is None else float(min(max(t['area'] / self.fpr_limit, 0.0), 1.0))

    def aupro_cflow(self, name: str) -> float | None:
        """CFLOW-AD AUPRO of subset ``name`` (as :func:`aupro_cflow`), or None where that gives None."""
        t = self._region_totals(name)
        if t is None:
            return None
        k = self.n_thresholds
        fpr = np.cumsum(t['neg_hist'])[:k] / t['n_neg']
        pro = np.cumsum(t['pro_hist'])[:k] / t['n_regions']
        keep = fpr <= self.fpr_limit
        fpr, pro = fpr[keep], pro[keep]
        if fpr.size < 2 or fpr.max() == fpr.min():
            return None
        rescaled = (fpr - fpr.min()) / (fpr.max() - fpr.min())
        return float(auc(rescaled, pro))

    def f1_threshold(self, name: str) -> float | None:
        """The map threshold with the highest pixel F1 (predicted: score >= threshold; the lowest threshold
        among equal F1), as ``precision_recall_curve`` gives it; None without defect pixels. The best F1 is
        always reached at a defect score: lowering a threshold past normal scores only adds false positives.
        """
        t = self._finished(name)
        return t['f1_threshold'] if t['n_pos'] else None

    def score_range(self, name: str) -> tuple[float, float]:
        """Smallest and largest map value over the subset's images (0, 0 when it has none)."""
        t = self._finished(name)
        return t['low'], t['high']


class _DefectBuffer:
    """Defect-pixel scores and weights of several images in two growing arrays (a few large allocations
    instead of two small ones per image, which would fragment the heap)."""

    def __init__(self, dtype: np.dtype, capacity: int):
        self.scores = np.empty(max(capacity, 1), dtype=dtype)
        self.weights = np.empty(max(capacity, 1), dtype=np.float64)
        self.images: list[tuple[int, int]] = []  # (image, pixels), in order
        self.size = 0

    def append(self, image: int, scores: np.ndarray, weights: np.ndarray | None) -> None:
        end = self.size + scores.size
        if end > self.scores.size:
            grown = max(end, 2 * self.scores.size)
            self.scores = np.concatenate((self.scores[:self.size], np.empty(grown - self.size, self.scores.dtype)))
            self.weights = np.concatenate((self.weights[:self.size], np.empty(grown - self.size)))
        self.scores[self.size:end] = scores
        self.weights[self.size:end] = 0.0 if weights is None else weights
        self.images.append((image, scores.size))
        self.size = end

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores, weights and the image each pixel belongs to."""
        owners = np.repeat(np.array([i for i, _ in self.images], dtype=np.int64),
                           np.array([n for _, n in self.images], dtype=np.int64))
        return self.scores[:self.size], self.weights[:self.size], owners


def _add_runs(counts: np.ndarray, index: np.ndarray) -> None:
    """``counts[k] += number of times k occurs in index``, for a non-decreasing ``index``, without a
    full-length count array per call."""
    if index.size == 0:
        return
    starts = np.concatenate(([0], np.flatnonzero(index[1:] != index[:-1]) + 1))
    counts[index[starts]] += np.diff(np.concatenate((starts, [index.size])))


def _region_weights(lab: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """1 / (area of its region) for each defect pixel, in ``mask`` order; ``lab`` from ``ndimage.label``."""
    sizes = np.bincount(lab.ravel())
    sizes[0] = 1  # background, never looked up
    return (1.0 / sizes)[lab[mask]]


def _threshold_histogram(values: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """How many scores are first predicted at each threshold: entry k counts the values v with exactly k
    thresholds >= v (predicted, v > tau, from threshold k on); entry K those never predicted.

    Args:
        values: (n,) scores, sorted ascending (same float type as ``taus``, or exactly convertible to it).
        taus: (K,) non-increasing thresholds.
    Returns:
        (K + 1,) int64 counts summing to n.
    """
    # first_k(v) >= j  <=>  taus[j - 1] >= v, so the number of such v is searchsorted(values, taus[j - 1], right)
    at_least = np.concatenate(([values.size], np.searchsorted(values, taus, side='right')))
    return np.concatenate((at_least[:-1] - at_least[1:], at_least[-1:]))


def _slots(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Slot of each x among sorted distinct ``values`` (U,): 2j for the open gap just below values[j]
    (2U: above them all), 2j + 1 for x == values[j]."""
    j = np.searchsorted(values, x, side='left')
    tie = np.zeros(x.shape, dtype=bool)
    inside = j < values.size
    tie[inside] = values[j[inside]] == x[inside]
    return 2 * j + tie


def _one_subset(masks: np.ndarray, maps: np.ndarray, valid: np.ndarray | None, pro: bool,
                fpr_limit: float = 0.3, cflow_thresholds: int = 1000) -> PixelMetrics | None:
    """:class:`PixelMetrics` of the valid images of in-memory arrays (None when no image is valid)."""
    masks, maps, idx = _prepare(masks, maps, valid)
    if idx.size == 0:
        return None
    selected = np.zeros(maps.shape[0], dtype=bool)
    selected[idx] = True
    metrics = PixelMetrics(maps.shape[0], {'valid': selected}, pro, fpr_limit, cflow_thresholds)
    index = np.arange(maps.shape[0])
    while not metrics.done:
        metrics.add(index, maps, masks)
        metrics.end_pass()
    return metrics


def pixel_auroc(masks: np.ndarray, maps: np.ndarray, valid: np.ndarray | None = None) -> float | None:
    """Segmentation AUROC over all pixels of the valid images, flattened together.

    Equal to ``roc_auc_score(masks[valid].ravel(), maps[valid].ravel())`` (ties count one half), computed
    by :class:`PixelMetrics` (which streams maps that do not fit in memory).

    Args:
        masks: (N, H, W) ground truth; nonzero marks a defect pixel.
        maps: (N, H, W) anomaly maps, higher is more anomalous.
        valid: (N,) booleans; only images flagged True count. None means all.
    Returns:
        The AUROC in [0, 1], or None when the valid pixels hold only one class.
    """
    metrics = _one_subset(masks, maps, valid, pro=False)
    return None if metrics is None else metrics.pixel_auroc('valid')


def aupro(masks: np.ndarray, maps: np.ndarray, valid: np.ndarray | None = None,
          fpr_limit: float = 0.3) -> float | None:
    """Normalised area under the per-region-overlap curve, as in the MVTec AD evaluation code.

    Regions are the 8-connected components of each ground-truth mask. At threshold t (every distinct
    score), PRO(t) is the mean over all regions of all valid images of the fraction of the region's
    pixels with score >= t, and FPR(t) is the fraction of all normal pixels of the valid images (good
    images included) with score >= t. The curve starts at (0, 0); it is integrated with the trapezoid
    rule up to exactly ``fpr_limit`` (interpolating linearly there) and divided by ``fpr_limit``.
    Computed by :class:`PixelMetrics`.

    Args:
        masks: (N, H, W) ground truth; nonzero marks a defect pixel.
        maps: (N, H, W) anomaly maps, higher is more anomalous.
        valid: (N,) booleans; only images flagged True count. None means all.
        fpr_limit: upper end of the integration, in (0, 1].
    Returns:
        AUPRO in [0, 1], or None when there are no defect regions or no normal pixels.
    """
    _check_fpr_limit(fpr_limit)
    metrics = _one_subset(masks, maps, valid, pro=True, fpr_limit=fpr_limit)
    return None if metrics is None else metrics.aupro('valid')


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
    metrics = _one_subset(masks, maps, valid, pro=True, fpr_limit=fpr_limit, cflow_thresholds=int(num_thresholds))
    return None if metrics is None else metrics.aupro_cflow('valid')
