"""Magnetic Tile Defects benchmark on the CPU with an offline EfficientNet-Lite encoder.

    python bench/mtd.py                       # the fixed recipe, end to end; prints a one-row table
    python bench/mtd.py --select              # how the recipe was chosen: training images only

The data stays where it is (default ``../shared/data/magnetic_tile`` beside the checkout, or
``--data-path``); nothing is copied. The run writes ``results/<model name>.json`` (model name
``mtd_efficientnet_lite2_...``, per-defect figures under ``per_defect``) and ``weights/`` under
``--output-dir``.

Recipe selection (``--select``) never looks at the test split: the 761 training images are split again
with ``mtd_validation_split`` (every 5th to validation); candidates are trained on the rest and scored on
the validation images plus copies of them with one synthetic defect each (``SYNTHETIC_KINDS``: small dark
holes, thin faint cracks, chipped corners, frayed edge bands, smooth brightness bumps; exact masks). Each
trained candidate is scored under every ``SCORINGS`` setting of ``--score-norm`` and ``--tta`` (norm-test
of its checkpoint, no retraining). The row with the best sum of validation image and pixel AUROC (last
epoch) is printed as selected; a finished candidate in ``--output-dir`` is reused rather than trained
again. ``--candidates`` restricts the run to some of ``CANDIDATES``.

Selection behind ``RECIPE`` (seed 0, 608 fit / 153 validation images, 3 scales, K = 8, 4 x 2 epochs,
2 CPU cores; "pool K" = ``--feature-pool K``):

    encoder            | input | scoring         | val image | val pixel | per kind image AUROC (blowhole, crack, break, fray, uneven)
    efficientnet_lite0 | 256   | test            | 85.14     | 64.93     | 98.7, 81.7, 96.6, 98.3, 49.7
    efficientnet_lite0 | 256   | position        | 85.88     | 66.38     | 99.9, 83.4, 94.7, 99.8, 50.8
    efficientnet_lite2 | 256   | test            | 84.01     | 66.43     | 98.4, 79.1, 93.6, 99.3, 49.0
    efficientnet_lite2 | 256   | position        | 87.90     | 67.82     | 99.9, 85.5, 95.0, 100.0, 58.5
    efficientnet_lite2 | 320   | test            | 84.13     | 67.29     | 98.3, 80.5, 93.7, 99.0, 48.5
    efficientnet_lite2 | 320   | position        | 86.96     | 69.02     | 99.9, 88.3, 93.8, 100.0, 52.2
    efficientnet_lite2 | 320   | position, hflip | 87.74     | 68.78     | 99.9, 88.8, 92.9, 100.0, 56.5
    efficientnet_lite2 | 320   | position, flips | 87.62     | 68.15     | 99.9, 89.1, 92.6, 100.0, 55.9
    lite2, pool 3      | 320   | test            | 82.85     | 67.14     | 96.1, 73.6, 97.1, 99.5, 47.3
    lite2, pool 3      | 320   | position        | 89.23     | 69.15     | 99.9, 89.3, 99.1, 100.0, 57.3
    lite2, pool 3      | 320   | position, hflip | 89.61     | 68.72     | 99.8, 89.5, 99.0, 100.0, 59.2
    lite2, pool 5      | 320   | test            | 82.76     | 66.24     | 94.7, 74.6, 97.6, 100.0, 46.4
    lite2, pool 5      | 320   | position        | 89.24     | 68.39     | 99.6, 88.7, 99.4, 100.0, 57.9
    lite2, pool 5      | 320   | position, hflip | 89.31     | 67.82     | 99.8, 88.6, 99.4, 100.0, 58.1
    lite2, pool 3      | 384   | test            | 83.12     | 66.59     | 97.0, 74.8, 97.9, 99.4, 45.8
    lite2, pool 3      | 384   | position        | 89.62     | 68.77     | 99.7, 92.0, 99.2, 100.0, 56.4
    lite2, pool 3      | 384   | position, hflip | 90.03     | 68.20     | 99.7, 91.4, 99.2, 100.0, 59.1
    pool 3, tr. flips  | 320   | test            | 82.39     | 66.19     | 96.1, 71.8, 97.0, 99.3, 47.0
    pool 3, tr. flips  | 320   | position        | 88.70     | 68.22     | 99.7, 88.7, 98.9, 100.0, 55.5
    pool 3, tr. flips  | 320   | position, hflip | 89.08     | 67.91     | 99.8, 89.2, 99.1, 100.0, 56.5
    lite2, pool 1 3 3  | 320   | test            | 83.16     | 67.07     | 96.6, 73.6, 96.1, 99.5, 49.4
    lite2, pool 1 3 3  | 320   | position        | 88.07     | 68.94     | 99.8, 89.1, 95.9, 100.0, 54.9
    lite2, pool 1 3 3  | 320   | position, hflip | 88.50     | 68.57     | 99.8, 89.2, 94.5, 100.0, 58.3
    pool 3, bf16       | 448   | test            | 84.06     | 67.25     | 97.0, 74.6, 98.5, 99.8, 49.8
    pool 3, bf16       | 448   | position        | 88.56     | 69.73     | 100.0, 90.0, 98.2, 100.0, 53.8
    pool 3, bf16       | 448   | position, hflip | 88.94     | 69.36     | 100.0, 90.1, 98.3, 100.0, 55.7
    pool 3, rotation 0 | 384   | test            | 85.44     | 67.43     | 98.6, 78.4, 99.6, 99.9, 50.1
    pool 3, rotation 0 | 384   | position        | 90.04     | 69.30     | 99.7, 93.6, 99.9, 100.0, 56.3
    pool 3, rotation 0 | 384   | position, hflip | 90.44     | 68.56     | 99.8, 93.2, 99.9, 100.0, 58.5
    pool 3, jitter 0.3 | 384   | test            | 82.76     | 66.22     | 96.6, 74.8, 97.4, 99.0, 45.3
    pool 3, jitter 0.3 | 384   | position        | 89.10     | 68.28     | 99.8, 92.0, 98.7, 100.0, 54.2
    pool 3, jitter 0.3 | 384   | position, hflip | 89.39     | 67.76     | 99.9, 91.9, 98.2, 100.0, 56.3

("tr. flips" = ``--train-flips flips``; "bf16" = ``--precision bf16``; "rotation 0" = ``--rotation-deg 0``; "jitter
0.3" = ``--train-jitter 0.3``.) The recipe is candidate 9 with ``--scale-weights 1 1 0`` (last paragraph). Before
it, the recipe was the pool-3 row at input 384 (candidate 5) scored with the per-position norm and no flip: the best
sum, 158.386, against 158.378 for the same at input 320. The two are equal within any noise; the rule picks the
larger input, which finds the faint synthetic cracks better (92.0 against 89.3) and costs about 1.4x the training
time. Mirroring the training images at random (candidate 6) and keeping the finest scale unpooled (``--feature-pool
1 3 3``, candidate 7) both scored lower (156.98 and 157.07 at best), and so did input 448 trained in bf16 (candidate
8, ``precision`` in its entry; 158.29, 158.30 with the flip): higher validation pixel AUROC, lower image AUROC. On
candidate 5's checkpoint, norm-test runs outside ``SCORINGS`` scored Gaussian-smoothed maps (``--smooth-sigma`` 4
and 8, per-position norm): 158.31 and 158.25, below the recipe; and the same candidate trained on a copy of the data
whose images were mirror-padded to squares (aspect ratio kept) reached 86.56 validation image AUROC against 89.62;
neither was adopted. The same checkpoint's maps were then made from subsets of its three scales
(``--scale-weights``, per-position norm; image / pixel AUROC): stride 8 alone 89.16 / 69.90, 16 alone 86.17 / 70.39,
32 alone 85.41 / 66.61, 8 + 16 89.77 / 70.39, 16 + 32 87.24 / 68.40, 8 + 32 89.61 / 67.81, all three 89.62 / 68.77.
Leaving the coarse stride-32 scale out of the maps (it trains as before) gives the best sum, 160.16, mostly in pixel
AUROC (+1.62), so the recipe scores with ``--scale-weights 1 1 0``. Weights other than 0 and 1 were looked at too
(1.5 1 0: 160.29; 2 1 0: 160.26; 1 1 0.25: 159.61): no different beyond noise, so the recipe keeps the plain subset.
On the test split this did not carry over (README): 86.99 / 79.51 / 77.22 image AUROC / pixel AUROC / AUPRO against
88.55 / 81.92 / 75.03 with all three scales (the real uneven areas need the coarse scale); the recipe stays what
validation chose. Before candidate 5 the recipe was the same at input 320; before the pooled candidate, the lite2 /
320 / position / hflip row (156.52) was the recipe. Without test-time flips input 320 (155.98) and input 256
(155.72) were within noise of each other: input 320 finds the faint cracks and localises better, input 256 ranks the
brightness bumps better. The left-right flip was then tried on the input-320 candidate only (the ``--candidates 2``
run, which reproduced its two earlier rows exactly); it raises the brightness bumps and the cracks and costs 0.24
validation pixel AUROC. All four flips (``--tta flips``: left-right, upside down and both) were scored once on that
checkpoint (a norm-test run, not part of ``SCORINGS``): no better than the left-right flip alone, at twice its test
time. Averaging the features over 3 x 3 neighbourhoods before the flows (candidate 3) raised validation image AUROC
by 1.9-2.3 points at the same pixel AUROC, mostly on chipped corners and brightness bumps; 5 x 5 neighbourhoods
(candidate 4) did not do better (157.63, 157.13). The synthetic cracks are faint (darkened to 70-85 %, 1-3 px wide):
with an earlier version (50-70 %, 1-2 px) validation cracks reached 89-97 image AUROC while real ones reached 67-74.
That change was made knowing the earlier recipe's test figures, so this validation set is not blind to them in that
respect. Smooth brightness changes stay hard for every candidate.

Last, two training augmentations on candidate 5's settings, scored under ``SCORINGS`` and (by norm-test outside
them) with every subset of scales: without the paper's +-5 degree rotation (candidate 9, ``--rotation-deg 0``; the
rotation fills the training images' corners with black) and with brightness and contrast jitter (candidate 10,
``--train-jitter 0.3``). The jitter scored lower (157.38 with all scales, 159.70 at best with ``1 1 0``). Without
rotation every subset scored higher than with it (image / pixel AUROC: all three 90.04 / 69.30, stride 8 89.81 /
70.40, 16 87.19 / 70.54, 32 86.71 / 67.79, 8 + 16 90.13 / 70.66, 16 + 32 88.63 / 68.97, 8 + 32 90.39 / 68.64);
8 + 16 is again the best sum, 160.79 against 160.16, so the recipe became candidate 9 with ``--scale-weights 1 1
0``. On the test split (README) it gives 87.09 / 78.13 / 77.44 image AUROC / pixel AUROC / AUPRO against 86.99 /
79.51 / 77.22 with the rotation, and 89.61 / 80.86 / 74.42 with all three scales in the maps.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from config import parse_config  # noqa: E402
from custom_datasets import mtd_split, mtd_validation_split  # noqa: E402
from utils.errors import UserError  # noqa: E402

DEFAULT_DATA = REPO.parent / 'shared' / 'data' / 'magnetic_tile'

# The recipe chosen with --select (see the module docstring and README): input size, epochs, layers.
RECIPE = {'encoder': 'efficientnet_lite2', 'input_size': 384, 'meta_epochs': 4, 'sub_epochs': 2, 'pool_layers': 3,
          'coupling_blocks': 8, 'feature_pool': 3, 'score_norm': 'position', 'tta': 'none', 'scale_weights': (1, 1, 0),
          'rotation_deg': 0}

CANDIDATES = [
    {'encoder': 'efficientnet_lite0', 'input_size': 256, 'meta_epochs': 4, 'sub_epochs': 2, 'pool_layers': 3,
     'coupling_blocks': 8},
    {'encoder': 'efficientnet_lite2', 'input_size': 256, 'meta_epochs': 4, 'sub_epochs': 2, 'pool_layers': 3,
     'coupling_blocks': 8},
    {'encoder': 'efficientnet_lite2', 'input_size': 320, 'meta_epochs': 4, 'sub_epochs': 2, 'pool_layers': 3,
     'coupling_blocks': 8},
    {'encoder': 'efficientnet_lite2', 'input_size': 320, 'meta_epochs': 4, 'sub_epochs': 2, 'pool_layers': 3,
     'coupling_blocks': 8, 'feature_pool': 3},
    {'encoder': 'efficientnet_lite2', 'input_size': 320, 'meta_epochs': 4, 'sub_epochs': 2, 'pool_layers': 3,
     'coupling_blocks': 8, 'feature_pool': 5},
    {'encoder': 'efficientnet_lite2', 'input_size': 384, 'meta_epochs': 4, 'sub_epochs': 2, 'pool_layers': 3,
     'coupling_blocks': 8, 'feature_pool': 3},
    {'encoder': 'efficientnet_lite2', 'input_size': 320, 'meta_epochs': 4, 'sub_epochs': 2, 'pool_layers': 3,
     'coupling_blocks': 8, 'feature_pool': 3, 'train_flips': 'flips'},
    {'encoder': 'efficientnet_lite2', 'input_size': 320, 'meta_epochs': 4, 'sub_epochs': 2, 'pool_layers': 3,
     'coupling_blocks': 8, 'feature_pool': (1, 3, 3)},
    {'encoder': 'efficientnet_lite2', 'input_size': 448, 'meta_epochs': 4, 'sub_epochs': 2, 'pool_layers': 3,
     'coupling_blocks': 8, 'feature_pool': 3, 'precision': 'bf16'},
    {'encoder': 'efficientnet_lite2', 'input_size': 384, 'meta_epochs': 4, 'sub_epochs': 2, 'pool_layers': 3,
     'coupling_blocks': 8, 'feature_pool': 3, 'rotation_deg': 0},
    {'encoder': 'efficientnet_lite2', 'input_size': 384, 'meta_epochs': 4, 'sub_epochs': 2, 'pool_layers': 3,
     'coupling_blocks': 8, 'feature_pool': 3, 'train_jitter': 0.3},
]


# Each trained candidate is scored under each of these (--score-norm, --tta) settings (no retraining needed).
# Test-time flips are tried with the per-position norm, the better norm of every candidate without them.
SCORINGS = (('test', 'none'), ('position', 'none'), ('position', 'hflip'))


def _pool_args(pool: int | tuple[int, ...]) -> list[str]:
    return [str(k) for k in pool] if isinstance(pool, tuple) else [str(pool)]


def recipe_args(recipe: dict) -> list[str]:
    return ['-enc', recipe['encoder'], '-inp', str(recipe['input_size']), '--meta-epochs', str(recipe['meta_epochs']),
            '--sub-epochs', str(recipe['sub_epochs']), '-pl', str(recipe['pool_layers']),
            '-cb', str(recipe['coupling_blocks']), '--feature-pool', *_pool_args(recipe.get('feature_pool', 1)),
            '--score-norm', recipe['score_norm'], '--tta', recipe.get('tta', 'none'),
            '--train-flips', recipe.get('train_flips', 'none'),
            *(['--rotation-deg', str(recipe['rotation_deg'])] if 'rotation_deg' in recipe else []),
            *(['--train-jitter', str(recipe['train_jitter'])] if 'train_jitter' in recipe else []),
            *(['--precision', recipe['precision']] if 'precision' in recipe else []),
            *(['--scale-weights', *map(str, recipe['scale_weights'])] if 'scale_weights' in recipe else [])]


def run_main(args: list[str]) -> None:
    cmd = [sys.executable, str(REPO / 'main.py'), *args]
    print('$ ' + ' '.join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f'main.py failed with exit status {proc.returncode}')


SYNTHETIC_KINDS = ('blowhole', 'crack', 'break', 'fray', 'uneven')


def synthetic_defect(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """A copy of a grey tile image with one synthetic defect of ``kind``, and its exact boolean mask.

    The kinds imitate the five Magnetic Tile defect types as the dataset describes them (small dark holes,
    thin cracks, chipped edges, frayed areas, uneven brightness over about a quarter of the tile), with
    moderate contrast so that validation does not saturate.
    """
    w, h = image.size
    arr = np.asarray(image.convert('L'), dtype=np.float32)
    mean = float(arr.mean())
    side = min(w, h)
    canvas = Image.new('L', (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == 'blowhole':  # small dark blob
        r = rng.uniform(0.02, 0.05) * side
        cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
        draw.ellipse([cx - r, cy - r * rng.uniform(0.6, 1.0), cx + r, cy + r], fill=255)
        mask = np.asarray(canvas) > 0
        arr[mask] *= rng.uniform(0.4, 0.6)
    elif kind == 'crack':  # thin dark polyline
        x, y = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
        angle = rng.uniform(0, 2 * math.pi)
        points = [(x, y)]
        for _ in range(int(rng.integers(3, 6))):
            angle += rng.uniform(-0.6, 0.6)
            step = rng.uniform(0.06, 0.12) * side
            x = float(np.clip(x + step * math.cos(angle), 0, w - 1))
            y = float(np.clip(y + step * math.sin(angle), 0, h - 1))
            points.append((x, y))
        draw.line(points, fill=255, width=int(rng.integers(1, 4)))
        mask = np.asarray(canvas) > 0
        arr[mask] *= rng.uniform(0.7, 0.85)
    elif kind == 'break':  # a chipped corner or edge: a polygon at the border filled dark
        r = rng.uniform(0.12, 0.22) * side
        corner = (float(rng.choice([0, w - 1])), float(rng.choice([0, h - 1])))
        angles = np.sort(rng.uniform(0, 2 * math.pi, 7))
        radii = r * rng.uniform(0.6, 1.2, 7)
        draw.polygon([(corner[0] + q * math.cos(t), corner[1] + q * math.sin(t)) for q, t in zip(radii, angles)],
                     fill=255)
        mask = np.asarray(canvas) > 0
        arr[mask] = rng.uniform(0.15, 0.35) * mean
    elif kind == 'fray':  # a band at one edge with coarse, noisy texture
        depth = rng.uniform(0.08, 0.18)
        edge = int(rng.integers(4))
        yy, xx = np.mgrid[0:h, 0:w]
        dist = (xx / w, 1 - xx / w, yy / h, 1 - yy / h)[edge]
        mask = dist < depth * (1 + 0.3 * np.sin(rng.uniform(4, 9) * (yy / h if edge < 2 else xx / w) * math.pi))
        noise = rng.normal(0, 0.25 * mean, (h // 4 + 1, w // 4 + 1)).repeat(4, 0).repeat(4, 1)[:h, :w]
        arr[mask] += noise[mask]
    else:  # uneven brightness: a smooth multiplicative bump; the mask is where it changes by > 10 %
        sigma = rng.uniform(0.2, 0.35) * side
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        yy, xx = np.mgrid[0:h, 0:w]
        bump = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))
        gain = 1 + float(rng.choice([-1, 1])) * rng.uniform(0.25, 0.4) * bump
        arr *= gain
        mask = np.abs(gain - 1) > 0.1
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), mask


def make_validation_tree(data: Path, out: Path, seed: int = 0) -> Path:
    """MVTec-layout validation tree: train/good = fit images, test/good = validation images,
    test/<kind> = validation images with a synthetic defect of one kind each (written; kinds in turn),
    ground_truth/<kind> masks."""
    train, _ = mtd_split(data)
    fit, val = mtd_validation_split(train)
    root = out / 'mtd_validation'
    if root.exists():
        shutil.rmtree(root)
    cls = root / 'tile'
    for sub, paths in (('train/good', fit), ('test/good', val)):
        folder = cls / sub
        folder.mkdir(parents=True)
        for p in paths:
            (folder / Path(p).name).symlink_to(Path(p).resolve())
    rng = np.random.default_rng(seed)
    for kind in SYNTHETIC_KINDS:
        (cls / 'test' / kind).mkdir(parents=True)
        (cls / 'ground_truth' / kind).mkdir(parents=True)
    for i, p in enumerate(val):
        kind = SYNTHETIC_KINDS[i % len(SYNTHETIC_KINDS)]
        img, mask = synthetic_defect(Image.open(p), kind, rng)
        stem = Path(p).stem
        img.save(cls / 'test' / kind / f'{stem}.png')
        Image.fromarray(mask.astype(np.uint8) * 255).save(cls / 'ground_truth' / kind / f'{stem}_mask.png')
    print(f'validation tree: {len(fit)} fit, {len(val)} validation normal, {len(val)} synthetic defects -> {root}',
          file=sys.stderr)
    return root


def _validation_row(cand: dict, scoring: dict, res: dict, seconds: float) -> tuple:
    return ({**cand, **scoring}, res['last']['image_auroc'], res['last']['pixel_auroc'], seconds,
            [(h['epoch'], h['image_auroc'], h['pixel_auroc']) for h in res['history']], res['per_defect'])


def select(data: Path, out: Path, common: list[str], candidates: list[int] | None = None) -> None:
    """Train each candidate (or those numbered in ``candidates``) on the fit images (a finished candidate in
    ``out`` is reused: main.py --resume), then score its validation images under each of ``SCORINGS`` by
    norm-test of its checkpoint (the flows are the same; only the maps differ), so that a reused candidate is
    scored on the current validation tree."""
    root = make_validation_tree(data, out)
    rows = []
    for i, cand in enumerate(CANDIDATES):
        if candidates is not None and i not in candidates:
            continue
        cand_out = out / f'candidate{i}'
        start = time.perf_counter()
        data_args = ['--dataset', 'mvtec', '--data-path', str(root), '--class-name', 'tile', *common]
        train_args = [*data_args, *recipe_args({**cand, 'score_norm': 'test'}), '--output-dir', str(cand_out)]
        model_name = parse_config(train_args).model_name
        if not (cand_out / 'results' / f'{model_name}.json').exists():  # written only when training finished
            run_main([*train_args, '--resume'])
        print(f'candidate {i} trained (or reused) in {time.perf_counter() - start:.0f} s', file=sys.stderr)
        checkpoint = cand_out / 'weights' / f'{model_name}.pt'
        for score_norm, tta in SCORINGS:
            start = time.perf_counter()
            scoring = {'score_norm': score_norm, 'tta': tta}
            norm_out = cand_out / (f'score_{score_norm}' if tta == 'none' else f'score_{score_norm}_{tta}')
            run_main([*data_args, *recipe_args({**cand, **scoring}), '--output-dir', str(norm_out),
                      '--action-type', 'norm-test', '--checkpoint', str(checkpoint)])
            res = json.loads((norm_out / 'results' / f'{model_name}_norm-test.json').read_text())
            rows.append(_validation_row(cand, scoring, res, time.perf_counter() - start))
    print('\n| candidate | val image AUROC | val pixel AUROC | scoring seconds | last epoch (image, pixel) | '
          'per kind (image, pixel) |')
    print('|---|---|---|---|---|---|')
    for cand, img, pix, sec, hist, kinds in rows:
        per = '; '.join(f'{e}: {a:.1f}, {b:.1f}' for e, a, b in hist)
        per_kind = '; '.join(f'{k}: {m["image_auroc"]:.1f}, {m["pixel_auroc"]:.1f}' for k, m in kinds.items())
        print(f'| {cand} | {img:.2f} | {pix:.2f} | {sec:.0f} | {per} | {per_kind} |')
    best = max(rows, key=lambda r: r[1] + r[2])
    print(f'\nselected on validation data: {best[0]}')


def benchmark(data: Path, out: Path, common: list[str]) -> None:
    start = time.perf_counter()
    run_main(['--dataset', 'mtd', '--data-path', str(data), '--class-name', 'tile', '--pro', *common,
              *recipe_args(RECIPE), '--output-dir', str(out)])
    wall = time.perf_counter() - start
    files = [p for p in (out / 'results').glob('mtd_*.json') if not p.name.endswith('_norm-test.json')]
    res = json.loads(max(files, key=lambda p: p.stat().st_mtime).read_text())
    last, timing = res['last'], res['timing']
    train_s = sum(timing['sub_epoch_s'])
    print('\n| dataset | encoder | image AUROC | pixel AUROC | AUPRO | training time | test images/s | wall time |')
    print('|---|---|---|---|---|---|---|---|')
    print(f'| Magnetic Tile (mtd) | {RECIPE["encoder"]} | {last["image_auroc"]:.2f} | {last["pixel_auroc"]:.2f} | '
          f'{last["aupro"]:.2f} | {train_s / 60:.1f} min | {timing["test_images_per_s"]:.1f} | {wall / 60:.1f} min |')
    print('\nPer defect type (last epoch):\n| defect | images | image AUROC | pixel AUROC | AUPRO |\n|---|---|---|---|---|')
    for name, m in res['per_defect'].items():
        print(f'| {name} | {m["n_images"]} | {m["image_auroc"]:.2f} | {m["pixel_auroc"]:.2f} | '
              f'{m["aupro"]:.2f} |')
    print(f'\nresults: {out / "results" / (res["model_name"] + ".json")}')


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-path', default=str(DEFAULT_DATA), help='Magnetic Tile root (MT_Free/, MT_Blowhole/, ...)')
    p.add_argument('--output-dir', default='bench_out/mtd', help='results/ and weights/ go here')
    p.add_argument('--select', action='store_true', help='run the recipe selection on training images only')
    p.add_argument('--candidates', type=int, nargs='+', metavar='I',
                   help=f'with --select: only these candidates (0..{len(CANDIDATES) - 1}, in CANDIDATES order)')
    p.add_argument('--workers', default=2, type=int)
    p.add_argument('--seed', default=0, type=int)
    p.add_argument('--precision', default='fp32', choices=('fp32', 'bf16'))
    args = p.parse_args(argv)
    data, out = Path(args.data_path), Path(args.output_dir)
    if not (data / 'MT_Free' / 'Imgs').is_dir():
        print(f'error: {data} does not hold the Magnetic Tile data (MT_Free/Imgs); pass --data-path',
              file=sys.stderr)
        return 2
    common = ['--workers', str(args.workers), '--seed', str(args.seed),
              '--precision', args.precision, '--no-cuda']
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.select:
            select(data, out, common, args.candidates)
        else:
            weights = out / 'weights'
            if weights.exists():
                shutil.rmtree(weights)  # a benchmark always trains from scratch
            benchmark(data, out, common)
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
