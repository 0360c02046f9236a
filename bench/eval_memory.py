"""Memory and time of scoring a test set as the number of test images and the image size grow.

    python bench/eval_memory.py                                  # the default grid
    python bench/eval_memory.py --images 100 400 --sizes 256 512

Scoring is everything the evaluation does after the forward pass: anomaly maps, image scores, image and pixel
AUROC, both AUPRO variants, over all images and per defect type (``train.measure``). Each (images, size) point
runs in a fresh subprocess on synthetic inputs of the shape the forward pass keeps: per-scale log-likelihood
grids at strides 8, 16 and 32 and bit-packed masks; half of the images carry one blob defect of one of two
types, with lower log-likelihoods where it lies. When the defect pixels outnumber
``utils.metrics.MAX_DEFECT_PIXELS`` (``--max-defect-pixels``), the metrics cut the score axis into ranges and
make the maps once more per range (``passes``). The resident set is read right before scoring and its
high-water mark reset there (Linux ``/proc/self/clear_refs``), so ``added`` is the peak that scoring adds on
top of its inputs. ``inputs`` is what the grids and packed masks hold; ``full maps`` is the size that the
set's float32 anomaly maps would take at image resolution (computed, for comparison, not allocated).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train  # noqa: E402
from speed import _start_memory_window  # noqa: E402
from utils import metrics  # noqa: E402

STRIDES = (8, 16, 32)
DEFECT_TYPES = ('blob_a', 'blob_b')


def synthetic_output(n_images: int, size: int, seed: int = 0) -> tuple[train.EvalOutput, list[str]]:
    """Log-likelihood grids and packed masks of ``n_images`` images of ``size``², half of them defective."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n_images) % 2).astype(np.int64)
    types = ['good' if y == 0 else DEFECT_TYPES[(i // 2) % 2] for i, y in enumerate(labels)]
    masks = np.zeros((n_images, size, (size + 7) // 8), dtype=np.uint8)
    log_probs = [torch.from_numpy(rng.normal(-1.0, 0.1, (n_images, size // s, size // s)).astype(np.float32))
                 for s in STRIDES]
    yy, xx = np.mgrid[:size, :size]
    for i in np.flatnonzero(labels):
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        radius = rng.uniform(0.04, 0.1) * size
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        masks[i] = np.packbits(mask, axis=-1)
        for lp, s in zip(log_probs, STRIDES):
            coarse = mask.reshape(size // s, s, size // s, s).mean(axis=(1, 3))
            lp[i] -= torch.from_numpy((0.4 * coarse).astype(np.float32))
    out = train.EvalOutput(log_probs=log_probs, labels=labels, masks=masks, mask_valid=np.ones(n_images, dtype=bool),
                           loss=0.0, forward_s=1.0)
    return out, types


def child(n_images: int, size: int, max_defect_pixels: int) -> dict:
    metrics.MAX_DEFECT_PIXELS = max_defect_pixels
    out, types = synthetic_output(n_images, size)
    defect_pixels = int(np.unpackbits(out.masks).sum())
    inputs_mb = (sum(lp.numel() * lp.element_size() for lp in out.log_probs) + out.masks.nbytes) / 2 ** 20
    start_rss = _start_memory_window()
    start = time.perf_counter()
    maps = train.score_map_chunks('test', out.log_probs, size, None)
    scored = train.measure(maps, out, size, types, pro=True, fpr_limit=0.3, cflow_thresholds=1000)
    seconds = time.perf_counter() - start
    return {'images': n_images, 'size': size, 'defect_pixels': defect_pixels, 'passes': scored['passes'],
            'inputs_mb': inputs_mb, 'full_maps_mb': n_images * size * size * 4 / 2 ** 20,
            'added_mb': train.peak_rss_mb() - start_rss, 'seconds': seconds,
            'aupro_s': scored['seconds']['aupro'], 'aupro_cflow_s': scored['seconds']['aupro_cflow'],
            **{k: scored['metrics'][k] for k in ('image_auroc', 'pixel_auroc', 'aupro', 'aupro_cflow')}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=int, nargs='+', default=[100, 400, 1600], help='test-set sizes')
    p.add_argument('--sizes', type=int, nargs='+', default=[256, 512], help='input sizes (multiples of 32)')
    p.add_argument('--max-defect-pixels', type=int, default=None,
                   help='defect-pixel scores held at once (default: utils.metrics.MAX_DEFECT_PIXELS)')
    p.add_argument('--child', type=int, nargs=3, metavar=('IMAGES', 'SIZE', 'BUDGET'), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)), flush=True)
        return 0
    budget = args.max_defect_pixels or metrics.MAX_DEFECT_PIXELS
    if any(s % 32 for s in args.sizes) or any(n < 2 for n in args.images) or budget < 2:
        print('error: sizes must be multiples of 32, image counts and --max-defect-pixels at least 2',
              file=sys.stderr)
        return 2
    rows = []
    for size in args.sizes:
        for n in args.images:
            proc = subprocess.run([sys.executable, __file__, '--child', str(n), str(size), str(budget)],
                                  stdout=subprocess.PIPE, text=True, cwd=str(REPO))
            if proc.returncode != 0:
                print(f'error: the measurement of {n} images at {size} failed', file=sys.stderr)
                return 1
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f'[{n} x {size}] {rows[-1]}', file=sys.stderr, flush=True)
    print(f'\ndefect-pixel budget {budget:,}')
    print('\n| images | size | defect pixels | passes | inputs MiB | full maps MiB | scoring added MiB | scoring s '
          '| AUPRO s | CFLOW AUPRO s | image / pixel AUROC, AUPRO |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        values = ', '.join('–' if r[k] is None or math.isnan(r[k]) else f'{r[k]:.2f}'
                           for k in ('image_auroc', 'pixel_auroc', 'aupro'))
        print(f'| {r["images"]} | {r["size"]} | {r["defect_pixels"]:,} | {r["passes"]} | {r["inputs_mb"]:.1f} | '
              f'{r["full_maps_mb"]:.0f} | {r["added_mb"]:.0f} | '
              f'{r["seconds"]:.1f} | {r["aupro_s"]:.2f} | {r["aupro_cflow_s"]:.2f} | {values} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
