"""Throughput on a GPU (or the CPU) with the paper's way of timing, next to an original-style baseline.

    python bench/gpu.py --out gpu.json                 # wide_resnet50_2 at 256², fp32 and bf16

Rows, each measured in a fresh subprocess on the same seeded weights and data (as ``bench/speed.py``:
synthetic textures, a randomly initialised encoder with calibrated BatchNorm; speed does not depend on the
weights):

- ``original``: ``bench/original_style.py``'s loops: 256 fibers per decoder call at test time, and at
  training time one Adam step per 256 fibers with the loss read back to the host after every step.
- ``ours``: the product's eager path (``train.train_meta_epoch``; test: ``train._chunk_log_probs``, whole
  feature grids per decoder call with the condition's share computed once).
- ``ours-compiled``: the same with ``--compile``.
- ``ours-graphs``: ``--compile --cuda-graphs``: each decoder's training step recorded once as a CUDA graph
  and replayed (on the CPU the same as ``ours-compiled``).

Inference is timed as the original's ``test_meta_fps`` does (ORIGINAL.md §5): one warm-up pass over the test
loader, then a timed pass of the encoder alone and a timed pass of encoder + flows, without post-processing,
the device synchronised around each; fps = test images / seconds, batch ``--batch-size``, data loading
included. Training: one untimed pass over the training images (compilation and graph recording, when any,
happen before it, timed as ``compile s``), then a timed pass; images/s of that pass.

Agreement, per row of ours: ``max rel. Δ log p`` is the largest difference (relative where above 1)
between the per-dimension log-likelihoods of the first test batch as this row computes them and as
256-fiber calls of the FrEIA module compute them (eager fp32, the original way) on the same weights, over
its normal images and over all of them (see :func:`score_agreement`);
``abs. Δ loss`` is the difference of the first training pass's mean loss from the eager row of the same
precision (same seed, same fibers).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import original_style  # noqa: E402
import speed  # noqa: E402
import train  # noqa: E402
from custom_models.encoders import ENCODER_NAMES  # noqa: E402
from utils.io import write_json  # noqa: E402

IMPLEMENTATIONS = ('original', 'ours', 'ours-compiled', 'ours-graphs')
DEFAULT_PLAN = ('ours:fp32', 'ours:bf16', 'original:fp32', 'ours-graphs:fp32', 'ours-graphs:bf16',
                'ours-compiled:fp32', 'ours-compiled:bf16')


def _original_flows(s: speed.Setup, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-scale per-dimension log-likelihoods, 256 fibers per FrEIA module call (the original's test loop,
    kept on the device: no list conversion, no post-processing)."""
    out = []
    for decoder, feat in zip(s.decoders, features):
        b, _, h, w = feat.shape
        parts = original_style.chunk_log_probs(decoder, feat.float(), s.cfg.condition_dim, s.device)
        out.append(torch.cat(list(parts)).view(b, h, w))
    return out


def _ours_flows(s: speed.Setup, image: torch.Tensor, positions, tables: list) -> list[torch.Tensor]:
    """Per-scale log-likelihoods of one loader batch through the product's test path."""
    outs = [train._chunk_log_probs(s.cfg, s.encoder, s.decoders, chunk, tables, positions, s.device)
            for chunk in image.split(train.encoder_chunk(s.device))]
    return [torch.cat(scale) for scale in zip(*outs)]


def _ours_encoder(s: speed.Setup, image: torch.Tensor) -> None:
    for chunk in image.split(train.encoder_chunk(s.device)):
        train._encode_chunk(s.cfg, s.encoder, chunk, s.device)


def paper_fps(impl: str, s: speed.Setup, positions) -> dict:
    """Encoder-only and encoder + flows frames per second over the test set, timed as ``test_meta_fps``."""
    for d in s.decoders:
        d.eval()
    tables: list = [None] * len(s.decoders)
    n = len(s.test_loader.dataset)

    def encoder_pass() -> None:
        for image, *_ in s.test_loader:
            if impl == 'original':
                s.features(image.to(s.device))
            else:
                _ours_encoder(s, image)

    def full_pass() -> None:
        for image, *_ in s.test_loader:
            if impl == 'original':
                _original_flows(s, s.features(image.to(s.device)))
            else:
                _ours_flows(s, image, positions, tables)

    def timed(fn) -> float:
        speed._sync(s.device)
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        speed._sync(s.device)
        return time.perf_counter() - start

    timed(full_pass)  # warm-up
    encoder_s = timed(encoder_pass)
    all_s = timed(full_pass)
    return {'test_images': n, 'encoder_fps': n / encoder_s, 'all_fps': n / all_s, 'encoder_s': encoder_s,
            'all_s': all_s}


def score_agreement(impl: str, s: speed.Setup, positions) -> dict:
    """Largest |Δ| / max(1, |reference|) between this row's log-likelihoods of the first test batch and
    256-fiber eager fp32 calls of the FrEIA modules on the same weights, over its normal images and over all
    of them. On random encoder weights the fibers of synthetic defects reach |log p| of 1e12, where other
    summation orders differ by percents; the normal images' fibers are the meaningful comparison."""
    if impl == 'original':
        return {'max_rel_diff_log_p_normal': None, 'max_rel_diff_log_p': None}
    image, label = next(iter(s.test_loader))[:2]
    for d in s.decoders:
        d.eval()
    with torch.no_grad():
        ours = _ours_flows(s, image, positions, [None] * len(s.decoders))
        features = [f.float() for f in train.pool_features(s.encoder(image.to(s.device)), s.cfg.feature_pool)]
        reference = _original_flows(s, features)
    rel = [((a.float() - b).abs() / b.abs().clamp(min=1.0)).flatten(1).cpu() for a, b in zip(ours, reference)]
    normal = label == 0
    return {'max_rel_diff_log_p_normal': max(float(r[normal].max()) for r in rel) if normal.any() else None,
            'max_rel_diff_log_p': max(float(r.max()) for r in rel)}


def train_passes(impl: str, s: speed.Setup, positions) -> dict:
    """An untimed pass over the training images, then a timed one; mean losses of both, images/s of the
    second."""
    if impl == 'original':
        optimizer = original_style.make_optimizer(s.decoders, s.cfg.lr)
        first, _, _ = speed.original_train_pass(s, optimizer, epoch=0)
        second, images, seconds = speed.original_train_pass(s, optimizer, epoch=1)
    else:
        optimizer = train.make_optimizer(s.decoders, s.cfg.lr, s.cfg.adam_mode)
        state = train.TrainState()
        first = train.train_meta_epoch(s.cfg, 0, s.encoder, s.decoders, optimizer, s.train_loader, positions,
                                       s.device, state)
        before = state.train_images
        second = train.train_meta_epoch(s.cfg, 1, s.encoder, s.decoders, optimizer, s.train_loader, positions,
                                        s.device, state)
        images, seconds = state.train_images - before, state.sub_epoch_s[-1]
    return {'train_loss_first': first, 'train_loss_second': second, 'train_images': images,
            'train_s': seconds, 'train_images_per_s': images / seconds}


def measure(impl: str, precision: str, args: argparse.Namespace) -> dict:
    """One row: setup, compilation (timed apart), paper-style fps, score agreement, training."""
    warnings.filterwarnings('ignore', message='Soft permutation will take a very long time')
    tag = f'{impl} {args.encoder} {precision}'
    s = speed._setup('original' if impl == 'original' else 'ours', args.encoder, precision, args)
    s = dataclasses.replace(s, cfg=dataclasses.replace(s.cfg, progress=False,
                                                       compile=impl in ('ours-compiled', 'ours-graphs'),
                                                       cuda_graphs=impl == 'ours-graphs'))
    positions = train.PositionCache(s.cfg.condition_dim, s.device)
    speed._warm_up(s.features, s.decoders, s.test_loader.dataset, s.cfg, s.device)
    if s.device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(s.device)
    compile_s = train.compile_model(s.cfg, s.encoder, s.decoders, positions, s.device, training=True)
    if compile_s is not None:
        speed._log(tag, f'compiled in {compile_s:.1f} s')
    fps = paper_fps(impl, s, positions)
    speed._log(tag, f'encoder {fps["encoder_fps"]:.1f} fps, encoder + flows {fps["all_fps"]:.1f} fps')
    agreement = score_agreement(impl, s, positions)
    result = train_passes(impl, s, positions)
    speed._log(tag, f'training {result["train_images_per_s"]:.2f} images/s')
    cuda = s.device.type == 'cuda'
    return {'impl': impl, 'encoder': args.encoder, 'precision': precision,
            'device_name': torch.cuda.get_device_name(s.device) if cuda else f'cpu x{torch.get_num_threads()}',
            'torch': torch.__version__, 'compile_s': compile_s, **agreement, **fps, **result,
            'peak_cuda_mb': torch.cuda.max_memory_allocated(s.device) / 2 ** 20 if cuda else None}


def markdown_table(rows: list[dict]) -> str:
    fmt = speed._fmt
    head = ['impl', 'precision', 'encoder fps', 'encoder + flows fps', 'train img/s', 'compile s',
            'max rel. Δ log p (normal / all)', 'train loss', 'abs. Δ loss vs eager', 'peak CUDA MiB',
            '× original (fps / train)']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    base = next((r for r in rows if r['impl'] == 'original' and 'error' not in r), None)
    for r in rows:
        if 'error' in r:
            lines.append('| ' + ' | '.join([r['impl'], r['precision'], 'failed: ' + r['error']]
                                           + [''] * (len(head) - 3)) + ' |')
            continue
        eager = next((e for e in rows if e['impl'] == 'ours' and e['precision'] == r['precision']
                      and 'error' not in e), None)
        dloss = (abs(r['train_loss_first'] - eager['train_loss_first'])
                 if eager and r['impl'] != 'original' else None)
        ratio = '–'
        if base and r is not base:
            fps, images = r['all_fps'] / base['all_fps'], r['train_images_per_s'] / base['train_images_per_s']
            ratio = f'{fps:.2f}× / {images:.2f}×'
        agreement = '–'
        if r['impl'] != 'original':
            agreement = f"{fmt(r['max_rel_diff_log_p_normal'], 7)} / {fmt(r['max_rel_diff_log_p'], 5)}"
        lines.append('| ' + ' | '.join([
            r['impl'], r['precision'], fmt(r['encoder_fps'], 1), fmt(r['all_fps'], 1),
            fmt(r['train_images_per_s']), fmt(r['compile_s'], 1), agreement,
            fmt(r['train_loss_first'], 5), fmt(dloss, 5), fmt(r['peak_cuda_mb'], 0), ratio]) + ' |')
    return '\n'.join(lines)


def run_child(impl: str, precision: str, argv: list[str], timeout: float) -> dict:
    """:func:`measure` in a fresh Python process (stderr streams through; the last stdout line is JSON)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, '--child', impl, precision]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=str(REPO), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {'impl': impl, 'precision': precision, 'error': f'stopped by --budget-s after {timeout:.0f} s'}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        return {'impl': impl, 'precision': precision, 'error': f'exit status {proc.returncode}'}
    return json.loads(lines[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='bench/gpu.py', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--encoder', default='wide_resnet50_2', choices=ENCODER_NAMES)
    p.add_argument('--plan', nargs='+', default=list(DEFAULT_PLAN), metavar='IMPL:PRECISION',
                   help=f'rows to measure, in this order; IMPL of {", ".join(IMPLEMENTATIONS)}')
    p.add_argument('--input-size', type=int, default=256)
    p.add_argument('--train-images', type=int, default=64, help='training images per pass (two passes)')
    p.add_argument('--test-images', type=int, default=256)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--adam-mode', default='torch2', choices=('torch2', 'paper'))
    p.add_argument('--budget-s', type=float, default=3600.0,
                   help='stop starting rows after this many seconds; a row still running then is stopped')
    p.add_argument('--out', default=None, metavar='FILE.json', help='rows written here after each one')
    p.add_argument('--child', nargs=2, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    plan = [tuple(item.split(':', 1)) for item in args.plan]
    bad = [':'.join(x) for x in plan if len(x) != 2 or x[0] not in IMPLEMENTATIONS or x[1] not in ('fp32', 'bf16')
           or x == ('original', 'bf16')]  # the original has no bf16
    if bad or (args.train_images < args.batch_size):
        raise SystemExit(f'bench/gpu.py: bad --plan item(s) {bad}' if bad else
                         '--train-images must be at least --batch-size')
    if args.child is not None:
        with contextlib.redirect_stdout(sys.stderr):
            result = measure(args.child[0], args.child[1], args)
        print(json.dumps(result), flush=True)
        return 0
    deadline = time.monotonic() + args.budget_s
    rows = []
    for impl, precision in plan:
        left = deadline - time.monotonic()
        if left < 10:
            rows.append({'impl': impl, 'precision': precision, 'error': 'not run: budget spent'})
            continue
        print(f'== {impl} {precision}', file=sys.stderr, flush=True)
        rows.append(run_child(impl, precision, argv, left))
        if args.out:
            write_json(args.out, {'settings': {k: v for k, v in vars(args).items() if k != 'child'},
                                  'rows': rows})
    names = sorted({r['device_name'] for r in rows if r.get('device_name')})
    versions = sorted({r['torch'] for r in rows if r.get('torch')})
    print(f'{args.encoder} at {args.input_size}², batch {args.batch_size}, {args.test_images} test / '
          f'{args.train_images} training images, --adam-mode {args.adam_mode}; device {", ".join(names) or "–"}, '
          f'torch {", ".join(versions) or "–"}, {os.cpu_count()} CPUs')
    print(markdown_table(rows))
    return 1 if any('error' in r for r in rows) else 0


if __name__ == '__main__':
    sys.exit(main())
