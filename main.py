"""cflow-ad command line: train and evaluate CFLOW-AD, or evaluate a saved checkpoint.

    python main.py --gpu 0 --pro -inp 512 --dataset mvtec --class-name bottle
    python main.py --action-type norm-test --checkpoint weights/FILE.pt --dataset mvtec --class-name bottle -inp 512
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from config import Config, fold_pool_sizes, parse_config, pool_sizes
from custom_datasets import build_datasets, default_data_path, list_classes
from custom_models.encoders import Encoder, build_encoder
from custom_models.flow import build_decoder
from train import (METRIC_NAMES, BestTracker, PositionCache, TrainState, compile_model, evaluate, format_metric,
                   make_optimizer, peak_rss_mb, restore_rng_state, rng_state, set_seed, train_meta_epoch,
                   train_reference)
from utils.checkpoint import load_checkpoint, load_decoders, save_checkpoint
from utils.errors import UserError
from utils.io import atomic_write_bytes, atomic_write_text, write_json, write_npz


def _early_gpu_env(argv: list[str]) -> None:
    """Honour ``--gpu ID`` through CUDA_VISIBLE_DEVICES before torch initialises CUDA."""
    for i, arg in enumerate(argv):
        value = None
        if arg == '--gpu' and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith('--gpu='):
            value = arg.split('=', 1)[1]
        if value is not None and '--no-cuda' not in argv:
            os.environ['CUDA_VISIBLE_DEVICES'] = value


def _user_error_text(exc: BaseException) -> str | None:
    """The message of a UserError, also when a DataLoader worker re-raised it with a traceback."""
    if isinstance(exc, UserError):
        text = str(exc)
        marker = 'UserError: '
        if 'Original Traceback' in text and marker in text:
            text = text.rsplit(marker, 1)[1]
        return ' '.join(text.strip().splitlines())
    return None


def select_device(cfg: Config) -> torch.device:
    """CPU with --no-cuda; CUDA when --gpu is given (required then); otherwise CUDA if available."""
    if cfg.no_cuda:
        return torch.device('cpu')
    if torch.cuda.is_available():
        return torch.device('cuda')
    if cfg.gpu is not None:
        raise UserError(f'--gpu {cfg.gpu} asks for CUDA, but no CUDA device is available; '
                        'add --no-cuda (or leave out --gpu) to run on the CPU')
    print('CUDA is not available: running on the CPU', flush=True)
    return torch.device('cpu')


def normalisation(cfg: Config, encoder: Encoder) -> tuple[tuple, tuple]:
    """Input mean/std: the encoder's, except STC with torchvision encoders (mean 0.5, std 0.225)."""
    if cfg.dataset == 'stc' and not cfg.enc_arch.startswith('efficientnet_lite'):
        return (0.5, 0.5, 0.5), (0.225, 0.225, 0.225)
    return tuple(encoder.mean), tuple(encoder.std)


def make_loader(cfg: Config, dataset, train: bool, device: torch.device) -> DataLoader:
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=train,
                      drop_last=train and len(dataset) >= cfg.batch_size, num_workers=cfg.workers,
                      pin_memory=device.type == 'cuda', generator=generator,
                      persistent_workers=False)


# checkpoint key of the training-image statistics each --score-norm needs ('test' needs none)
REFERENCE_KEYS = {'train': 'score_maxima', 'position': 'score_position_stats'}


def output_paths(cfg: Config) -> dict[str, Path]:
    root = Path(cfg.output_dir)
    return {'results': root / 'results' / f'{cfg.model_name}.json',
            'markdown': root / 'results' / f'{cfg.model_name}.md',
            'maps': root / 'results' / f'{cfg.model_name}_maps.npz',
            'weights': root / 'weights' / f'{cfg.model_name}.pt',
            'viz': root / 'viz' / cfg.model_name}


def print_header(cfg: Config, encoder: Encoder, train_set, test_set, device: torch.device) -> None:
    print(f'Model: {cfg.model_name}', flush=True)
    tta = '' if cfg.tta == 'none' else f', test-time flips {cfg.tta}'
    tta += f', maps smoothed with sigma {cfg.smooth_sigma:g} px' if cfg.smooth_sigma > 0 else ''
    if cfg.scale_weights is not None:
        tta += ', scale weights ' + ' / '.join(f'{w:g}' for w in cfg.scale_weights)
    print(f'Device: {device}, precision {cfg.precision}, seed {cfg.seed}{tta}', flush=True)
    ks = pool_sizes(cfg.feature_pool, cfg.pool_layers)
    pool = '' if max(ks) == 1 else ', features averaged over ' + ' / '.join(f'{k}x{k}' for k in ks)
    print(f'Encoder {cfg.enc_arch}: {cfg.pool_layers} pool layers, channels {encoder.channels}, '
          f'strides {encoder.strides}{pool}', flush=True)
    mirrored = {'none': '', 'hflip': ', mirrored left-right at random', 'flips': ', mirrored at random'}
    augment = f', rotated by up to {cfg.rotation_deg:g} deg' if cfg.rotation_deg else ', not rotated'
    augment += f', brightness and contrast jittered by up to {cfg.train_jitter:g}' if cfg.train_jitter else ''
    print(f'train images: {len(train_set)}{augment}{mirrored[cfg.train_flips]}, test images: {len(test_set)} '
          f'({int(np.sum(test_set.labels))} anomalous)', flush=True)
    if cfg.pro and cfg.score_norm == 'position':
        print('note: --score-norm position gives unbounded maps; the original AUPRO variant (evenly spaced '
              'thresholds between the maps\' extremes) is not meaningful for them: read the MVTec AUPRO', flush=True)
    if test_set.n_missing_masks:
        print(f'note: {test_set.n_missing_masks} anomalous test image(s) have no mask file; they count for the '
              'image AUROC only', flush=True)


def print_epoch(epoch: int, test_loss: float, fps: float | None, values: dict, best: BestTracker) -> None:
    print(f'Epoch: {epoch} \t test_loss: {test_loss:.4f} and {fps or 0:.2f} fps', flush=True)
    for name, label in (('image_auroc', 'DET_AUROC'), ('pixel_auroc', 'SEG_AUROC'), ('aupro', 'SEG_AUPRO'),
                        ('aupro_cflow', 'SEG_AUPRO_CFLOW')):
        if values.get(name) is None:
            continue
        print(f'{label}: last: {format_metric(values[name])} max: {format_metric(best.value[name])} '
              f'epoch_max: {best.epoch[name]}', flush=True)


METRIC_LABELS = {'image_auroc': 'image AUROC', 'pixel_auroc': 'pixel AUROC', 'aupro': 'AUPRO (MVTec, FPR≤0.3)',
                 'aupro_cflow': 'AUPRO (original CFLOW-AD variant)'}


def results_table(last: dict, best: dict) -> str:
    """Markdown table of last-epoch and test-selected best-epoch metrics."""
    lines = ['| metric | last epoch | best epoch (test-selected) |', '|---|---|---|']
    for name, label in METRIC_LABELS.items():
        b = best.get(name)
        epoch = best['epoch'].get(name)
        b_txt = f'{format_metric(b)} (epoch {epoch})' if b is not None else '–'
        value = last.get(name)
        l_txt = f'{format_metric(value)} (epoch {last["epoch"]})' if value is not None else '–'
        lines.append(f'| {label} | {l_txt} | {b_txt} |')
    return '\n'.join(lines)


def markdown_row(cfg: Config, last: dict, best: dict) -> str:
    head = ('| model | class | image AUROC last | best* | pixel AUROC last | best* | AUPRO last | best* |\n'
            '|---|---|---|---|---|---|---|---|\n')
    cells = [cfg.model_name, cfg.class_name]
    for name in ('image_auroc', 'pixel_auroc', 'aupro'):
        cells += [format_metric(last.get(name)), format_metric(best.get(name))]
    return head + '| ' + ' | '.join(cells) + ' |\n\n*best: best epoch per metric on the test set (test-selected).\n'


def build_encoder_for(cfg: Config, checkpoint: dict | None) -> Encoder:
    if checkpoint is not None:
        encoder = build_encoder(cfg.enc_arch, cfg.pool_layers, 'none')
        encoder.load_backbone_state_dict(checkpoint['encoder_state_dict'])
        return encoder
    return build_encoder(cfg.enc_arch, cfg.pool_layers, cfg.encoder_weights)


def _flag_value(ks: tuple[int, ...]) -> str:
    """``--feature-pool`` sizes as they are typed: one K when the scales agree."""
    fp = fold_pool_sizes(ks)
    return str(fp) if isinstance(fp, int) else ' '.join(map(str, fp))


def check_checkpoint_config(cfg: Config, ckpt: dict, source: str) -> None:
    saved = ckpt.get('config')
    if not isinstance(saved, dict):
        return
    saved = {'feature_pool': 1, **saved}  # checkpoints written before --feature-pool existed: no pooling
    for key, flag in (('enc_arch', '-enc'), ('dec_arch', '-dec'), ('pool_layers', '-pl'),
                      ('coupling_blocks', '-cb'), ('feature_pool', '--feature-pool')):
        if key not in saved:
            continue
        was, now = saved[key], getattr(cfg, key)
        if key == 'feature_pool':  # one K or one per scale (a list once saved)
            was, now = (_flag_value(pool_sizes(v, cfg.pool_layers)) for v in (was, now))
        if was != now:
            raise UserError(f'{source} was trained with {flag} {was}, but this run uses {flag} {now}; '
                            f'pass {flag} {was}')
    if saved.get('input_size') not in (None, cfg.input_size):
        print(f'note: {source} was trained with -inp {saved["input_size"]}; evaluating at -inp {cfg.input_size}',
              flush=True)


PIXEL_HISTOGRAM_BINS = 200


def save_visuals(cfg: Config, ev, test_set, mean, std, folder: Path) -> None:
    """Anomaly-map figures per test image and a score histogram, from the last evaluation, a batch of test
    images at a time."""
    from tqdm import tqdm

    from utils.visualize import (denormalize, f1_threshold, histogram_edges, pixel_histogram, save_anomaly_figures,
                                 save_score_histogram, unique_file_names)
    loader = DataLoader(test_set, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers)
    image_thr = f1_threshold(ev.labels, ev.scores) if len(set(ev.labels.tolist())) > 1 else None
    print(f'viz thresholds (F1-optimal on the test set, test-selected): image {image_thr}, '
          f'pixel {ev.pixel_threshold}', flush=True)
    names = list(test_set.names)
    file_names = unique_file_names(names)
    edges = histogram_edges(*ev.map_range, PIXEL_HISTOGRAM_BINS)
    counts = [np.zeros(PIXEL_HISTOGRAM_BINS, dtype=np.int64), np.zeros(PIXEL_HISTOGRAM_BINS, dtype=np.int64)]
    vmax = ev.map_range[1] if np.isfinite(ev.map_range[1]) else None
    start = 0
    for x, *_ in tqdm(loader, desc='figures', unit='batch', leave=False, disable=not cfg.progress):
        stop = start + x.shape[0]
        maps = ev.maps(start, stop).numpy()
        masks = ev.masks(start, stop)
        save_anomaly_figures(str(folder), denormalize(x.numpy(), mean, std), masks, maps, ev.labels[start:stop],
                             ev.scores[start:stop], names[start:stop], ev.pixel_threshold, image_thr,
                             progress=False, vmax=vmax, file_names=file_names[start:stop])
        if edges is not None:
            for total, part in zip(counts, pixel_histogram(masks, maps, edges)):
                total += part
        start = stop
    save_score_histogram(str(folder / 'score_histogram.png'), edges, *counts, ev.labels, ev.scores)
    print(f'Figures written to {folder}', flush=True)


def save_maps(path: Path, ev, names: list[str], size: int, chunk: int = 64) -> None:
    """All anomaly maps and masks in one compressed ``.npz``, made and written ``chunk`` images at a time."""
    n = len(ev.labels)
    starts = range(0, n, chunk)
    arrays = {'maps': ((n, size, size), np.float32, (ev.maps(s, min(s + chunk, n)).numpy() for s in starts)),
              'masks': ((n, size, size), np.bool_, (ev.masks(s, min(s + chunk, n)) for s in starts)),
              'mask_valid': ev.valid, 'labels': ev.labels, 'scores': ev.scores, 'names': np.asarray(names)}
    atomic_write_bytes(path, lambda f: write_npz(f, arrays))
    print(f'Anomaly maps written to {path}', flush=True)


def run_one(cfg: Config) -> dict:
    """Train and/or evaluate one class; returns the results dict that is also written to results/."""
    device = select_device(cfg)
    set_seed(cfg.seed, device.type == 'cuda')
    paths = output_paths(cfg)
    testing = cfg.action_type == 'norm-test'
    ckpt = None
    if testing:
        if not cfg.checkpoint:
            raise UserError('--action-type norm-test needs --checkpoint FILE.pt')
        ckpt = load_checkpoint(cfg.checkpoint)
        check_checkpoint_config(cfg, ckpt, cfg.checkpoint)
    elif paths['weights'].exists() and not cfg.resume:
        raise UserError(f'{paths["weights"]} already exists from an earlier run; add --resume to continue it, '
                        'or remove the file (or use another --output-dir / -run) to train anew')
    resume_ckpt = load_checkpoint(paths['weights']) if cfg.resume and not testing and paths['weights'].exists() \
        else None
    if resume_ckpt is not None:
        check_checkpoint_config(cfg, resume_ckpt, str(paths['weights']))
    encoder = build_encoder_for(cfg, ckpt if testing else resume_ckpt).to(device)
    mean, std = normalisation(cfg, encoder)
    root = cfg.data_path or default_data_path(cfg.dataset)
    train_set, test_set = build_datasets(cfg.dataset, root, cfg.class_name, cfg.input_size, mean, std,
                                         rotation_deg=cfg.rotation_deg, train_flips=cfg.train_flips,
                                         train_jitter=cfg.train_jitter)
    print_header(cfg, encoder, train_set, test_set, device)
    decoders = [build_decoder(cfg.dec_arch, ch, cfg.condition_dim, cfg.coupling_blocks, cfg.clamp_alpha).to(device)
                for ch in encoder.channels]
    for ch in encoder.channels:
        print(f'CNF coder: {ch}', flush=True)
    optimizer = make_optimizer(decoders, cfg.lr, cfg.adam_mode)
    state = TrainState()
    source = ckpt if testing else resume_ckpt
    if source is not None:
        load_decoders(decoders, source['decoder_state_dict'], cfg.checkpoint or str(paths['weights']))
    train_loader = make_loader(cfg, train_set, True, device)
    test_loader = make_loader(cfg, test_set, False, device)
    if resume_ckpt is not None:
        optimizer.load_state_dict(resume_ckpt['optimizer_state_dict'])
        state = TrainState(epoch=resume_ckpt['epoch'], history=list(resume_ckpt.get('history', [])),
                           sub_epoch_s=list(resume_ckpt.get('sub_epoch_s', [])),
                           train_images=resume_ckpt.get('train_images', 0),
                           train_seconds=resume_ckpt.get('train_seconds', 0.0))
        restore_rng_state(resume_ckpt['rng_state'], train_loader.generator)
        print(f'Resuming after meta-epoch {state.epoch} from {paths["weights"]}', flush=True)
    positions = PositionCache(cfg.condition_dim, device)
    try:
        compile_s = compile_model(cfg, encoder, decoders, positions, device, training=not testing)
    except Exception as e:  # noqa: BLE001 - compiler toolchains fail in many ways; one line says what to do
        first = (str(e).strip().splitlines() or [''])[0][:200]
        raise UserError(f'--compile failed ({type(e).__name__}: {first}); run without --compile') from None
    if not testing:
        optimizer.prepare()
    if compile_s is not None:
        what = 'evaluation forward pass' if testing else 'training step and evaluation forward pass'
        graphs = ''
        if cfg.cuda_graphs and not testing:
            graphs = (' (training steps recorded as CUDA graphs)' if device.type == 'cuda'
                      else ' (--cuda-graphs has no effect on the CPU)')
        print(f'Compiled the {what} in {compile_s:.1f} s{graphs}', flush=True)
    train_eval_set = None
    reference_key = REFERENCE_KEYS.get(cfg.score_norm)
    reference = None
    saved_cfg = (ckpt.get('config') or {}) if ckpt is not None else {}
    if reference_key and saved_cfg.get('input_size') == cfg.input_size and saved_cfg.get('tta', 'none') == cfg.tta:
        reference = ckpt.get(reference_key)  # statistics saved with the model, valid at its input size and --tta

    def score_reference() -> list | None:
        """None for --score-norm test; otherwise the training images' statistics (computed once per model)."""
        nonlocal train_eval_set, reference
        if reference_key is None:
            return None
        if reference is None:
            if train_eval_set is None:
                train_eval_set, _ = build_datasets(cfg.dataset, root, cfg.class_name, cfg.input_size, mean, std,
                                                   rotation_deg=0.0)
            reference = train_reference(cfg, encoder, decoders, make_loader(cfg, train_eval_set, False, device),
                                        positions, device)
        return reference

    if len(train_loader) == 0 and not testing:
        raise UserError('the training set is empty')
    best = BestTracker.from_history(state.history)
    ev = None
    epochs = range(0, 1) if testing else range(state.epoch + 1, cfg.meta_epochs)
    for epoch in epochs:
        train_loss = lr = None
        if not testing:
            print(f'Train meta epoch: {epoch}', flush=True)
            train_loss = train_meta_epoch(cfg, epoch, encoder, decoders, optimizer, train_loader, positions,
                                          device, state)
            lr = optimizer.param_groups[0]['lr']
            reference = None
        ev = evaluate(cfg, encoder, decoders, test_loader, positions, device, score_reference())
        epoch_id = ckpt.get('epoch', 0) if testing else epoch
        row = {'epoch': epoch_id, 'train_loss': train_loss, 'lr': lr, 'test_loss': ev.test_loss, **ev.metrics}
        best.update(epoch_id, ev.metrics)
        print_epoch(epoch_id, ev.test_loss, ev.timing['test_images_per_s'], ev.metrics, best)
        if testing:
            state.history = [row]
            continue
        state.history.append(row)
        state.epoch = epoch
        save_checkpoint(paths['weights'], {
            'encoder_state_dict': encoder.backbone_state_dict(),
            'decoder_state_dict': [d.state_dict() for d in decoders],
            'config': cfg.to_dict(), 'epoch': epoch, 'history': state.history,
            'optimizer_state_dict': optimizer.state_dict(), 'rng_state': rng_state(train_loader.generator),
            'sub_epoch_s': state.sub_epoch_s, 'train_images': state.train_images,
            'train_seconds': state.train_seconds, **({reference_key: reference} if reference_key else {})})
        print(f'Saving weights to {paths["weights"]}', flush=True)
    if ev is None:  # resumed a finished run: score the final model once for maps and timings
        ev = evaluate(cfg, encoder, decoders, test_loader, positions, device, score_reference())
    ev.timing['compile_s'] = compile_s
    return finish(cfg, paths, state, best, ev, train_set, test_set, mean, std, ckpt)


def finish(cfg: Config, paths: dict, state: TrainState, best: BestTracker, ev, train_set, test_set, mean, std,
           ckpt: dict | None) -> dict:
    """Print and write the results of a finished run (and figures / maps when asked for)."""
    last = {'epoch': state.history[-1]['epoch'], **{k: state.history[-1].get(k) for k in METRIC_NAMES}}
    timing = {'sub_epoch_s': state.sub_epoch_s,
              'train_images_per_s': state.train_images / state.train_seconds if state.train_seconds else None,
              **{k: ev.timing.get(k) for k in ('test_forward_s', 'test_images_per_s', 'scoring_s', 'aupro_s',
                                               'aupro_cflow_s', 'eval_s', 'compile_s')},
              'peak_rss_mb': peak_rss_mb()}
    result = {'status': 'ok', 'error': None, 'model_name': cfg.model_name, 'action_type': cfg.action_type,
              'dataset': cfg.dataset, 'class_name': cfg.class_name, 'run': cfg.run_name,
              'config': cfg.to_dict(), 'last': last, 'best': best.as_dict(), 'history': state.history,
              'per_defect': ev.per_defect, 'timing': timing,
              'n_train': len(train_set), 'n_test': int(len(ev.labels)), 'n_test_anomalous': int(ev.labels.sum()),
              'n_missing_masks': int(test_set.n_missing_masks),
              'mask_threshold': 'mask > 127' if cfg.dataset == 'mtd' else 'mask > 0',
              'checkpoint': cfg.checkpoint if ckpt is not None else str(paths['weights'])}
    results_path = paths['results']
    if cfg.action_type == 'norm-test':
        results_path = results_path.with_name(f'{cfg.model_name}_norm-test.json')
    write_json(results_path, result)
    atomic_write_text(paths['markdown'] if cfg.action_type == 'norm-train'
                      else results_path.with_suffix('.md'), markdown_row(cfg, last, best.as_dict()))
    print(f'\nResults for {cfg.model_name} (percent):\n{results_table(last, best.as_dict())}', flush=True)
    if ev.per_defect:
        print('\nPer defect type (last epoch):\n| defect | images | image AUROC | pixel AUROC | AUPRO |\n|---|---|---|---|---|')
        for name, m in ev.per_defect.items():
            print(f'| {name} | {m["n_images"]} | {format_metric(m["image_auroc"])} | '
                  f'{format_metric(m["pixel_auroc"])} | {format_metric(m["aupro"])} |')
    print(f'\nResults written to {results_path}', flush=True)
    if cfg.save_maps:
        save_maps(paths['maps'], ev, test_set.names, cfg.input_size)
    if cfg.viz:
        save_visuals(cfg, ev, test_set, mean, std, paths['viz'])
    return result


def run_all(cfg: Config) -> int:
    """``--class-name all``: every class (each at the paper's input size unless -inp is given), R runs each."""
    from utils.report import PAPER_INPUT_SIZE, build_table, format_markdown, load_results, write_table
    root = cfg.data_path or default_data_path(cfg.dataset)
    classes = list_classes(cfg.dataset, root)
    if not classes:
        raise UserError(f'no classes found under {root}; pass --data-path with a folder in {cfg.dataset} layout')
    written, failed = [], []
    for class_name in classes:
        inp = cfg.input_size if cfg.input_size_given or cfg.dataset != 'mvtec' else \
            PAPER_INPUT_SIZE.get(class_name, cfg.input_size)
        for run_id in range(cfg.run_name, cfg.run_name + cfg.run_count):
            one = cfg.replace(class_name=class_name, run_name=run_id, input_size=inp)
            print(f'\n=== {class_name} run {run_id} (input {inp}) ===', flush=True)
            path = output_paths(one)['results']
            try:
                run_one(one)
            except Exception as exc:  # noqa: BLE001 - one failing class must not stop the others
                message = _user_error_text(exc) or f'{type(exc).__name__}: {exc}'
                print(f'error: {class_name} run {run_id} failed: {message}', file=sys.stderr, flush=True)
                write_json(path, {'status': 'failed', 'error': message, 'model_name': one.model_name,
                                  'action_type': one.action_type, 'dataset': one.dataset,
                                  'class_name': class_name, 'run': run_id, 'config': one.to_dict(),
                                  'last': None, 'best': None})
                failed.append(f'{class_name} run {run_id}')
            written.append(path)
    rows = build_table(load_results([str(p) for p in written]))
    prefix = Path(cfg.output_dir) / 'results' / f'table_{cfg.dataset}_{cfg.enc_arch}_{cfg.dec_arch}'
    write_table(rows, str(prefix) + '.md', str(prefix) + '.csv')
    print('\n' + format_markdown(rows), flush=True)
    print(f'\nTable written to {prefix}.md and {prefix}.csv', flush=True)
    if failed:
        print(f'error: {len(failed)} of {len(written)} runs failed ({", ".join(failed)}); '
              'their reasons are above and in their results files', file=sys.stderr, flush=True)
        return 1
    return 0


def run(cfg: Config) -> int:
    if cfg.class_name == 'all':
        return run_all(cfg)
    if cfg.class_name == 'none':
        if cfg.dataset == 'mtd':
            cfg = cfg.replace(class_name='tile')
        else:
            root = cfg.data_path or default_data_path(cfg.dataset)
            raise UserError(f'--class-name is required for --dataset {cfg.dataset}; pass a class or "all" '
                            f'(classes under {root}: {", ".join(_safe_classes(cfg.dataset, root)) or "none found"})')
    start = time.perf_counter()
    run_one(cfg)
    print(f'Total time {time.perf_counter() - start:.1f} s', flush=True)
    return 0


def _safe_classes(dataset: str, root: str) -> list[str]:
    try:
        return list_classes(dataset, root)
    except UserError:
        return []



def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _early_gpu_env(argv)
    cfg = parse_config(argv)
    try:
        return run(cfg)
    except KeyboardInterrupt:
        print('\ninterrupted: the last finished meta-epoch is saved in weights/; rerun the same command with '
              '--resume to continue', file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - turned into one line for users
        text = _user_error_text(exc)
        if text is None:
            import torch
            if isinstance(exc, torch.OutOfMemoryError):
                text = ('out of memory; lower --batch-size, --test-fiber-batch or --input-size, '
                        'or use --precision bf16')
            else:
                raise
        print(f'error: {text}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
