"""Metrics against sklearn, plain brute-force references and known answers."""
from fractions import Fraction

import numpy as np
import pytest
from skimage.measure import label, regionprops
from sklearn.metrics import auc, roc_auc_score

from utils.errors import UserError
from utils.metrics import (PixelMetrics, _threshold_histogram, aupro, aupro_cflow, image_auroc, per_region_labels,
                           pixel_auroc)

TOL = 1e-4


def brute_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """MVTec AUPRO by a loop over every distinct score (prediction: score >= threshold)."""
    regions = []
    for i, mask in enumerate(masks):
        labels = label(mask, connectivity=2)
        regions += [(i, labels == r) for r in range(1, labels.max() + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        pred = maps >= threshold
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(np.mean([(pred[i] & region).sum() / region.sum() for i, region in regions]))
    area = 0.0
    for i in range(1, len(fprs)):
        x0, y0, x1, y1 = fprs[i - 1], pros[i - 1], fprs[i], pros[i]
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
            break
    return area / fpr_limit


def brute_aupro_cflow(masks: np.ndarray, maps: np.ndarray, num_thresholds: int = 1000,
                      fpr_limit: float = 0.3, filled: bool = True) -> float:
    """The original CFLOW-AD loop over thresholds, with skimage regionprops (labels computed once)."""
    maps = maps.astype(np.float64)
    max_th, min_th = maps.max(), maps.min()
    delta = (max_th - min_th) / num_thresholds
    props = [regionprops(label(mask, connectivity=2)) for mask in masks]
    fprs, pros = [], []
    for step in range(num_thresholds):
        pred = maps > max_th - step * delta
        pro = []
        for i in range(len(maps)):
            for prop in props[i]:
                r0, c0, r1, c1 = prop.bbox
                region = prop.image_filled if filled else prop.image
                pro.append(np.logical_and(pred[i][r0:r1, c0:c1], region).sum() / prop.area)
        pros.append(np.mean(pro))
        fprs.append(np.logical_and(~masks, pred).sum() / (~masks).sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= fpr_limit
    selected = fprs[keep]
    return auc((selected - selected.min()) / (selected.max() - selected.min()), pros[keep])


def random_case(seed: int, n: int = 5, size: int = 32,
                levels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Blob masks (image 0 good, some defect images may be empty), a ring with a hole, two regions that touch
    at a corner only, and maps that score defects higher on average; ``levels`` quantises the maps (ties)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(2, n):
        for _ in range(rng.integers(0, 3)):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.integers(1, 6, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    masks[1, 20:27, 3:10] = True
    masks[1, 22:25, 5:8] = False
    masks[1, 2:5, 2:5] = True
    masks[1, 5:8, 5:8] = True
    maps = rng.random((n, size, size)) + 0.6 * masks + 0.3 * rng.random((n, 1, 1))
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return masks, maps


def striped_masks(columns: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros((1, 400, 7), dtype=bool)
    mask[0, :, list(columns)] = True
    return mask


STRIPED_MAP = (np.arange(2800, dtype=np.float32) / 2800).reshape(1, 400, 7)


# ----- image and pixel AUROC -----

def test_image_auroc_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = np.round(rng.random(50) + 0.3 * labels, 1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0


def test_image_auroc_one_class_and_bad_input():
    assert image_auroc(np.zeros(4), np.arange(4.0)) is None
    with pytest.raises(UserError):
        image_auroc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(UserError):
        image_auroc(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(UserError):
        image_auroc(np.array([0, 1]), np.array([0.1, np.nan]))


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_pixel_auroc_matches_sklearn(dtype):
    masks, maps = random_case(1, levels=50)
    maps = maps.astype(dtype)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_valid_excludes_images():
    masks, maps = random_case(2)
    maps = maps.astype(np.float32)
    valid = np.array([True, False, True, True, False])
    expected = roc_auc_score(masks[valid].ravel(), maps[valid].ravel())
    assert pixel_auroc(masks, maps, valid) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(masks, maps, valid) != pytest.approx(pixel_auroc(masks, maps), abs=1e-6)
    assert pixel_auroc(masks, maps, np.zeros(5, dtype=bool)) is None
    assert pixel_auroc(np.zeros_like(masks), maps) is None
    for where in (masks, ~masks):
        with pytest.raises(UserError):
            pixel_auroc(masks, np.where(where, np.nan, maps))


# ----- standard AUPRO -----

@pytest.mark.parametrize('seed,levels,size,dtype', [(0, 40, 32, np.float64), (1, 40, 32, np.float32),
                                                     (2, 7, 32, np.float64), (3, None, 16, np.float32),
                                                     (4, None, 16, np.float64)])
@pytest.mark.parametrize('fpr_limit', [0.3, 1.0])
def test_aupro_matches_brute_force(seed, levels, size, dtype, fpr_limit):
    masks, maps = random_case(seed, size=size, levels=levels)
    maps = maps.astype(dtype)
    expected = brute_aupro(masks, maps.astype(np.float64), fpr_limit)
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=TOL)


def test_aupro_valid_excludes_images():
    masks, maps = random_case(5, levels=30)
    valid = np.array([True, True, False, True, False])
    expected = brute_aupro(masks[valid], maps[valid], 0.3)
    assert aupro(masks, maps, valid) == pytest.approx(expected, abs=TOL)
    changed = maps.copy()
    changed[~valid] = 100.0
    assert aupro(masks, changed, valid) == aupro(masks, maps, valid)
    assert aupro(masks, maps, np.zeros(5, dtype=bool)) is None


def test_aupro_known_answers():
    masks, maps = random_case(6)
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, masks + 0.5 * maps) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, 1.0 - masks.astype(np.float64)) == pytest.approx(0.0, abs=1e-12)
    constant = np.full(masks.shape, 0.25, dtype=np.float32)
    assert aupro(masks, constant) == pytest.approx(0.15, abs=1e-12)
    assert aupro(masks, constant, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)
    assert aupro(masks[1:2], maps[1:2]) == pytest.approx(brute_aupro(masks[1:2], maps[1:2], 0.3), abs=TOL)


def test_aupro_striped_case():
    # Scores rise along the rows (400 x 7); each row adds the same share of normal pixels and of every
    # stripe, so over full rows the staircase PRO(FPR) has the trapezoid area of PRO = FPR. In units of
    # 1/400 per axis, FPR = 1/3 is a third of the way into row 133: with one stripe that third lies at
    # height 133; with three stripes a quarter lies at 133 and a twelfth at 133 + 1/3.
    full = Fraction(133 ** 2, 2)
    one = 3 * (full + Fraction(133, 3)) / 400 ** 2
    three = 3 * (full + Fraction(133, 4) + (133 + Fraction(1, 3)) / 12) / 400 ** 2
    assert aupro(striped_masks((3,)), STRIPED_MAP, fpr_limit=1 / 3) == pytest.approx(float(one), abs=1e-12)
    value = aupro(striped_masks((1, 3, 5)), STRIPED_MAP, fpr_limit=1 / 3)
    assert value == pytest.approx(float(three), abs=1e-12)
    both_masks = np.concatenate([striped_masks((3,)), striped_masks((1, 3, 5))])
    both_maps = np.concatenate([STRIPED_MAP, STRIPED_MAP])
    value = aupro(both_masks, both_maps, fpr_limit=1 / 3)
    assert value == pytest.approx(1 / 6, abs=1e-3)
    assert value == pytest.approx(brute_aupro(both_masks, both_maps.astype(np.float64), 1 / 3), abs=1e-9)


def test_aupro_undefined_and_bad_input():
    masks, maps = random_case(7)
    assert aupro(np.zeros_like(masks), maps) is None
    assert aupro(np.ones_like(masks), maps) is None
    with pytest.raises(UserError):
        aupro(masks, maps[:, :, :-1])
    with pytest.raises(UserError):
        aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(UserError):
        aupro(masks, maps, valid=np.ones(3, dtype=bool))
    with pytest.raises(UserError):
        aupro(masks, np.where(masks, np.nan, maps))


# ----- CFLOW-AD AUPRO -----

@pytest.mark.parametrize('seed,levels,dtype', [(10, None, np.float64), (11, None, np.float32),
                                               (12, 25, np.float64), (13, 6, np.float32)])
def test_aupro_cflow_matches_brute_force(seed, levels, dtype):
    masks, maps = random_case(seed, levels=levels)
    maps = maps.astype(dtype)
    expected = brute_aupro_cflow(masks, maps)
    assert aupro_cflow(masks, maps) == pytest.approx(expected, abs=TOL)


def test_aupro_cflow_scores_on_thresholds_are_not_predicted():
    masks, maps = random_case(17, levels=10)
    grid = np.round(maps * 10)
    steps = int(grid.max() - grid.min())
    expected = brute_aupro_cflow(masks, grid, num_thresholds=steps, fpr_limit=0.6)
    assert aupro_cflow(masks, grid, num_thresholds=steps, fpr_limit=0.6) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize('high,low,num', [(1.0, 0.1, 1000), (0.7, -0.3, 997), (1e-3, -2.9, 333), (0.5, 0.5, 10)])
def test_threshold_histogram_matches_binary_search(high, low, num):
    delta = (high - low) / num
    taus = high - np.arange(num, dtype=np.float64) * delta
    values = np.concatenate([taus, np.nextafter(taus, np.inf), np.nextafter(taus, -np.inf), [low, low]])
    values = np.sort(values[values <= high])
    first_k = num - np.searchsorted(taus[::-1], values, side='left')  # number of thresholds >= v
    np.testing.assert_array_equal(_threshold_histogram(values, taus), np.bincount(first_k, minlength=num + 1))


def test_aupro_cflow_uses_hole_filled_regions():
    masks, maps = random_case(14)
    maps[1, 22:25, 5:8] += 0.8
    expected = brute_aupro_cflow(masks, maps, num_thresholds=200)
    assert abs(expected - brute_aupro_cflow(masks, maps, num_thresholds=200, filled=False)) > 1e-3
    assert aupro_cflow(masks, maps, num_thresholds=200) == pytest.approx(expected, abs=TOL)


def test_aupro_cflow_valid_and_fpr_limit():
    masks, maps = random_case(15, levels=40)
    valid = np.array([False, True, True, True, True])
    maps[0] += 5.0
    expected = brute_aupro_cflow(masks[valid], maps[valid], num_thresholds=300, fpr_limit=0.5)
    value = aupro_cflow(masks, maps, valid, num_thresholds=300, fpr_limit=0.5)
    assert value == pytest.approx(expected, abs=TOL)
    single = brute_aupro_cflow(masks[1:2], maps[1:2], num_thresholds=100)
    assert aupro_cflow(masks[1:2], maps[1:2], num_thresholds=100) == pytest.approx(single, abs=TOL)


def test_aupro_cflow_known_answers():
    masks, maps = random_case(16)
    normals_spread = np.where(masks, 1.0, 0.99 * maps / maps.max())
    normals_spread[0, 0, 0] = 0.0
    assert aupro_cflow(masks, normals_spread) > 1.0 + 1e-3
    masks[1, 22:25, 5:8] = True
    normals_spread = np.where(masks, 1.0, normals_spread)
    assert aupro_cflow(masks, normals_spread) == pytest.approx(1.0, abs=1e-12)
    assert aupro_cflow(masks, 1.0 - normals_spread) == pytest.approx(0.0, abs=1e-12)
    assert aupro_cflow(masks, np.full(masks.shape, 0.5)) is None
    assert aupro_cflow(masks, masks.astype(np.float32)) is None
    assert aupro_cflow(np.zeros_like(masks), maps) is None
    with pytest.raises(UserError):
        aupro_cflow(masks, maps, num_thresholds=0)


# ----- labelling -----

def test_per_region_labels_eight_connectivity():
    mask = np.zeros((8, 8), dtype=bool)
    mask[0:2, 0:2] = True
    mask[2:4, 2:4] = True
    mask[6:8, 0:2] = True
    labels = per_region_labels(mask)
    assert labels.dtype == np.int32 and labels.max() == 2
    assert labels[0, 0] == labels[3, 3] != labels[7, 0]
    assert (labels == 0).sum() == (~mask).sum()


# ----- streaming: PixelMetrics over chunks and subsets -----

def _stream(masks, maps, subsets, chunks, pro=True, **kwargs):
    """PixelMetrics fed in the given chunks (lists of image indices, any order), every pass."""
    pm = PixelMetrics(len(maps), subsets, pro, **kwargs)
    while not pm.done:
        for idx in chunks:
            idx = np.asarray(idx)
            pm.add(idx, maps[idx], masks[idx])
        pm.end_pass()
    return pm


@pytest.mark.parametrize('seed,levels,dtype', [(20, None, np.float32), (21, 12, np.float64), (22, 30, np.float32)])
@pytest.mark.parametrize('budget', [1 << 22, 300, 40, 2])
def test_pixel_metrics_chunks_and_subsets_equal_whole_set(seed, levels, dtype, budget):
    from utils.visualize import f1_threshold
    masks, maps = random_case(seed, n=7, levels=levels)
    maps = maps.astype(dtype)
    rng = np.random.default_rng(seed)
    valid = np.ones(7, dtype=bool)
    valid[4] = False
    subsets = {'valid': valid, 'some': valid & np.isin(np.arange(7), [0, 1, 3, 5]), 'none': np.zeros(7, bool),
               'same': valid.copy()}  # a repeated subset is computed once
    order = rng.permutation(7)
    chunks = [order[:3], order[3:4], order[4:]]
    pm = _stream(masks, maps, subsets, chunks, fpr_limit=0.3, cflow_thresholds=200, max_defect_pixels=budget)
    # all defect pixels at once (two passes), or ranges of at most half the budget (one pass each, plus two)
    assert pm.passes == 2 if budget > masks.sum() else pm.passes > 4
    assert list(pm.member) == ['valid', 'some', 'none']
    for name, sel in subsets.items():
        if not sel.any():
            assert pm.pixel_auroc(name) is None and pm.aupro(name) is None and pm.aupro_cflow(name) is None
            continue
        expected_auroc = roc_auc_score(masks[sel].ravel(), maps[sel].ravel())
        assert pm.pixel_auroc(name) == pytest.approx(expected_auroc, abs=1e-12)
        assert pm.aupro(name) == pytest.approx(aupro(masks[sel], maps[sel]), abs=1e-12)
        assert pm.aupro(name) == pytest.approx(brute_aupro(masks[sel], maps[sel].astype(np.float64), 0.3), abs=TOL)
        assert pm.aupro_cflow(name) == pytest.approx(brute_aupro_cflow(masks[sel], maps[sel], 200), abs=TOL)
        assert pm.score_range(name) == (pytest.approx(float(maps[sel].min())), pytest.approx(float(maps[sel].max())))
        assert pm.f1_threshold(name) == f1_threshold(masks[sel], maps[sel])


@pytest.mark.parametrize('levels', [None, 8])
def test_pixel_metrics_f1_threshold_matches_precision_recall_curve(levels):
    from utils.visualize import f1_threshold
    masks, maps = random_case(23, n=6, levels=levels)
    valid = np.array([True, True, True, False, True, True])
    pm = _stream(masks, maps, {'v': valid}, [[0, 1], [2, 3, 4, 5]], pro=False)
    assert pm.f1_threshold('v') == pytest.approx(f1_threshold(masks[valid], maps[valid]), abs=0)
    empty = _stream(np.zeros_like(masks), maps, {'v': valid}, [range(6)], pro=False)
    assert empty.f1_threshold('v') is None


def test_pixel_metrics_needs_each_image_once_per_pass():
    masks, maps = random_case(24)
    pm = PixelMetrics(5, {'all': np.ones(5, dtype=bool)})
    pm.add(np.arange(3), maps[:3], masks[:3])
    with pytest.raises(ValueError):
        pm.add(np.array([2]), maps[2:3], masks[2:3])  # shown twice
    with pytest.raises(ValueError):
        pm.end_pass()  # images 3 and 4 were not shown
    pm = PixelMetrics(5, {'all': np.ones(5, dtype=bool), 'few': np.arange(5) < 2})
    pm.add(np.arange(5), maps, masks)
    pm.end_pass()
    pm.add(np.arange(2, 5), maps[2:], masks[2:])  # images 0 and 1 belong to 'few' and 'all'
    with pytest.raises(ValueError):
        pm.pixel_auroc('all')  # not done
    with pytest.raises(UserError):
        PixelMetrics(5, {'all': np.ones(4, dtype=bool)})
    with pytest.raises(UserError):
        PixelMetrics(5, {'all': np.ones(5, dtype=bool)}).add(np.arange(5), np.where(masks, np.inf, maps), masks)
