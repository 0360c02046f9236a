"""The slow paths of the original CFLOW-AD implementation, kept as a speed and agreement baseline.

Training: per image batch and tapped layer, the positional encoding is rebuilt on the CPU, fibers are
shuffled and cut into steps of 256 that call the FrEIA decoder module itself, ``decoder(x, [c])``, with one
default ``torch.optim.Adam`` over all decoders and ``zero_grad()`` at its default of the installed PyTorch
(gradients freed; ``set_to_none=False`` gives PyTorch 1.8's zeroed gradients, which the paper ran).
Test: fibers in chunks of 256 through ``decoder(x, [c])``, per-dimension log-likelihoods collected in Python
lists, float64 post-processing over the whole test set, sklearn AUROCs on flattened float64 arrays and the
DFR-style AUPRO loop (1000 thresholds, connected components re-labelled at every threshold).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.measure import label as label_components
from skimage.measure import regionprops
from sklearn.metrics import auc, roc_auc_score
from torch import Tensor
from torch.utils.data import DataLoader

from custom_models.flow import positional_encoding_2d

FIBER_BATCH = 256
GAUSS_CONST = -0.9189385332046727  # -0.5 * ln(2 * pi)


def make_optimizer(decoders, lr: float) -> torch.optim.Adam:
    """One default Adam over every parameter of every decoder (fixed rotations included, as listed)."""
    params = [p for d in decoders for p in d.parameters()]
    return torch.optim.Adam(params, lr=lr)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def _pos_conds(condition_dim: int, batch: int, height: int, width: int, device: torch.device) -> Tensor:
    """Positional encoding built on the CPU, repeated over the batch and moved: (batch*H*W, P)."""
    pe = positional_encoding_2d(condition_dim, height, width).unsqueeze(0).repeat(batch, 1, 1, 1)
    conds = pe.reshape(batch, condition_dim, height * width).transpose(1, 2).reshape(-1, condition_dim)
    return conds.to(device)


def _fibers(feature: Tensor) -> Tensor:
    """(B, C, H, W) -> (B*H*W, C) in (b, h, w) order."""
    b, c, h, w = feature.shape
    return feature.reshape(b, c, h * w).transpose(1, 2).reshape(-1, c)


def _log_prob_per_dim(decoder, x: Tensor, c: Tensor) -> Tensor:
    """``log p(x) / C`` through the FrEIA module call; x (n, C), c (n, P) -> (n,)."""
    z, log_jac_det = decoder(x, [c])
    dim = x.shape[1]
    log_p = dim * GAUSS_CONST - 0.5 * torch.sum(z ** 2, 1) + log_jac_det
    return log_p / dim


def train_batch(encoder, decoders, optimizer, image: Tensor, condition_dim: int,
                device: torch.device, set_to_none: bool = True) -> tuple[float, int]:
    """The fiber training of one image batch (B, 3, S, S); returns the summed loss and the fibers used.

    ``set_to_none`` is passed to ``optimizer.zero_grad``: True is PyTorch 2's default, False PyTorch 1.8's.
    """
    with torch.no_grad():
        features = encoder(image.to(device))
    total, used = 0.0, 0
    for decoder, feature in zip(decoders, features):
        e = feature.detach()
        b, _, h, w = e.shape
        c_r = _pos_conds(condition_dim, b, h, w, device)
        e_r = _fibers(e)
        n_fibers = e_r.shape[0]
        perm = torch.randperm(n_fibers).to(device)
        steps = n_fibers // FIBER_BATCH
        if steps == 0:
            raise ValueError(f'{n_fibers} fibers are fewer than one fiber batch of {FIBER_BATCH}')
        for f in range(steps):
            idx = perm[f * FIBER_BATCH:(f + 1) * FIBER_BATCH]
            loss = -F.logsigmoid(_log_prob_per_dim(decoder, e_r[idx], c_r[idx]))
            optimizer.zero_grad(set_to_none=set_to_none)
            loss.mean().backward()
            optimizer.step()
            total += float(loss.sum().detach().cpu())
            used += FIBER_BATCH
    return total, used


def train_pass(encoder, decoders, optimizer, loader: DataLoader, condition_dim: int, device: torch.device,
               lr_at: Callable[[int], float] | None = None, set_to_none: bool = True) -> tuple[float, int, float]:
    """One pass over ``loader``; returns (mean fiber loss, images, seconds).

    ``lr_at(i)``, when given, is written into the optimizer before image batch i; ``set_to_none`` as in
    :func:`train_batch`.
    """
    for d in decoders:
        d.train()
    start = time.perf_counter()
    total, used, images = 0.0, 0, 0
    for i, (image, _, _, _) in enumerate(loader):
        if lr_at is not None:
            for group in optimizer.param_groups:
                group['lr'] = lr_at(i)
        s, n = train_batch(encoder, decoders, optimizer, image, condition_dim, device, set_to_none)
        total += s
        used += n
        images += image.shape[0]
    _sync(device)
    return total / max(used, 1), images, time.perf_counter() - start


@dataclass
class TestOutput:
    """What the original's test loop collects."""
    test_dist: list[list[float]]  # per layer, log p / C of every test fiber in (n, h, w) order
    heights: list[int]
    widths: list[int]
    labels: list[int]
    masks: list[np.ndarray]  # per image (1, S, S) float
    loss: float
    seconds: float


def chunk_log_probs(decoder, feature: Tensor, condition_dim: int, device: torch.device) -> Iterator[Tensor]:
    """The original's test loop over one scale's features (B, C, H, W): the positional encoding built on the
    CPU, the fibers in (b, h, w) order, ``log p / C`` of 256 fibers per FrEIA module call (the last partial),
    one chunk at a time."""
    b, _, h, w = feature.shape
    c_r = _pos_conds(condition_dim, b, h, w, device)
    e_r = _fibers(feature)
    n_fibers = e_r.shape[0]
    for f in range((n_fibers + FIBER_BATCH - 1) // FIBER_BATCH):
        sl = slice(f * FIBER_BATCH, min((f + 1) * FIBER_BATCH, n_fibers))
        yield _log_prob_per_dim(decoder, e_r[sl], c_r[sl])


def test_pass(encoder, decoders, loader: DataLoader, condition_dim: int, device: torch.device) -> TestOutput:
    """Per-dimension log-likelihood of every test fiber, in chunks of 256, into Python lists."""
    for d in decoders:
        d.eval()
    start = time.perf_counter()
    test_dist: list[list[float]] = [[] for _ in decoders]
    heights: list[int] = []
    widths: list[int] = []
    labels: list[int] = []
    masks: list[np.ndarray] = []
    loss_sum, loss_count = 0.0, 0
    with torch.no_grad():
        for i, (image, label, mask, _) in enumerate(loader):
            labels.extend(label.cpu().numpy().tolist())
            masks.extend(mask.cpu().numpy())
            features = encoder(image.to(device))
            for layer, (decoder, feature) in enumerate(zip(decoders, features)):
                if i == 0:
                    heights.append(feature.shape[2])
                    widths.append(feature.shape[3])
                for log_prob in chunk_log_probs(decoder, feature.detach(), condition_dim, device):
                    loss = -F.logsigmoid(log_prob)
                    loss_sum += float(loss.sum().cpu())
                    loss_count += log_prob.shape[0]
                    test_dist[layer].extend(log_prob.detach().cpu().tolist())
    _sync(device)
    return TestOutput(test_dist=test_dist, heights=heights, widths=widths, labels=labels, masks=masks,
                      loss=loss_sum / max(loss_count, 1), seconds=time.perf_counter() - start)


def anomaly_maps(out: TestOutput, input_size: int) -> np.ndarray:
    """Float64 post-processing over the whole test set; returns anomaly maps (N, S, S) float64."""
    score_map = None
    for layer, dist in enumerate(out.test_dist):
        norm = torch.tensor(dist, dtype=torch.double)
        norm = norm - torch.max(norm)
        prob = torch.exp(norm)
        mask = prob.reshape(-1, out.heights[layer], out.widths[layer])
        up = F.interpolate(mask.unsqueeze(1), size=input_size, mode='bilinear', align_corners=True)
        layer_map = up.squeeze().numpy()
        score_map = layer_map.copy() if score_map is None else score_map + layer_map
    return score_map.max() - score_map


def auroc_metrics(out: TestOutput, super_mask: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Image and pixel AUROC in percent, and the boolean masks (N, S, S) the pixel AUROC used."""
    scores = super_mask.reshape(super_mask.shape[0], -1).max(axis=1)
    gt_label = np.asarray(out.labels, dtype=bool)
    image_auroc = roc_auc_score(gt_label, scores)
    gt_mask = np.squeeze(np.asarray(out.masks, dtype=bool), axis=1)
    pixel_auroc = roc_auc_score(gt_mask.flatten(), super_mask.flatten())
    return 100.0 * image_auroc, 100.0 * pixel_auroc, gt_mask


def aupro_dfr(masks: np.ndarray, amaps: np.ndarray, num_thresholds: int = 1000,
              fpr_limit: float = 0.3) -> float:
    """AUPRO in percent by the DFR-style loop of the original.

    For each of ``num_thresholds`` thresholds going down from the maximum in equal steps, every image's
    ground truth is labelled (8-connectivity), each region's overlap is counted inside its hole-filled mask
    and divided by its area; FPR is pooled over all pixels. Thresholds with FPR <= ``fpr_limit`` are kept,
    their FPRs min-max rescaled, and the trapezoidal area under PRO(FPR) is returned.

    Args:
        masks: (N, S, S) bool ground truth.
        amaps: (N, S, S) anomaly maps.
    """
    max_th, min_th = amaps.max(), amaps.min()
    delta = (max_th - min_th) / num_thresholds
    ious_mean, pros_mean, fprs = [], [], []
    binary = np.zeros_like(amaps, dtype=bool)
    for step in range(num_thresholds):
        threshold = max_th - step * delta
        binary[amaps <= threshold] = 0
        binary[amaps > threshold] = 1
        pro = []
        iou = []
        for i in range(len(binary)):
            label_map = label_components(masks[i], connectivity=2)
            for prop in regionprops(label_map):
                x_min, y_min, x_max, y_max = prop.bbox
                cropped_pred = binary[i][x_min:x_max, y_min:y_max]
                cropped_mask = prop.image_filled
                intersection = np.logical_and(cropped_pred, cropped_mask).astype(np.float32).sum()
                pro.append(intersection / prop.area)
        for i in range(len(binary)):
            if masks[i].any():
                intersection = np.logical_and(binary[i], masks[i]).astype(np.float32).sum()
                union = np.logical_or(binary[i], masks[i]).astype(np.float32).sum()
                iou.append(intersection / union)
        ious_mean.append(np.array(iou).mean() if iou else 0.0)
        pros_mean.append(np.array(pro).mean() if pro else 0.0)
        masks_neg = ~masks
        fpr = np.logical_and(masks_neg, binary).sum() / masks_neg.sum()
        fprs.append(fpr)
    pros_mean_arr = np.array(pros_mean)
    fprs_arr = np.array(fprs)
    keep = fprs_arr <= fpr_limit
    fprs_kept = fprs_arr[keep]
    pros_kept = pros_mean_arr[keep]
    span = fprs_kept.max() - fprs_kept.min() if fprs_kept.size else 0.0
    if fprs_kept.size < 2 or span <= 0:
        return float('nan')
    fprs_kept = (fprs_kept - fprs_kept.min()) / span
    return 100.0 * float(auc(fprs_kept, pros_kept))


def evaluate(encoder, decoders, loader: DataLoader, condition_dim: int, input_size: int,
             device: torch.device, pro: bool = True) -> tuple[dict, dict]:
    """Test pass, post-processing and metrics the original's way; returns (metrics in percent, timing s)."""
    start = time.perf_counter()
    out = test_pass(encoder, decoders, loader, condition_dim, device)
    t = time.perf_counter()
    super_mask = anomaly_maps(out, input_size)
    image_auroc, pixel_auroc, gt_mask = auroc_metrics(out, super_mask)
    t2 = time.perf_counter()
    aupro = aupro_dfr(gt_mask, super_mask) if pro else None
    end = time.perf_counter()
    metrics = {'image_auroc': image_auroc, 'pixel_auroc': pixel_auroc, 'aupro_cflow': aupro}
    n = len(out.labels)
    timing = {'test_forward_s': out.seconds,
              'test_images_per_s': n / out.seconds if out.seconds > 0 else None,
              'scoring_s': t2 - t, 'aupro_cflow_s': end - t2 if pro else None, 'aupro_s': None,
              'eval_s': end - start}
    return metrics, timing
