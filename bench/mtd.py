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

``RECIPE`` is candidate 12 (``CANDIDATES[12]``) scored with ``--scale-weights 1 1 0`` and run with ``--compile``
(1.5-1.9x the eager training speed on the CPU; ``--no-compile`` runs it eagerly where no C++ compiler works).
The whole record of the selection, every candidate's validation figures, each step of the choice and the test
figures of every recipe the benchmark has used, is in ``bench/MTD.md``.
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

# The recipe chosen with --select (see bench/MTD.md): input size, epochs, layers, precision.
RECIPE = {'encoder': 'efficientnet_lite2', 'input_size': 384, 'meta_epochs': 4, 'sub_epochs': 3, 'pool_layers': 3,
          'coupling_blocks': 8, 'feature_pool': 3, 'score_norm': 'position', 'tta': 'none', 'scale_weights': (1, 1, 0),
          'rotation_deg': 0, 'precision': 'bf16', 'lr': 4e-4, 'compile': True}

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
    {'encoder': 'efficientnet_lite2', 'input_size': 384, 'meta_epochs': 4, 'sub_epochs': 3, 'pool_layers': 3,
     'coupling_blocks': 8, 'feature_pool': 3, 'rotation_deg': 0, 'precision': 'bf16'},
    {'encoder': 'efficientnet_lite2', 'input_size': 384, 'meta_epochs': 4, 'sub_epochs': 3, 'pool_layers': 3,
     'coupling_blocks': 8, 'feature_pool': 3, 'rotation_deg': 0, 'precision': 'bf16', 'lr': 4e-4},
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
            *(['--lr', str(recipe['lr'])] if 'lr' in recipe else []),
            *(['--compile'] if recipe.get('compile') else []),
            *(['--scale-weights', *map(str, recipe['scale_weights'])] if 'scale_weights' in recipe else [])]


def run_main(args: list[str], hint: str = '') -> None:
    """Run main.py with ``args``; a failure stops the benchmark with its exit status and ``hint``."""
    cmd = [sys.executable, str(REPO / 'main.py'), *args]
    print('$ ' + ' '.join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f'main.py failed with exit status {proc.returncode}{hint}')


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


def benchmark_recipe(precision: str | None = None, compile_: bool = True) -> dict:
    """``RECIPE``, in ``precision`` instead of the recipe's own when given, and run eagerly (without
    ``--compile``) when ``compile_`` is false."""
    recipe = RECIPE if precision is None else {**RECIPE, 'precision': precision}
    return recipe if compile_ else {**recipe, 'compile': False}


def benchmark_args(data: Path, out: Path, common: list[str], recipe: dict) -> list[str]:
    """The main.py arguments of the benchmark run: ``recipe`` trained and tested on the Magnetic Tile split."""
    return ['--dataset', 'mtd', '--data-path', str(data), '--class-name', 'tile', '--pro', *common,
            *recipe_args(recipe), '--output-dir', str(out)]


def benchmark(data: Path, out: Path, common: list[str], precision: str | None = None, compile_: bool = True) -> None:
    """Run :func:`benchmark_args` and print the one-row table and the per-defect table."""
    recipe = benchmark_recipe(precision, compile_)
    start = time.perf_counter()
    run_main(benchmark_args(data, out, common, recipe),
             '; if it says --compile failed, run bench/mtd.py --no-compile' if recipe.get('compile') else '')
    wall = time.perf_counter() - start
    files = [p for p in (out / 'results').glob('mtd_*.json') if not p.name.endswith('_norm-test.json')]
    res = json.loads(max(files, key=lambda p: p.stat().st_mtime).read_text())
    last, timing = res['last'], res['timing']
    train_s = sum(timing['sub_epoch_s'])
    print('\n| dataset | encoder, precision, mode | image AUROC | pixel AUROC | AUPRO | training time | test images/s | '
          'wall time |')
    print('|---|---|---|---|---|---|---|---|')
    mode = f'{recipe.get("precision", "fp32")}{", compiled" if recipe.get("compile") else ""}'
    print(f'| Magnetic Tile (mtd) | {recipe["encoder"]}, {mode} | '
          f'{last["image_auroc"]:.2f} | {last["pixel_auroc"]:.2f} | {last["aupro"]:.2f} | {train_s / 60:.1f} min | '
          f'{timing["test_images_per_s"]:.1f} | {wall / 60:.1f} min |')
    print('\nPer defect type (last epoch):\n| defect | images | image AUROC | pixel AUROC | AUPRO |\n'
          '|---|---|---|---|---|')
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
    p.add_argument('--precision', choices=('fp32', 'bf16'),
                   help="override the recipe's precision (bf16); with --select, that of candidates without one (fp32)")
    p.add_argument('--no-compile', action='store_true',
                   help='run the recipe eagerly instead of with --compile (for machines without a C++ compiler; '
                        'training takes 1.5-1.9x as long on the CPU)')
    args = p.parse_args(argv)
    data, out = Path(args.data_path), Path(args.output_dir)
    if not (data / 'MT_Free' / 'Imgs').is_dir():
        print(f'error: {data} does not hold the Magnetic Tile data (MT_Free/Imgs); pass --data-path',
              file=sys.stderr)
        return 2
    common = ['--workers', str(args.workers), '--seed', str(args.seed), '--no-cuda']
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.select:
            select(data, out, [*common, *(['--precision', args.precision] if args.precision else [])],
                   args.candidates)
        else:
            weights = out / 'weights'
            if weights.exists():
                shutil.rmtree(weights)  # a benchmark always trains from scratch
            benchmark(data, out, common, args.precision, not args.no_compile)
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
