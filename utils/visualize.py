"""Anomaly-map figures and score histograms as PNG files (matplotlib, Agg backend)."""
from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from utils.errors import UserError
from utils.io import atomic_write_bytes

THRESHOLD_NOTE = 'F1-optimal on the test set (test-selected)'
_IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')


def _pyplot():
    """pyplot on the Agg backend, imported on first use so that importing this module has no side effects."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def denormalize(images: np.ndarray, mean: float | Sequence[float],
                std: float | Sequence[float]) -> np.ndarray:
    """Undo the input normalisation ``(x - mean) / std`` for display.

    Args:
        images: (N, 3, H, W) normalised float images.
        mean: per-channel mean (3 values) or one value for all channels.
        std: per-channel standard deviation (3 values) or one value.
    Returns:
        (N, H, W, 3) uint8 images, clipped to 0..255.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f'denormalize needs images of shape (N, 3, H, W), got {images.shape}; '
                        'pass a batch of normalised RGB images')
    mean_arr = np.broadcast_to(np.asarray(mean, dtype=np.float32).reshape(-1), (3,)).reshape(1, 3, 1, 1)
    std_arr = np.broadcast_to(np.asarray(std, dtype=np.float32).reshape(-1), (3,)).reshape(1, 3, 1, 1)
    rgb = np.clip(images * std_arr + mean_arr, 0.0, 1.0)
    return np.rint(rgb * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def f1_threshold(labels_or_mask: np.ndarray, scores: np.ndarray) -> float | None:
    """Threshold at the maximum F1 of the precision-recall curve, as the original's ``--viz`` picks it.

    The threshold is chosen with the test labels (an oracle choice); callers must label it as test-selected.

    Args:
        labels_or_mask: any shape, ground truth (nonzero = anomalous): image labels or pixel masks.
        scores: same number of elements, anomaly scores (higher = more anomalous).
    Returns:
        The score threshold (predict anomalous where ``score >= threshold``), or None when the labels hold
        no anomalous element (F1 is undefined).
    """
    from sklearn.metrics import precision_recall_curve
    truth = np.asarray(labels_or_mask).ravel() != 0
    values = np.asarray(scores, dtype=np.float64).ravel()
    if truth.size != values.size or truth.size == 0:
        raise UserError(f'f1_threshold needs equally many labels and scores, got {truth.size} and '
                        f'{values.size}; pass matching, non-empty arrays')
    if not truth.any():
        return None
    precision, recall, thresholds = precision_recall_curve(truth, values)
    num = 2.0 * precision * recall
    den = precision + recall
    f1 = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def figure_file_name(name: str, index: int) -> str:
    """File-system-safe PNG name for a test image, e.g. 'broken_large/000.png' -> 'broken_large_000.png'."""
    stem = name.replace('\\', '/').strip('/')
    if stem.lower().endswith(_IMAGE_SUFFIXES):
        stem = stem[:stem.rfind('.')]
    stem = re.sub(r'[^A-Za-z0-9._-]+', '_', stem).strip('._')
    return f'{stem or f"{index:05d}"}.png'


def unique_file_names(names: Sequence[str]) -> list[str]:
    """:func:`figure_file_name` of each name, with a suffix where two would clash."""
    seen: set[str] = set()
    out = []
    for i, name in enumerate(names):
        file_name = figure_file_name(str(name), i)
        base, k = file_name[:-4], 1
        while file_name in seen:
            file_name, k = f'{base}_{k}.png', k + 1
        seen.add(file_name)
        out.append(file_name)
    return out


def _check_inputs(images: np.ndarray, masks: np.ndarray, maps: np.ndarray, labels: np.ndarray,
                  scores: np.ndarray, names: Sequence[str]) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise UserError(f'images must have shape (N, H, W, 3) with N >= 1, got {images.shape}')
    n, h, w = images.shape[:3]
    for what, arr in (('masks', masks), ('maps', maps)):
        if arr.shape != (n, h, w):
            raise UserError(f'{what} must have shape {(n, h, w)} to match the images, got {arr.shape}')
    for what, count in (('labels', labels.size), ('scores', scores.size), ('names', len(names))):
        if count != n:
            raise UserError(f'{what} must have one entry per image ({n}), got {count}')


def _save_png(fig, path: str) -> None:
    atomic_write_bytes(path, lambda f: fig.savefig(f, format='png', pil_kwargs={'compress_level': 1}))


class _AnomalyFigure:
    """One reusable three-panel figure: drawing a new image swaps data instead of building a new figure."""

    def __init__(self, height: int, width: int, vmax: float) -> None:
        plt = _pyplot()
        self.fig, self.axes = plt.subplots(1, 3, figsize=(14.0, 5.2), dpi=100)
        blank = np.zeros((height, width, 3), dtype=np.uint8)
        self.backgrounds = [ax.imshow(blank, interpolation='nearest') for ax in self.axes]
        self.overlay = self.axes[1].imshow(np.zeros((height, width), dtype=np.float32), cmap='jet', alpha=0.5,
                                           vmin=0.0, vmax=vmax, interpolation='nearest')
        self.fig.colorbar(self.overlay, ax=self.axes[1], fraction=0.046, pad=0.02)
        for ax in self.axes:
            ax.set_axis_off()
            ax.set_autoscale_on(False)
        self.fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.78, wspace=0.08)
        self.title = self.fig.suptitle('', fontsize=10)
        self.contours: list = []
        self.notes: list = []

    def _clear(self) -> None:
        for artist in self.contours + self.notes:
            artist.remove()
        self.contours, self.notes = [], []

    def _outline(self, ax, region: np.ndarray, color: str, width: float, style: str = 'solid') -> None:
        if region.any():
            padded = np.pad(region.astype(np.float32), 1)
            extent_y = np.arange(-1, region.shape[0] + 1)
            extent_x = np.arange(-1, region.shape[1] + 1)
            self.contours.append(ax.contour(extent_x, extent_y, padded, levels=[0.5], colors=color,
                                            linewidths=width, linestyles=style))

    def _note(self, ax, text: str) -> None:
        self.notes.append(ax.text(0.5, 0.03, text, transform=ax.transAxes, ha='center', va='bottom',
                                  fontsize=8, color='white',
                                  bbox={'facecolor': 'black', 'alpha': 0.6, 'pad': 2}))

    def draw(self, image: np.ndarray, mask: np.ndarray, amap: np.ndarray, title: str,
             pixel_threshold: float | None) -> None:
        self._clear()
        for bg in self.backgrounds:
            bg.set_data(image)
        self.overlay.set_data(amap)
        self._outline(self.axes[0], mask, 'red', 2.0)
        self.axes[0].set_title('image, ground truth outlined in red', fontsize=9)
        if not mask.any():
            self._note(self.axes[0], 'no defect in the ground truth')
        self.axes[1].set_title('anomaly map (jet overlay)\ncolour scale shared by the whole test set',
                               fontsize=9)
        if pixel_threshold is None:
            self.axes[2].set_title('predicted region: no pixel threshold\n'
                                   '(no anomalous pixels in the test set)', fontsize=9)
        else:
            predicted = amap >= pixel_threshold
            self._outline(self.axes[2], mask, 'red', 1.0, 'dashed')
            self._outline(self.axes[2], predicted, 'yellow', 2.0)
            self.axes[2].set_title(f'predicted region: map >= {pixel_threshold:.4g} (yellow), '
                                   f'truth dashed red\npixel threshold {THRESHOLD_NOTE}', fontsize=9)
            if not predicted.any():
                self._note(self.axes[2], 'no pixel above the threshold')
        self.title.set_text(title)

    def close(self) -> None:
        _pyplot().close(self.fig)


def _figure_title(name: str, label: int, score: float, image_threshold: float | None) -> str:
    kind = 'anomalous' if label else 'normal'
    if image_threshold is None:
        verdict = 'no image threshold'
    else:
        side = '>=' if score >= image_threshold else '<'
        verdict = f'score {side} image threshold {image_threshold:.4g} ({THRESHOLD_NOTE})'
    return f'{name}\nlabel: {kind} ({label})   image score: {score:.4g}   {verdict}'


def save_anomaly_figures(out_dir: str, images: np.ndarray, masks: np.ndarray, maps: np.ndarray,
                         labels: np.ndarray, scores: np.ndarray, names: Sequence[str],
                         pixel_threshold: float | None, image_threshold: float | None,
                         progress: bool = True, vmax: float | None = None,
                         file_names: Sequence[str] | None = None) -> list[str]:
    """Write one three-panel PNG per test image: ground truth, anomaly-map overlay, predicted region.

    The map colour scale runs from 0 to ``vmax`` (default: the maximum over these maps), so figures compare
    across images; a caller that writes a large set in several calls passes the set's maximum and the file
    names of :func:`unique_file_names` over the whole set. Both thresholds are expected to be the
    test-selected F1-optimal ones (see ``f1_threshold``).

    Args:
        out_dir: folder for the PNG files (created if missing).
        images: (N, H, W, 3) uint8 images.
        masks: (N, H, W) ground-truth masks (nonzero = defect).
        maps: (N, H, W) anomaly maps (higher = more anomalous).
        labels: (N,) image labels (0 normal, 1 anomalous).
        scores: (N,) image anomaly scores.
        names: N image names relative to the test folder, e.g. 'broken_large/000.png'.
        pixel_threshold: map threshold for the predicted region, or None.
        image_threshold: image-score threshold, or None.
        progress: show a tqdm progress bar.
        vmax: top of the colour scale, or None for the largest finite value of ``maps``.
        file_names: one PNG file name per image, or None for ``unique_file_names(names)``.
    Returns:
        The written file paths, in image order.
    """
    images = np.asarray(images)
    masks = np.asarray(masks) != 0
    maps = np.asarray(maps, dtype=np.float32)
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    _check_inputs(images, masks, maps, labels, scores, names)
    if images.dtype != np.uint8:
        raise UserError(f'images must be uint8 (use denormalize first), got {images.dtype}')
    os.makedirs(out_dir, exist_ok=True)
    if vmax is None:
        finite = maps[np.isfinite(maps)]
        vmax = float(finite.max()) if finite.size else 0.0
    if file_names is None:
        file_names = unique_file_names(names)
    elif len(file_names) != len(names):
        raise UserError(f'file_names must have one entry per image ({len(names)}), got {len(file_names)}')
    figure = _AnomalyFigure(images.shape[1], images.shape[2], vmax if vmax > 0 else 1.0)
    paths = []
    try:
        for i, file_name in enumerate(tqdm(file_names, desc='figures', unit='img',
                                           leave=False, disable=not progress)):
            title = _figure_title(str(names[i]), int(labels[i]), float(scores[i]), image_threshold)
            figure.draw(images[i], masks[i], maps[i], title, pixel_threshold)
            path = os.path.join(out_dir, file_name)
            _save_png(figure.fig, path)
            paths.append(path)
    finally:
        figure.close()
    return paths


def _density(ax, counts: np.ndarray, edges: np.ndarray, color: str, label: str) -> None:
    total = int(counts.sum())
    if total == 0:
        return
    ax.stairs(counts / (total * np.diff(edges)), edges, fill=True, alpha=0.45, color=color,
              label=f'{label} (n={total:,})')


def _score_panel(ax, edges: np.ndarray | None, normal: np.ndarray, anomalous: np.ndarray, title: str,
                 xlabel: str, log_y: bool) -> None:
    """Density histograms of normal and anomalous counts over the bins ``edges`` (None: no finite score)."""
    if edges is None or normal.sum() + anomalous.sum() == 0:
        ax.text(0.5, 0.5, 'no scores', ha='center', va='center', transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        return
    _density(ax, normal, edges, 'tab:blue', 'normal')
    _density(ax, anomalous, edges, 'tab:red', 'anomalous')
    if anomalous.sum() == 0:
        ax.text(0.98, 0.95, 'no anomalous samples', ha='right', va='top', transform=ax.transAxes, fontsize=8)
    if log_y:
        ax.set_yscale('log')
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel('density (log scale)' if log_y else 'density')
    ax.legend(fontsize=8)


def histogram_edges(low: float, high: float, bins: int) -> np.ndarray | None:
    """``bins`` equal bins from ``low`` to ``high`` (one unit wide when they are equal); None when either
    is not finite."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return None
    if high <= low:
        high = low + 1.0
    return np.linspace(low, high, bins + 1)


def pixel_histogram(masks: np.ndarray, maps: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the normal and of the defect pixel scores in the bins ``edges`` (values outside them and
    non-finite values are left out); sums over chunks of a set give the set's counts.

    Args:
        masks: (N, H, W) ground truth (nonzero = defect).
        maps: (N, H, W) anomaly maps.
        edges: (B + 1,) increasing bin edges.
    Returns:
        normal counts (B,) and defect counts (B,), int64.
    """
    masks = np.asarray(masks) != 0
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise UserError(f'masks and maps must both have shape (N, H, W), got {masks.shape} and {maps.shape}')
    normal, _ = np.histogram(maps[~masks], bins=edges)
    anomalous, _ = np.histogram(maps[masks], bins=edges)
    return normal.astype(np.int64), anomalous.astype(np.int64)


def save_score_histogram(path: str, edges: np.ndarray | None, normal_counts: np.ndarray,
                         anomalous_counts: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> None:
    """Write one PNG: density histograms of pixel scores and of image scores, normal vs anomalous.

    Args:
        path: output PNG path (parent folders are created).
        edges: (B + 1,) bin edges of the pixel scores (see :func:`histogram_edges`), or None.
        normal_counts, anomalous_counts: (B,) pixel counts per bin (see :func:`pixel_histogram`).
        labels: (N,) image labels (0 normal, 1 anomalous).
        scores: (N,) image anomaly scores.
    """
    labels = np.asarray(labels).ravel() != 0
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.size != scores.size:
        raise UserError(f'labels and scores need one entry per image, got {labels.size} and {scores.size}')
    if edges is not None and not (len(normal_counts) == len(anomalous_counts) == len(edges) - 1):
        raise UserError(f'pixel counts need one entry per bin ({len(edges) - 1}), got {len(normal_counts)} '
                        f'and {len(anomalous_counts)}')
    finite = scores[np.isfinite(scores)]
    image_edges = histogram_edges(float(finite.min()), float(finite.max()), int(np.clip(scores.size // 2, 10, 50))) \
        if finite.size else None
    image_counts = [np.histogram(scores[sel & np.isfinite(scores)], bins=image_edges)[0] if image_edges is not None
                    else np.zeros(0, dtype=np.int64) for sel in (~labels, labels)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12.0, 4.5), dpi=100)
    try:
        _score_panel(axes[0], edges, np.asarray(normal_counts), np.asarray(anomalous_counts), 'pixel scores',
                     'anomaly-map value', True)
        _score_panel(axes[1], image_edges, *image_counts, 'image scores', 'image score', False)
        fig.tight_layout()
        _save_png(fig, path)
    finally:
        plt.close(fig)
