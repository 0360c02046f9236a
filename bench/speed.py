"""Speed of this implementation next to an original-style baseline, measured in one run on one machine.

    python bench/speed.py --encoders resnet18 --precisions fp32 bf16 --repeats 1 --out speed.json

Every (encoder, precision, implementation) is measured in a fresh subprocess, so its peak resident memory is
its own; each prints one JSON line, and the medians over ``--repeats`` are reported as a Markdown table.
Data are synthetic (seeded random textures; half of the test images carry rectangular or blob defects with
exact masks) and encoders are randomly initialised (their BatchNorm statistics calibrated on a few training
images, so features have ordinary magnitudes): speed does not depend on the weights.

Per measurement, in this order: a warm-up forward pass that changes no weights; the evaluation of the test
set (forward, scoring, all metrics incl. AUPRO) on the freshly seeded decoders, so both implementations
score the very same weights; one training pass over the training images.

- ``ours``: ``train.evaluate`` (per-defect metrics included) and ``train.train_meta_epoch`` with
  ``train.make_optimizer`` (one sub-epoch).
- ``ours-compiled`` (with ``--compiled``): the same with ``--compile``; ``train.compile_model`` compiles
  the evaluation forward pass and the training step after the warm-up and before anything is timed, and its
  seconds are reported as ``compile s``.
- ``original``: ``bench/original_style.py`` (fp32 only, as the original has no bf16).

Ratio columns compare each row of ours with the original-style row of the same encoder: train and test
images/s (ours / original), evaluation time (original s / ours s) and peak RSS (ours / original).

Both implementations train with the same optimizer behaviour, ``--adam-mode``: ``torch2`` (default) is what
the original code does when run unmodified on PyTorch >= 2 (gradients freed by ``zero_grad()``, idle
decoders not updated), ``paper`` is PyTorch 1.8's zeroed gradients (ours' default ``--adam-mode paper``;
the original-style loop then calls ``zero_grad(set_to_none=False)`` and Adam steps every idle decoder at every
step, ours defers those steps, ``utils.optim.DecoderAdam``). In paper mode ``compile s`` of ours includes
compiling the idle-step kernel, also in the rows without ``--compile``.

Memory: the resident set is read right before the evaluation (libraries, models and data, which both
implementations hold alike) and its high-water mark is reset there (Linux ``/proc/self/clear_refs``), so
``eval peak`` is the peak during the evaluation itself and ``eval added`` what the evaluation adds on top.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import original_style  # noqa: E402
import train  # noqa: E402
from config import Config  # noqa: E402
from custom_models.encoders import ENCODER_NAMES, Encoder, build_encoder  # noqa: E402
from custom_models.flow import (build_decoder, condition_fibers, flatten_fibers,  # noqa: E402
                                positional_encoding_2d)
from utils import optim  # noqa: E402
from utils.io import write_json  # noqa: E402
from utils.schedule import learning_rate  # noqa: E402

IMPLEMENTATIONS = ('original', 'ours', 'ours-compiled')
PRECISIONS = ('fp32', 'bf16')
DEFECT_KINDS = ('rect', 'blob')
FIELDS = ('train_images_per_s', 'train_s', 'test_images_per_s', 'test_forward_s', 'eval_s', 'aupro_s',
          'aupro_cflow_s', 'scoring_s', 'peak_rss_mb', 'eval_start_rss_mb', 'eval_peak_rss_mb', 'eval_added_mb',
          'import_rss_mb', 'peak_cuda_mb', 'compile_s')
METRICS = ('image_auroc', 'pixel_auroc', 'aupro_cflow')
LEGEND = ('\nRatios compare ours with the original-style fp32 row of the same encoder: '
          'images/s ours / original, eval original s / ours s, RSS ours / original. '
          'eval peak: peak resident memory during the evaluation (high-water mark reset when it starts); eval '
          'added: that peak minus the resident memory when the evaluation started (libraries, models, data). '
          'Ours\' eval includes the per-defect-type metrics '
          '(both AUPRO variants again per type); the original-style aupro_cflow column is its DFR loop. '
          'Δ columns: |ours - original-style| on the same seeded weights, in percentage points.')


class SyntheticSet(Dataset):
    """In-memory images with labels and masks, following the project's dataset contract.

    Attributes:
        labels: 0 normal, 1 anomalous, per image.
        defect_types: ``'good'`` or the defect kind, per image.
        names: a name per image.
        mask_valid: True for every image (all masks are exact).
        n_missing_masks: 0.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, defect_types: list[str], prefix: str) -> None:
        self.images = torch.from_numpy(images)
        self.masks = torch.from_numpy(masks)
        self.defect_types = list(defect_types)
        self.labels = [0 if t == 'good' else 1 for t in self.defect_types]
        self.names = [f'{prefix}/{t}/{i:03d}.png' for i, t in enumerate(self.defect_types)]
        self.mask_valid = [True] * len(self.labels)
        self.n_missing_masks = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int, Tensor, bool]:
        """Image (3, S, S) float normalised, label, mask (1, S, S) float 0/1, mask_valid."""
        return self.images[index], self.labels[index], self.masks[index].unsqueeze(0), True


def _textures(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """n smooth random textures in [0, 1] sharing one base pattern: (n, 3, S, S) float32."""
    coarse = torch.from_numpy(rng.uniform(0.3, 0.7, size=(1, 3, max(size // 16, 2), max(size // 16, 2))))
    base = torch.nn.functional.interpolate(coarse, size=(size, size), mode='bilinear', align_corners=False)
    noise = rng.normal(0.0, 0.03, size=(n, 3, size, size))
    return np.clip(base.numpy() + noise, 0.0, 1.0).astype(np.float32)


def _defect_mask(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """One to three rectangles or elliptic blobs, as a (S, S) bool mask."""
    mask = np.zeros((size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(1, 4))):
        h, w = (int(v) for v in rng.integers(max(size // 20, 2), max(size // 6, 3), size=2))
        y, x = (int(v) for v in rng.integers(0, size - max(h, w), size=2))
        if kind == 'rect':
            mask[y:y + h, x:x + w] = True
        else:
            mask |= ((yy - y - h / 2) / (h / 2)) ** 2 + ((xx - x - w / 2) / (w / 2)) ** 2 <= 1.0
    return mask


def synthetic_sets(n_train: int, n_test: int, size: int, mean, std,
                   seed: int) -> tuple[SyntheticSet, SyntheticSet]:
    """Seeded training set (normal only) and test set (every second image defective), normalised."""
    rng = np.random.default_rng(seed)
    train_images = _textures(rng, n_train, size)
    test_images = _textures(rng, n_test, size)
    test_masks = np.zeros((n_test, size, size), dtype=np.float32)
    kinds = []
    for i in range(n_test):
        if i % 2 == 0:
            kinds.append('good')
            continue
        kind = DEFECT_KINDS[(i // 2) % len(DEFECT_KINDS)]
        mask = _defect_mask(rng, kind, size)
        test_images[i][:, mask] = rng.uniform(0.0, 1.0, size=(3, 1)).astype(np.float32)
        test_masks[i] = mask
        kinds.append(kind)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    train_set = SyntheticSet((train_images - m) / s, np.zeros((n_train, size, size), dtype=np.float32),
                             ['good'] * n_train, 'train')
    test_set = SyntheticSet((test_images - m) / s, test_masks, kinds, 'test')
    return train_set, test_set


def calibrate_batchnorm(encoder: Encoder, images: Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``images`` (B, 3, S, S).

    A randomly initialised encoder otherwise gives features that grow with depth by orders of magnitude;
    with calibrated statistics they have the scale of a trained network's, so the flows and the metrics
    work on ordinary values. Deterministic, and the same for both implementations.
    """
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch gives exactly its statistics
        m.train()
    with torch.no_grad():
        encoder(images)
    for m in norms:
        m.eval()


def _device(name: str) -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda was asked for, but no CUDA device is available')
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _warm_up(encoder, decoders, dataset: SyntheticSet, cfg: Config, device: torch.device) -> None:
    """One small forward pass of the encoder and each decoder; no weights change."""
    image = dataset.images[:2].to(device)
    with torch.no_grad(), train.autocast(device, cfg.precision):
        features = encoder(image)
        for decoder, feat in zip(decoders, features):
            feat = feat.float()
            fibers = flatten_fibers(feat)[:256]
            pe = positional_encoding_2d(cfg.condition_dim, feat.shape[2], feat.shape[3]).to(device)
            decoder(fibers, [condition_fibers(pe, feat.shape[0])[:256]])
    _sync(device)


def _start_memory_window() -> float:
    """Reset this process's peak-RSS mark (Linux) so that ``train.peak_rss_mb`` reports the peak from now
    on; returns the current resident memory in MiB. Elsewhere the peak stays the process's so far."""
    with contextlib.suppress(OSError):
        Path('/proc/self/clear_refs').write_text('5')
    with contextlib.suppress(OSError, ValueError):
        return int(Path('/proc/self/statm').read_text().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20
    return train.peak_rss_mb()


def _log(tag: str, text: str) -> None:
    print(f'[{tag}] {text}', file=sys.stderr, flush=True)


@dataclass
class Setup:
    """Everything one measurement works on."""
    cfg: Config
    device: torch.device
    encoder: Encoder
    features: Callable[[Tensor], list[Tensor]]  # the encoder call this implementation makes
    decoders: list
    train_loader: DataLoader
    test_loader: DataLoader


def _setup(impl: str, encoder_name: str, precision: str, args: argparse.Namespace) -> Setup:
    """Seeded encoder, decoders and loaders; both implementations get identical weights and data."""
    device = _device(args.device)
    cfg = Config(enc_arch=encoder_name, input_size=args.input_size, batch_size=args.batch_size,
                 precision=precision, adam_mode=args.adam_mode, pro=True, progress=False, workers=0,
                 compile=impl == 'ours-compiled',
                 meta_epochs=1, sub_epochs=1, seed=args.seed, encoder_weights='none', no_cuda=device.type != 'cuda')
    if impl != 'original':
        train.set_seed(cfg.seed, device.type == 'cuda')
    else:
        _seed(cfg.seed)
    encoder = build_encoder(encoder_name, cfg.pool_layers, 'none').to(device)
    decoders = [build_decoder(cfg.dec_arch, ch, cfg.condition_dim, cfg.coupling_blocks, cfg.clamp_alpha)
                .to(device) for ch in encoder.channels]
    train_set, test_set = synthetic_sets(args.train_images, args.test_images, cfg.input_size, encoder.mean,
                                         encoder.std, cfg.seed)
    train_loader = DataLoader(train_set, batch_size=min(cfg.batch_size, len(train_set)), shuffle=True,
                              drop_last=True, num_workers=0,
                              generator=torch.Generator().manual_seed(cfg.seed))
    test_loader = DataLoader(test_set, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
    calibrate_batchnorm(encoder, train_set.images[:8].to(device))
    features: Callable[[Tensor], list[Tensor]] = encoder
    if impl == 'original':  # the original's encoder runs in the default (contiguous) memory layout, without
        encoder = encoder.to(memory_format=torch.contiguous_format)  # Encoder.forward's channels-last conversion
        features = encoder._features
    return Setup(cfg, device, encoder, features, decoders, train_loader, test_loader)


def _run_ours(s: Setup, tag: str) -> tuple[dict, dict, float, int, float]:
    """``train.evaluate``, then one ``train.train_meta_epoch`` of one sub-epoch.

    Returns:
        metrics (percent), timing (seconds), training loss, training images, training seconds.
    """
    positions = train.PositionCache(s.cfg.condition_dim, s.device)
    start_rss = _start_memory_window()
    ev = train.evaluate(s.cfg, s.encoder, s.decoders, s.test_loader, positions, s.device, None)
    ev.timing.update(eval_start_rss_mb=start_rss, eval_peak_rss_mb=train.peak_rss_mb())
    optimizer = train.make_optimizer(s.decoders, s.cfg.lr, s.cfg.adam_mode)
    state = train.TrainState()
    _log(tag, f'evaluation {ev.timing["eval_s"]:.1f} s; training on {len(s.train_loader.dataset)} images')
    start = time.perf_counter()
    loss = train.train_meta_epoch(s.cfg, 0, s.encoder, s.decoders, optimizer, s.train_loader, positions,
                                  s.device, state)
    _sync(s.device)
    return ev.metrics, dict(ev.timing), loss, state.train_images, time.perf_counter() - start


def _run_original(s: Setup, tag: str) -> tuple[dict, dict, float, int, float]:
    """The original-style evaluation, then one original-style training pass (same learning rates as ours).

    Returns as :func:`_run_ours`.
    """
    start_rss = _start_memory_window()
    metrics, timing = original_style.evaluate(s.features, s.decoders, s.test_loader, s.cfg.condition_dim,
                                              s.cfg.input_size, s.device, pro=True)
    timing.update(eval_start_rss_mb=start_rss, eval_peak_rss_mb=train.peak_rss_mb())
    optimizer = original_style.make_optimizer(s.decoders, s.cfg.lr)
    _log(tag, f'evaluation {timing["eval_s"]:.1f} s; training on {len(s.train_loader.dataset)} images')
    loss, images, seconds = original_train_pass(s, optimizer)
    return metrics, timing, loss, images, seconds


def original_train_pass(s: Setup, optimizer, epoch: int = 0) -> tuple[float, int, float]:
    """One original-style training pass over ``s.train_loader`` with the learning rates ours uses in
    meta-epoch ``epoch`` and the Adam mode of ``s.cfg``; returns (mean fiber loss, images, seconds)."""
    cfg = s.cfg
    batches = len(s.train_loader) * cfg.sub_epochs

    def lr_at(i: int) -> float:
        return learning_rate(cfg.lr, epoch, i, batches, cfg.meta_epochs, cfg.lr_warm_epochs, cfg.lr_decay_rate)

    return original_style.train_pass(s.features, s.decoders, optimizer, s.train_loader, cfg.condition_dim,
                                     s.device, lr_at, set_to_none=cfg.adam_mode == 'torch2')


def measure(impl: str, encoder_name: str, precision: str, args: argparse.Namespace) -> dict:
    """Evaluate, then train one pass, with one implementation; returns timings, metrics and peak memory."""
    torch.set_num_threads(os.cpu_count() or 1)
    warnings.filterwarnings('ignore', message='Soft permutation will take a very long time')
    tag = f'{impl} {encoder_name} {precision}'
    import_rss = train.peak_rss_mb()  # the floor that the imported libraries alone occupy
    s = _setup(impl, encoder_name, precision, args)
    _warm_up(s.features, s.decoders, s.test_loader.dataset, s.cfg, s.device)
    if s.device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(s.device)
    _log(tag, f'evaluating {len(s.test_loader.dataset)} test images')
    compile_s = None
    if s.cfg.compile:
        positions = train.PositionCache(s.cfg.condition_dim, s.device)
        compile_s = train.compile_model(s.cfg, s.encoder, s.decoders, positions, s.device, training=True)
        _log(tag, f'compiled the evaluation forward pass and the training step in {compile_s:.1f} s')
    if impl != 'original' and s.cfg.adam_mode == 'paper':  # the idle-step kernel (utils.optim), as main.py does
        start = time.perf_counter()
        optim.warm_idle_kernel(s.device)
        compile_s = (compile_s or 0.0) + time.perf_counter() - start
    run = _run_original if impl == 'original' else _run_ours
    metrics, timing, loss, train_images, train_s = run(s, tag)
    _log(tag, f'training {train_images} images in {train_s:.1f} s (loss {loss:.4f})')
    cuda = s.device.type == 'cuda'
    device_name = torch.cuda.get_device_name(s.device) if cuda else f'cpu x{torch.get_num_threads()}'
    return {'impl': impl, 'encoder': encoder_name, 'precision': precision, 'device_name': device_name,
            'train_images': train_images, 'train_s': train_s,
            'train_images_per_s': train_images / train_s if train_s > 0 else None,
            'test_images_per_s': timing['test_images_per_s'], 'test_forward_s': timing['test_forward_s'],
            'eval_s': timing['eval_s'], 'scoring_s': timing['scoring_s'], 'aupro_s': timing['aupro_s'],
            'aupro_cflow_s': timing['aupro_cflow_s'], 'train_loss': loss, 'peak_rss_mb': train.peak_rss_mb(),
            'import_rss_mb': import_rss, 'eval_start_rss_mb': timing['eval_start_rss_mb'],
            'eval_peak_rss_mb': timing['eval_peak_rss_mb'],
            'eval_added_mb': timing['eval_peak_rss_mb'] - timing['eval_start_rss_mb'],
            'peak_cuda_mb': torch.cuda.max_memory_allocated(s.device) / 2 ** 20 if cuda else None,
            'compile_s': compile_s,
            'metrics': {k: metrics.get(k) for k in ('image_auroc', 'pixel_auroc', 'aupro', 'aupro_cflow')}}


def run_child(impl: str, encoder_name: str, precision: str, argv: list[str]) -> dict:
    """Run :func:`measure` in a fresh Python process.

    Its stderr streams through; the last line of its stdout is the JSON result.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, '--child', impl, encoder_name, precision]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        return {'impl': impl, 'encoder': encoder_name, 'precision': precision,
                'error': f'exit status {proc.returncode}'}
    return json.loads(lines[-1])


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def summarise(runs: list[dict]) -> list[dict]:
    """Median of every field over the repeats of each (encoder, precision, implementation), plus ratios."""
    keys: list[tuple[str, str, str]] = []
    for r in runs:
        key = (r['encoder'], r['precision'], r['impl'])
        if key not in keys:
            keys.append(key)
    rows = []
    for key in keys:
        group = [r for r in runs if (r['encoder'], r['precision'], r['impl']) == key]
        ok = [r for r in group if 'error' not in r]
        row = {'encoder': key[0], 'precision': key[1], 'impl': key[2], 'runs': len(ok),
               'errors': [r['error'] for r in group if 'error' in r]}
        for f in FIELDS:
            row[f] = _median([r.get(f) for r in ok])
        row['metrics'] = {m: _median([r['metrics'].get(m) for r in ok]) for m in (*METRICS, 'aupro')}
        rows.append(row)
    for row in rows:
        base = next((b for b in rows if b['impl'] == 'original' and b['encoder'] == row['encoder']
                     and b['runs']), None)
        row['ratios'] = _ratios(row, base) if row['impl'] != 'original' and base and row['runs'] else None
    return rows


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ratios(ours: dict, base: dict) -> dict:
    diffs = {}
    for m in METRICS:
        a, b = ours['metrics'].get(m), base['metrics'].get(m)
        diffs[m] = abs(a - b) if a is not None and b is not None else None
    auroc = [d for d in (diffs['image_auroc'], diffs['pixel_auroc']) if d is not None]
    return {'train_images_per_s': _div(ours['train_images_per_s'], base['train_images_per_s']),
            'test_images_per_s': _div(ours['test_images_per_s'], base['test_images_per_s']),
            'eval_s': _div(base['eval_s'], ours['eval_s']),
            'peak_rss_mb': _div(ours['peak_rss_mb'], base['peak_rss_mb']),
            'eval_peak_rss_mb': _div(ours['eval_peak_rss_mb'], base['eval_peak_rss_mb']),
            'eval_added_mb': _div(ours['eval_added_mb'], base['eval_added_mb']),
            'metric_abs_diff': diffs, 'max_auroc_abs_diff': max(auroc) if auroc else None}


def _fmt(v: float | None, digits: int = 2, suffix: str = '') -> str:
    return '–' if v is None else f'{v:.{digits}f}{suffix}'


def markdown_table(rows: list[dict]) -> str:
    """The summary as a Markdown table (times in seconds, metric differences in percentage points)."""
    head = ['encoder', 'prec', 'impl', 'train img/s', 'test img/s', 'eval s', 'aupro s', 'aupro_cflow s',
            'scoring s', 'compile s', 'peak RSS MiB', 'eval peak MiB (added)', 'train ×', 'test ×', 'eval ×',
            'eval peak × (added ×)', 'max abs. Δ AUROC pp',
            'abs. Δ AUPRO-cflow pp']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        if not r['runs']:
            failed = [r['encoder'], r['precision'], r['impl'], 'failed: ' + '; '.join(r['errors'])]
            lines.append('| ' + ' | '.join(failed + [''] * (len(head) - len(failed))) + ' |')
            continue
        q = r['ratios'] or {}
        diff = (q.get('metric_abs_diff') or {}).get('aupro_cflow')
        aupro_cflow = _fmt(r['aupro_cflow_s'], 2) + (' (DFR)' if r['impl'] == 'original' else '')
        cells = [r['encoder'], r['precision'], r['impl'], _fmt(r['train_images_per_s']),
                 _fmt(r['test_images_per_s']), _fmt(r['eval_s'], 1), _fmt(r['aupro_s'], 2), aupro_cflow,
                 _fmt(r['scoring_s'], 2), _fmt(r['compile_s'], 1), _fmt(r['peak_rss_mb'], 0),
                 f"{_fmt(r['eval_peak_rss_mb'], 0)} ({_fmt(r['eval_added_mb'], 0)})",
                 _fmt(q.get('train_images_per_s'), 2, '×'),
                 _fmt(q.get('test_images_per_s'), 2, '×'), _fmt(q.get('eval_s'), 2, '×'),
                 f"{_fmt(q.get('eval_peak_rss_mb'), 2, '×')} ({_fmt(q.get('eval_added_mb'), 2, '×')})",
                 _fmt(q.get('max_auroc_abs_diff'), 4), _fmt(diff, 4)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def machine_info(args: argparse.Namespace) -> dict:
    return {'python': platform.python_version(), 'torch': torch.__version__, 'cpu_count': os.cpu_count(),
            'platform': platform.platform(), 'processor': platform.processor() or platform.machine(),
            'device': args.device}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='bench/speed.py', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--encoders', nargs='+', default=['resnet18', 'wide_resnet50_2', 'efficientnet_lite0'],
                   choices=ENCODER_NAMES, metavar='NAME', help=f'encoders, of: {", ".join(ENCODER_NAMES)}')
    p.add_argument('--precisions', nargs='+', default=['fp32', 'bf16'], choices=PRECISIONS,
                   help='precisions of ours (the original-style baseline is fp32 only)')
    p.add_argument('--input-size', type=int, default=256, help='square input size in pixels')
    p.add_argument('--train-images', type=int, default=32, help='training images (one pass)')
    p.add_argument('--test-images', type=int, default=60, help='test images (every second one defective)')
    p.add_argument('--batch-size', type=int, default=32, help='image batch size (capped at --train-images)')
    p.add_argument('--repeats', type=int, default=3, help='measurements per row; medians are reported')
    p.add_argument('--no-baseline', action='store_true', help='measure ours only')
    p.add_argument('--compiled', action='store_true',
                   help='also measure ours with --compile (the evaluation forward pass and the training step '
                        'compiled once before they are timed; the compile time is its own column)')
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'),
                   help='auto: CUDA when available, else the CPU')
    p.add_argument('--seed', type=int, default=0, help='seed of data, encoders and decoders')
    p.add_argument('--adam-mode', default='torch2', choices=('torch2', 'paper'),
                   help='optimizer behaviour of both implementations (see the module docstring)')
    p.add_argument('--out', default=None, metavar='FILE.json',
                   help='also write all runs and the summary here')
    p.add_argument('--child', nargs=3, default=None, metavar=('IMPL', 'ENCODER', 'PRECISION'),
                   help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for name in ('train_images', 'test_images', 'batch_size', 'repeats'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be at least 1')
    if args.test_images < 2:
        p.error('--test-images must be at least 2 (one normal and one defective image)')
    if args.child is not None and (args.child[0] not in IMPLEMENTATIONS or args.child[1] not in ENCODER_NAMES
                                   or args.child[2] not in PRECISIONS):
        p.error(f'--child takes one of {IMPLEMENTATIONS}, an encoder name and one of {PRECISIONS}')
    if args.input_size < 32:
        p.error('--input-size must be at least 32 pixels')
    coarse = math.ceil(args.input_size / 32) ** 2 * min(args.batch_size, args.train_images)
    if coarse < original_style.FIBER_BATCH:
        p.error(f'one training batch gives only {coarse} fibers at the coarsest scale, fewer than one fiber '
                f'batch of {original_style.FIBER_BATCH}; raise --train-images/--batch-size or --input-size')
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child is not None:
        impl, encoder_name, precision = args.child
        with contextlib.redirect_stdout(sys.stderr):
            result = measure(impl, encoder_name, precision, args)
        print(json.dumps(result), flush=True)
        return 0
    plan = [(impl, enc, prec) for enc in args.encoders
            for impl, prec in ([] if args.no_baseline else [('original', 'fp32')])
            + [('ours', p) for p in args.precisions]
            + [('ours-compiled', p) for p in (args.precisions if args.compiled else [])]]
    runs = []
    total = len(plan) * args.repeats
    for r in range(args.repeats):
        for i, (impl, enc, prec) in enumerate(plan):
            print(f'== run {r * len(plan) + i + 1}/{total}: {impl} {enc} {prec} (repeat {r + 1})',
                  file=sys.stderr, flush=True)
            runs.append(run_child(impl, enc, prec, argv))
    rows = summarise(runs)
    info = machine_info(args)
    names = sorted({r['device_name'] for r in runs if r.get('device_name')})
    print(f'{info["processor"]}, {info["cpu_count"]} CPUs, torch {info["torch"]}, '
          f'device {", ".join(names) or "–"}; input {args.input_size}, '
          f'{args.train_images} train / {args.test_images} test images, batch {args.batch_size}, '
          f'--adam-mode {args.adam_mode}, median of {args.repeats}')
    print(markdown_table(rows))
    print(LEGEND)
    if args.out:
        write_json(args.out, {'settings': {k: v for k, v in vars(args).items() if k != 'child'},
                              'machine': info, 'rows': rows, 'runs': runs})
    return 1 if any('error' in r for r in runs) else 0


if __name__ == '__main__':
    sys.exit(main())
