"""Results tables: per-class mean ± std over runs of the result files, beside the paper's Table 3.

``python -m utils.report RESULTS_DIR [--out PREFIX]`` rebuilds the table from ``RESULTS_DIR/*.json``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.io import atomic_write_text

METRICS = ('image_auroc', 'pixel_auroc', 'aupro')
KINDS = ('last', 'best')
METRIC_TITLES = {'image_auroc': 'image AUROC', 'pixel_auroc': 'pixel AUROC', 'aupro': 'AUPRO'}

# CFLOW-AD columns of Table 3, in percent: (det_wrn50, loc_wrn50, pro_wrn50, det_r18, loc_r18).
_TABLE3_ROWS = {
    'bottle': (100.0, 98.98, 96.80, 100.00, 98.64),
    'cable': (97.59, 97.64, 93.53, 97.62, 96.75),
    'capsule': (97.68, 98.98, 93.40, 93.15, 98.62),
    'carpet': (98.73, 99.25, 97.70, 98.20, 99.29),
    'grid': (99.60, 98.99, 96.08, 98.97, 98.53),
    'hazelnut': (99.98, 98.89, 96.68, 99.91, 98.81),
    'leather': (100.0, 99.66, 99.35, 100.00, 99.51),
    'metal_nut': (99.26, 98.56, 91.65, 98.45, 97.59),
    'pill': (96.82, 98.95, 95.39, 93.02, 98.34),
    'screw': (91.89, 98.86, 95.30, 85.94, 98.40),
    'tile': (99.88, 98.01, 94.34, 98.40, 95.80),
    'toothbrush': (99.65, 98.93, 95.06, 99.86, 99.00),
    'transistor': (95.21, 97.99, 81.40, 93.04, 97.69),
    'wood': (99.12, 96.65, 95.79, 98.59, 95.00),
    'zipper': (98.48, 99.08, 96.60, 96.15, 98.98),
    'average': (98.26, 98.62, 94.60, 96.75, 98.06),
}
_TABLE3_KEYS = ('det_wrn50', 'loc_wrn50', 'pro_wrn50', 'det_r18', 'loc_r18')
PAPER_TABLE3: dict[str, dict[str, float]] = {
    name: dict(zip(_TABLE3_KEYS, values, strict=True)) for name, values in _TABLE3_ROWS.items()}
MVTEC_CLASSES = tuple(name for name in _TABLE3_ROWS if name != 'average')

PAPER_INPUT_SIZE: dict[str, int] = {
    **{name: 512 for name in ('bottle', 'carpet', 'grid', 'leather', 'screw', 'tile', 'toothbrush', 'wood',
                              'zipper')},
    **{name: 256 for name in ('cable', 'capsule', 'hazelnut', 'metal_nut', 'pill')},
    'transistor': 128,
}

# Table 3 column per encoder and metric.
_PAPER_COLUMNS = {
    'wide_resnet50_2': {'image_auroc': 'det_wrn50', 'pixel_auroc': 'loc_wrn50', 'aupro': 'pro_wrn50'},
    'resnet18': {'image_auroc': 'det_r18', 'pixel_auroc': 'loc_r18'},
}

# Settings that define a configuration (runs differing only in these are never averaged together). The first
# six always appear in the label; the others only where the results differ in them.
_BASE_KEYS = ('dataset', 'enc_arch', 'dec_arch', 'pool_layers', 'coupling_blocks', 'action_type')
_EXTRA_KEYS = ('meta_epochs', 'sub_epochs', 'lr', 'batch_size', 'fiber_batch', 'score_norm',
               'encoder_weights', 'precision', 'adam_mode', 'tta', 'feature_pool', 'train_flips', 'smooth_sigma',
               'scale_weights', 'rotation_deg', 'train_jitter')

# Settings added after results files existed: the value that older files, which lack them, ran with.
_ADDED_SETTINGS = {'tta': 'none', 'feature_pool': 1, 'train_flips': 'none', 'smooth_sigma': 0.0,
                   'scale_weights': None, 'rotation_deg': 5.0, 'train_jitter': 0.0}

CSV_FIELDS = (['configuration', *_BASE_KEYS, 'class_name', 'input_size', 'row', 'status', 'error', 'n_runs',
               'n_failed', 'n_classes']
              + [f'{m}_{k}_{s}' for m in METRICS for k in KINDS for s in ('mean', 'std', 'n')]
              + [f'{m}_paper' for m in METRICS])

LEGEND = ('Percent. Cells: mean ± sample std (ddof=1) over runs; no ± with a single run; "(n=k)": only k '
          'runs (classes in the mean row) have the value; "–": not available. last = final epoch; best '
          '(test-selected) = each metric\'s maximum over epochs, chosen on the test set as in the paper. '
          'paper = CFLOW-AD Table 3 (WideResNet-50: detection, localization AUROC, AUPRO; ResNet-18: '
          'detection, localization). mean = mean of the class means; its paper value is the paper\'s average '
          'with all 15 classes, else the mean of the paper values of the same classes.')


def _is_result(data: object) -> bool:
    return (isinstance(data, dict) and data.get('status') in ('ok', 'failed')
            and isinstance(data.get('class_name'), str))


def _result_files(paths_or_dir: str | Path | Iterable[str | Path], problems: list[str]) -> list[Path]:
    if isinstance(paths_or_dir, (str, Path)):
        path = Path(paths_or_dir)
        if path.is_dir():
            return sorted(path.glob('*.json'))
        if path.is_file():
            return [path]
        raise UserError(f'results path {path} does not exist; pass the folder that holds the result '
                        '.json files')
    files = []
    for item in paths_or_dir:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(path.glob('*.json')))
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f'{path}: no such file; skipped')
    return files


def load_results(paths_or_dir: str | Path | Iterable[str | Path],
                 warnings_out: list[str] | None = None) -> list[dict]:
    """Read result files: a folder (its ``*.json``), one file, or a list of files and folders.

    JSON files that are not results (no ``status``/``class_name``) are ignored. Unreadable or malformed
    files are skipped with a message; so is an earlier file of the same model name and action type.

    Args:
        paths_or_dir: a folder, a file, or an iterable of files and folders.
        warnings_out: list that receives the skip messages; when None they are issued with ``warnings.warn``.
    Returns:
        The result dicts, in file order.
    """
    problems: list[str] = []
    by_name: dict[tuple, dict] = {}
    unnamed: list[dict] = []
    for path in _result_files(paths_or_dir, problems):
        try:
            data = json.loads(path.read_text(encoding='utf-8'))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f'{path}: not a readable JSON file ({exc}); skipped')
            continue
        if not _is_result(data):
            continue
        name = data.get('model_name')
        if not isinstance(name, str):
            unnamed.append(data)
            continue
        key = (name, _action_type(data))
        if key in by_name:
            problems.append(f'{path}: a second result for {name} ({key[1]}); the earlier one is skipped')
        by_name[key] = data
    if warnings_out is None:
        for message in problems:
            warnings.warn(message, stacklevel=2)
    else:
        warnings_out.extend(problems)
    return list(by_name.values()) + unnamed


def _action_type(result: dict) -> str:
    config = result.get('config') if isinstance(result.get('config'), dict) else {}
    return str(result.get('action_type') or config.get('action_type') or 'norm-train')


def _setting(result: dict, key: str) -> object:
    config = result.get('config') if isinstance(result.get('config'), dict) else {}
    if key == 'action_type':
        return _action_type(result)
    if key == 'dataset':
        return result.get('dataset', config.get('dataset'))
    value = config.get(key, _ADDED_SETTINGS.get(key))
    return tuple(value) if isinstance(value, list) else value  # e.g. --feature-pool per scale: hashable


def _metric(result: dict, kind: str, metric: str) -> float | None:
    block = result.get(kind)
    value = block.get(metric) if isinstance(block, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = float(np.mean(values))
    return mean, (float(np.std(values, ddof=1)) if len(values) >= 2 else None)


def paper_value(dataset: str | None, enc_arch: str | None, class_name: str, metric: str) -> float | None:
    """The paper's Table 3 number for an MVTec class (or 'average') and encoder; None where it has none."""
    column = _PAPER_COLUMNS.get(str(enc_arch), {}).get(metric)
    if dataset != 'mvtec' or column is None or class_name not in PAPER_TABLE3:
        return None
    return PAPER_TABLE3[class_name].get(column)


def _config_labels(keys: list[tuple]) -> dict[tuple, str]:
    """Short labels: the base settings, plus the extra settings where the configurations differ."""
    varying = [i for i in range(len(_BASE_KEYS), len(_BASE_KEYS) + len(_EXTRA_KEYS))
               if len({key[i] for key in keys}) > 1]
    labels = {}
    for key in keys:
        dataset, enc, dec, pool, blocks, action = key[:len(_BASE_KEYS)]
        parts = [f'{dataset} {enc} {dec} pl{pool} cb{blocks}']
        if action != 'norm-train':
            parts.append(str(action))
        parts += [f'{_EXTRA_KEYS[i - len(_BASE_KEYS)]}={key[i]}' for i in varying]
        labels[key] = ', '.join(parts)
    return labels


def _class_row(label: str, key: tuple, class_name: str, input_size: object, runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get('status') == 'ok']
    failed = [r for r in runs if r.get('status') != 'ok']
    first_error = next((str(r.get('error') or 'no message') for r in failed), None)
    row = {'configuration': label, **dict(zip(_BASE_KEYS, key, strict=True)), 'class_name': class_name,
           'input_size': input_size, 'row': 'class', 'status': 'ok' if ok else 'failed', 'error': first_error,
           'n_runs': len(ok), 'n_failed': len(failed), 'n_classes': None}
    for metric in METRICS:
        for kind in KINDS:
            values = [v for v in (_metric(r, kind, metric) for r in ok) if v is not None]
            row[f'{metric}_{kind}_mean'], row[f'{metric}_{kind}_std'] = _mean_std(values)
            row[f'{metric}_{kind}_n'] = len(values)
        row[f'{metric}_paper'] = paper_value(row['dataset'], row['enc_arch'], class_name, metric)
    return row


def _mean_row(class_rows: list[dict]) -> dict | None:
    ok_rows = [r for r in class_rows if r['status'] == 'ok']
    if not ok_rows:
        return None
    first = ok_rows[0]
    row = {'configuration': first['configuration'], **{k: first[k] for k in _BASE_KEYS}, 'class_name': 'mean',
           'input_size': None, 'row': 'mean', 'status': 'ok', 'error': None,
           'n_runs': sum(r['n_runs'] for r in class_rows), 'n_failed': sum(r['n_failed'] for r in class_rows),
           'n_classes': len(ok_rows)}
    for metric in METRICS:
        contributing = set()
        for kind in KINDS:
            present = [r for r in ok_rows if r[f'{metric}_{kind}_mean'] is not None]
            contributing |= {id(r) for r in present}
            row[f'{metric}_{kind}_mean'] = _mean_std([r[f'{metric}_{kind}_mean'] for r in present])[0]
            row[f'{metric}_{kind}_std'] = None
            row[f'{metric}_{kind}_n'] = len(present)
        used = [r for r in ok_rows if id(r) in contributing]
        row[f'{metric}_paper'] = _mean_paper(used, metric)
    return row


def _mean_paper(rows: list[dict], metric: str) -> float | None:
    if not rows:
        return None
    first = rows[0]
    if sorted(r['class_name'] for r in rows) == sorted(MVTEC_CLASSES):
        return paper_value(first['dataset'], first['enc_arch'], 'average', metric)
    values = [r[f'{metric}_paper'] for r in rows]
    return None if any(v is None for v in values) else float(np.mean(values))


def build_table(results: list[dict]) -> list[dict]:
    """One row per configuration and class, plus a mean row per configuration.

    Runs are grouped by (dataset, enc_arch, dec_arch, pool_layers, coupling_blocks, action type, the settings
    in ``_EXTRA_KEYS``) and class; a class evaluated at several input sizes gets one row per size. Each row
    holds ``n_runs`` (ok runs), ``n_failed``, and for each metric in METRICS and kind in ('last', 'best') the
    mean, the sample std (ddof=1; None for one run) and the count of runs with a value, plus the paper's
    number (``<metric>_paper``). A class whose runs all failed has ``status`` 'failed' and its first
    ``error``.

    Args:
        results: result dicts as ``load_results`` returns them.
    Returns:
        Rows (flat dicts with the CSV_FIELDS keys), configurations in order, classes sorted, mean row last.
    """
    groups: dict[tuple, dict[tuple, list[dict]]] = {}
    for result in results:
        key = tuple(_setting(result, k) for k in _BASE_KEYS + _EXTRA_KEYS)
        size = _setting(result, 'input_size')
        groups.setdefault(key, {}).setdefault((result['class_name'], size), []).append(result)
    labels = _config_labels(list(groups))
    rows: list[dict] = []
    for key in sorted(groups, key=lambda k: labels[k]):
        by_class = groups[key]
        sizes: dict[str, int] = {}
        for class_name, _ in by_class:
            sizes[class_name] = sizes.get(class_name, 0) + 1
        class_rows = []
        for class_name, size in sorted(by_class, key=lambda cs: (cs[0], str(cs[1]))):
            runs = by_class[(class_name, size)]
            row = _class_row(labels[key], key[:len(_BASE_KEYS)], class_name, size, runs)
            row['label'] = f'{class_name} (inp {size})' if sizes[class_name] > 1 else class_name
            class_rows.append(row)
        rows.extend(class_rows)
        mean = _mean_row(class_rows)
        if mean is not None:
            mean['label'] = 'mean'
            rows.append(mean)
    return rows


def _escape(text: str, limit: int = 160) -> str:
    text = ' '.join(str(text).split())
    if len(text) > limit:
        text = text[:limit - 1] + '…'
    return text.replace('|', '\\|')


def _value_cell(row: dict, metric: str, kind: str) -> str:
    mean, std, n = (row[f'{metric}_{kind}_{s}'] for s in ('mean', 'std', 'n'))
    if mean is None:
        return '–'
    cell = f'{mean:.2f}' if std is None else f'{mean:.2f} ± {std:.2f}'
    expected = row['n_classes'] if row['row'] == 'mean' else row['n_runs']
    return cell + (f' (n={n})' if n < expected else '')


def _runs_cell(row: dict) -> str:
    if row['row'] == 'mean':
        return f'{row["n_classes"]} classes'
    return f'{row["n_runs"]}' + (f' (+{row["n_failed"]} failed)' if row['n_failed'] else '')


def format_markdown(rows: list[dict]) -> str:
    """A GitHub Markdown table of ``build_table`` rows, with a legend line under it."""
    configs = list(dict.fromkeys(r['configuration'] for r in rows))
    multi = len(configs) > 1
    header = ['class', 'runs']
    for metric in METRICS:
        title = METRIC_TITLES[metric]
        header += [f'{title} last', f'{title} best (test-selected)', 'paper']
    if multi:
        header.insert(0, 'configuration')
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for row in rows:
        label = row.get('label', row['class_name'])
        cells = [f'**{label}**' if row['row'] == 'mean' else _escape(label), _runs_cell(row)]
        if row['status'] == 'failed':
            cells += [f'failed: {_escape(row["error"])}'] + ['–'] * (3 * len(METRICS) - 1)
        else:
            for metric in METRICS:
                paper = row[f'{metric}_paper']
                cells += [_value_cell(row, metric, 'last'), _value_cell(row, metric, 'best'),
                          '–' if paper is None else f'{paper:.2f}']
        if multi:
            cells.insert(0, _escape(row['configuration']))
        lines.append('| ' + ' | '.join(cells) + ' |')
    legend = LEGEND if multi or not configs else f'Configuration: {configs[0]}. {LEGEND}'
    return '\n'.join(lines) + '\n\n' + legend


def _csv_value(value: object) -> object:
    if value is None:
        return ''
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, str):
        return ' '.join(value.split())
    return value


def format_csv(rows: list[dict]) -> str:
    """CSV text of ``build_table`` rows: one column per value (means and stds apart), blanks for missing."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in CSV_FIELDS})
    return buffer.getvalue()


def write_table(rows: list[dict], md_path: str | Path, csv_path: str | Path) -> None:
    """Write the Markdown and CSV tables atomically (parent folders are created)."""
    atomic_write_text(md_path, format_markdown(rows) + '\n')
    atomic_write_text(csv_path, format_csv(rows))


def main(argv: list[str] | None = None) -> int:
    """CLI: rebuild the table from RESULTS_DIR/*.json; prints it and writes PREFIX.md and PREFIX.csv."""
    parser = argparse.ArgumentParser(prog='python -m utils.report',
                                     description='Per-class results table (mean ± std over runs).')
    parser.add_argument('results_dir', help='folder with the <model name>.json result files')
    parser.add_argument('--out', default=None,
                        help='output prefix for .md and .csv (default RESULTS_DIR/table)')
    args = parser.parse_args(argv)
    folder = Path(args.results_dir)
    prefix = args.out if args.out is not None else str(folder / 'table')
    try:
        if not folder.is_dir():
            raise UserError(f'results folder {folder} does not exist; pass the folder that holds the result '
                            'files')
        problems: list[str] = []
        results = load_results(folder, problems)
        for message in problems:
            print(f'warning: {message}', file=sys.stderr)
        if not results:
            raise UserError(f'no result files (.json with a "status" field) in {folder}; '
                            'run training or evaluation first, or pass the right folder')
        rows = build_table(results)
        write_table(rows, f'{prefix}.md', f'{prefix}.csv')
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    except OSError as exc:
        print(f'error: cannot write the table to {prefix}.md/.csv ({exc}); pass a writable --out',
              file=sys.stderr)
        return 2
    print(format_markdown(rows))
    print(f'\nTable written to {prefix}.md and {prefix}.csv')
    return 0


if __name__ == '__main__':
    sys.exit(main())
