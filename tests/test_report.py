"""Results tables from hand-made result files, the report CLI, and smoke tests of the figure writers."""
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from utils.errors import UserError
from utils.report import (CSV_FIELDS, MVTEC_CLASSES, PAPER_INPUT_SIZE, PAPER_TABLE3, build_table, format_csv,
                          format_markdown, load_results, main, write_table)
from utils.visualize import (denormalize, f1_threshold, figure_file_name, histogram_edges, pixel_histogram,
                             save_anomaly_figures, save_score_histogram, unique_file_names)

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def make_result(class_name: str, run: int, last: dict | None = None, best: dict | None = None,
                enc: str = 'wide_resnet50_2', inp: int = 256, status: str = 'ok', error: str | None = None,
                dataset: str = 'mvtec', **config_changes) -> dict:
    config = {'dataset': dataset, 'enc_arch': enc, 'dec_arch': 'freia-cflow', 'pool_layers': 3,
              'coupling_blocks': 8, 'input_size': inp, 'action_type': 'norm-train', 'meta_epochs': 25,
              **config_changes}
    name = f'{dataset}_{enc}_freia-cflow_pl3_cb8_inp{inp}_run{run}_{class_name}'
    if status == 'failed':
        return {'status': 'failed', 'error': error, 'model_name': name, 'dataset': dataset,
                'class_name': class_name, 'run': run, 'config': config, 'last': None, 'best': None}
    best = best if best is not None else last
    return {'status': 'ok', 'error': None, 'model_name': name, 'action_type': 'norm-train',
            'dataset': dataset, 'class_name': class_name, 'run': run, 'config': config,
            'last': {'epoch': 24, **last}, 'best': {'epoch': {k: 3 for k in best}, **best},
            'history': [], 'per_defect': {}, 'timing': {}}


def metrics(det: float, loc: float, pro: float | None) -> dict:
    return {'image_auroc': det, 'pixel_auroc': loc, 'aupro': pro, 'aupro_cflow': None}


@pytest.fixture
def results() -> list[dict]:
    return [
        make_result('bottle', 0, metrics(99.0, 98.0, 95.0), metrics(100.0, 98.5, 96.0)),
        make_result('bottle', 1, metrics(97.0, 97.0, 94.0), metrics(99.0, 98.5, 95.0)),
        make_result('cable', 0, metrics(90.0, 95.0, None), metrics(92.0, 96.0, None)),
        make_result('cable', 1, metrics(94.0, 96.0, None), metrics(95.0, 97.0, None)),
        make_result('pill', 0, status='failed', error='CUDA out of memory | try -bs 8'),
        make_result('pill', 1, status='failed', error='second error'),
    ]


def row_of(rows: list[dict], class_name: str) -> dict:
    (row,) = [r for r in rows if r['class_name'] == class_name]
    return row


def test_paper_table_consistent():
    assert set(MVTEC_CLASSES) == set(PAPER_INPUT_SIZE) and len(MVTEC_CLASSES) == 15
    assert PAPER_TABLE3['bottle'] == {'det_wrn50': 100.0, 'loc_wrn50': 98.98, 'pro_wrn50': 96.80,
                                      'det_r18': 100.0, 'loc_r18': 98.64}
    assert PAPER_TABLE3['transistor']['pro_wrn50'] == 81.40 and PAPER_TABLE3['screw']['det_r18'] == 85.94
    # the printed average row is the class mean, up to the paper's rounding
    for key, average in PAPER_TABLE3['average'].items():
        assert abs(np.mean([PAPER_TABLE3[c][key] for c in MVTEC_CLASSES]) - average) < 0.01, key
    assert PAPER_INPUT_SIZE['transistor'] == 128 and PAPER_INPUT_SIZE['pill'] == 256
    assert PAPER_INPUT_SIZE['zipper'] == 512


def test_table_means_and_stds(results):
    rows = build_table(results)
    assert [r['class_name'] for r in rows] == ['bottle', 'cable', 'pill', 'mean']
    bottle = row_of(rows, 'bottle')
    assert bottle['n_runs'] == 2 and bottle['n_failed'] == 0 and bottle['status'] == 'ok'
    assert bottle['image_auroc_last_mean'] == 98.0
    assert bottle['image_auroc_last_std'] == pytest.approx(math.sqrt(2.0), abs=1e-12)  # ddof=1
    assert bottle['image_auroc_best_mean'] == 99.5
    assert bottle['image_auroc_best_std'] == pytest.approx(math.sqrt(0.5), abs=1e-12)
    assert bottle['pixel_auroc_best_std'] == 0.0
    assert bottle['aupro_last_mean'] == 94.5
    paper = (bottle['image_auroc_paper'], bottle['pixel_auroc_paper'], bottle['aupro_paper'])
    assert paper == (100.0, 98.98, 96.80)
    cable = row_of(rows, 'cable')
    assert cable['aupro_last_mean'] is None and cable['aupro_last_n'] == 0 and cable['aupro_best_std'] is None
    assert cable['pixel_auroc_last_mean'] == 95.5
    pill = row_of(rows, 'pill')
    assert pill['status'] == 'failed' and pill['n_failed'] == 2 and pill['n_runs'] == 0
    assert pill['error'] == 'CUDA out of memory | try -bs 8'
    mean = row_of(rows, 'mean')
    assert mean['n_classes'] == 2
    assert mean['image_auroc_last_mean'] == pytest.approx((98.0 + 92.0) / 2)
    assert mean['aupro_best_mean'] == 95.5 and mean['aupro_best_n'] == 1
    # paper value of a partial mean row: mean of the paper values of the same classes
    assert mean['image_auroc_paper'] == pytest.approx((100.0 + 97.59) / 2)
    assert mean['aupro_paper'] == 96.80


def test_single_run_has_no_std_and_other_encoders():
    rows = build_table([make_result('bottle', 0, metrics(99.0, 98.0, 95.0), enc='resnet18'),
                        make_result('bottle', 0, metrics(80.0, 70.0, 60.0), enc='mobilenet_v3_large')])
    mobile, r18 = [r for r in rows if r['row'] == 'class']  # configurations sorted by label
    assert r18['enc_arch'] == 'resnet18' and r18['image_auroc_last_std'] is None
    assert (r18['image_auroc_paper'], r18['pixel_auroc_paper'], r18['aupro_paper']) == (100.0, 98.64, None)
    assert mobile['image_auroc_paper'] is None and mobile['image_auroc_last_mean'] == 80.0
    text = format_markdown(rows)
    assert '| configuration |' in text and 'mvtec resnet18 freia-cflow pl3 cb8' in text
    assert '99.00 |' in text and '±' not in text.split('\n\n')[0]


def test_full_mvtec_mean_uses_paper_average_and_splits_input_sizes():
    results = [make_result(c, 0, metrics(90.0, 90.0, 90.0), inp=PAPER_INPUT_SIZE[c]) for c in MVTEC_CLASSES]
    results.append(make_result('bottle', 1, metrics(50.0, 50.0, 50.0), inp=128))
    rows = build_table(results)
    labels = [r['label'] for r in rows]
    assert 'bottle (inp 128)' in labels and 'bottle (inp 512)' in labels and 'cable' in labels
    mean = row_of(rows, 'mean')
    assert mean['n_classes'] == 16
    assert mean['image_auroc_paper'] == pytest.approx(float(np.mean([PAPER_TABLE3[c]['det_wrn50'] for c in
                                                                     MVTEC_CLASSES + ('bottle',)])))
    full = build_table(results[:-1])
    assert row_of(full, 'mean')['pixel_auroc_paper'] == 98.62


def test_mixed_configurations_are_not_averaged():
    rows = build_table([make_result('bottle', 0, metrics(99.0, 98.0, 95.0)),
                        make_result('bottle', 1, metrics(91.0, 90.0, 85.0), meta_epochs=1)])
    class_rows = [r for r in rows if r['row'] == 'class']
    assert len(class_rows) == 2 and all(r['n_runs'] == 1 for r in class_rows)
    assert {r['configuration'].split(', ')[-1] for r in class_rows} == {'meta_epochs=1', 'meta_epochs=25'}


def test_per_scale_feature_pool_and_train_flips_are_configurations():
    """A per-scale --feature-pool (a list in JSON) groups like any setting; files without the newer
    settings count as no pooling, no mirroring and the paper's 5-degree rotation."""
    rows = build_table([make_result('bottle', 0, metrics(99.0, 98.0, 95.0), feature_pool=[1, 3, 3]),
                        make_result('bottle', 1, metrics(97.0, 96.0, 93.0), feature_pool=[1, 3, 3]),
                        make_result('bottle', 2, metrics(91.0, 90.0, 85.0), feature_pool=1, train_flips='none'),
                        make_result('bottle', 3, metrics(90.0, 89.0, 84.0)),
                        make_result('bottle', 4, metrics(80.0, 79.0, 74.0), train_flips='flips'),
                        make_result('bottle', 5, metrics(89.0, 88.0, 83.0), rotation_deg=5.0),
                        make_result('bottle', 6, metrics(70.0, 69.0, 64.0), rotation_deg=0.0)])
    class_rows = sorted((r for r in rows if r['row'] == 'class'), key=lambda r: (-r['n_runs'], r['configuration']))
    assert [r['n_runs'] for r in class_rows] == [3, 2, 1, 1]
    labels = [r['configuration'] for r in class_rows]
    assert 'feature_pool=(1, 3, 3)' in labels[1]
    assert 'rotation_deg=5.0' in labels[0] and 'rotation_deg=5.0' in labels[1]
    assert {label.split(', ', 2)[-1] for label in labels[2:]} == {'train_flips=flips, rotation_deg=5.0',
                                                                   'train_flips=none, rotation_deg=0.0'}


def test_markdown_and_csv(results):
    rows = build_table(results)
    text = format_markdown(rows)
    lines = text.split('\n')
    assert lines[0] == ('| class | runs | image AUROC last | image AUROC best (test-selected) | paper | '
                        'pixel AUROC last | pixel AUROC best (test-selected) | paper | AUPRO last | '
                        'AUPRO best (test-selected) | paper |')
    assert lines[1] == '|' + '---|' * 11
    bottle = [line for line in lines if line.startswith('| bottle |')][0]
    assert bottle == ('| bottle | 2 | 98.00 ± 1.41 | 99.50 ± 0.71 | 100.00 | 97.50 ± 0.71 | 98.50 ± 0.00 | '
                      '98.98 | 94.50 ± 0.71 | 95.50 ± 0.71 | 96.80 |')
    cable = [line for line in lines if line.startswith('| cable |')][0]
    assert cable.endswith('| – | – | 93.53 |')
    pill = [line for line in lines if line.startswith('| pill |')][0]
    assert 'failed: CUDA out of memory \\| try -bs 8' in pill and pill.count('|') - pill.count('\\|') == 12
    assert any(line.startswith('| **mean** | 2 classes |') for line in lines)
    assert 'ddof=1' in text and 'test-selected' in text and 'Configuration: mvtec wide_resnet50_2' in text

    table = list(csv.DictReader(io.StringIO(format_csv(rows))))
    assert list(table[0]) == CSV_FIELDS
    by_class = {r['class_name']: r for r in table}
    assert float(by_class['bottle']['image_auroc_last_mean']) == 98.0
    assert float(by_class['bottle']['image_auroc_last_std']) == round(math.sqrt(2), 4)
    assert by_class['cable']['aupro_last_mean'] == '' and by_class['pill']['status'] == 'failed'
    assert by_class['mean']['row'] == 'mean'


def test_load_results_skips_non_results(tmp_path, results):
    for r in results:
        (tmp_path / f'{r["model_name"]}.json').write_text(json.dumps(r))
    (tmp_path / 'broken.json').write_text('{"status": "ok", ')
    (tmp_path / 'other.json').write_text(json.dumps({'rows': [1, 2]}))
    (tmp_path / 'notes.txt').write_text('x')
    problems: list[str] = []
    loaded = load_results(tmp_path, problems)
    assert len(loaded) == 6
    assert len(problems) == 1 and 'broken.json' in problems[0]
    with pytest.warns(UserWarning, match='broken.json'):
        load_results(tmp_path)
    with pytest.raises(UserError):
        load_results(tmp_path / 'missing')
    explicit = load_results([tmp_path / f'{results[0]["model_name"]}.json', tmp_path / 'gone.json'], problems)
    assert len(explicit) == 1 and 'gone.json' in problems[-1]


def test_write_table(tmp_path, results):
    rows = build_table(results)
    write_table(rows, tmp_path / 'out' / 't.md', tmp_path / 'out' / 't.csv')
    assert (tmp_path / 'out' / 't.md').read_text() == format_markdown(rows) + '\n'
    assert (tmp_path / 'out' / 't.csv').read_text() == format_csv(rows)
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['t.csv', 't.md']  # no temp files left


def test_cli(tmp_path, results, capsys):
    folder = tmp_path / 'results'
    folder.mkdir()
    for r in results:
        (folder / f'{r["model_name"]}.json').write_text(json.dumps(r))
    assert main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert '| bottle | 2 | 98.00 ± 1.41 |' in out
    assert (folder / 'table.md').is_file() and (folder / 'table.csv').is_file()
    assert main([str(folder), '--out', str(tmp_path / 'x' / 'tab')]) == 0
    assert (tmp_path / 'x' / 'tab.csv').is_file()
    assert main([str(folder)]) == 0  # the table files it wrote do not disturb a rebuild
    capsys.readouterr()

    assert main([str(tmp_path / 'nope')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert 'no result files' in capsys.readouterr().err


def test_denormalize_round_trip():
    rgb = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3) * 2
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = (rgb.transpose(0, 3, 1, 2) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    out = denormalize(x.astype(np.float32), mean, std)
    assert out.dtype == np.uint8 and out.shape == (2, 4, 5, 3)
    assert np.array_equal(out, rgb)
    with pytest.raises(UserError):
        denormalize(np.zeros((2, 4, 5)), mean, std)


def test_f1_threshold_brute_force():
    rng = np.random.default_rng(0)
    labels = rng.random(60) < 0.3
    scores = rng.random(60) + labels * 0.5
    best_f1, best_t = -1.0, None
    for t in np.unique(scores):  # ascending: ties keep the lowest threshold, like argmax on sklearn's curve
        pred = scores >= t
        tp = np.sum(pred & labels)
        f1 = 2 * tp / (pred.sum() + labels.sum())
        if f1 > best_f1 + 1e-12:
            best_f1, best_t = f1, t
    assert f1_threshold(labels.astype(int), scores) == pytest.approx(best_t)
    assert f1_threshold(np.zeros(5), np.arange(5.0)) is None
    assert f1_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.7, 0.9])) == pytest.approx(0.7)


def test_figure_file_names():
    assert figure_file_name('broken_large/000.png', 0) == 'broken_large_000.png'
    assert figure_file_name('good\\001.JPG', 1) == 'good_001.png'
    assert figure_file_name('../', 7) == '00007.png'


def tiny_set(n: int, size: int = 24):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, size=(n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=bool)
    masks[-1, 5:12, 6:14] = True
    maps = rng.random((n, size, size)).astype(np.float32)
    maps[-1, 5:12, 6:14] += 2.0
    labels = np.zeros(n, dtype=int)
    labels[-1] = 1 if n > 1 else 0
    scores = maps.reshape(n, -1).max(axis=1)
    return images, masks, maps, labels, scores


def test_save_anomaly_figures(tmp_path):
    images, masks, maps, labels, scores = tiny_set(3)
    names = ['good/000.png', 'good/001.png', 'broken_large/000.png']
    paths = save_anomaly_figures(str(tmp_path / 'viz'), images, masks, maps, labels, scores, names,
                                 pixel_threshold=1.5, image_threshold=2.0, progress=False)
    assert [Path(p).name for p in paths] == ['good_000.png', 'good_001.png', 'broken_large_000.png']
    for p in paths:
        assert Path(p).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in (tmp_path / 'viz').iterdir()) == sorted(Path(p).name for p in paths)


def test_save_anomaly_figures_in_chunks(tmp_path):
    images, masks, maps, labels, scores = tiny_set(3)
    names = ['good/000.png', 'a/x.png', 'a_x.png']  # the last two map to the same file name
    file_names = unique_file_names(names)
    assert file_names == ['good_000.png', 'a_x.png', 'a_x_1.png']
    paths = []
    for sl in (slice(0, 2), slice(2, 3)):
        paths += save_anomaly_figures(str(tmp_path), images[sl], masks[sl], maps[sl], labels[sl], scores[sl],
                                      names[sl], 1.5, None, progress=False, vmax=float(maps.max()),
                                      file_names=file_names[sl])
    assert [Path(p).name for p in paths] == file_names
    with pytest.raises(UserError):
        save_anomaly_figures(str(tmp_path), images, masks, maps, labels, scores, names, None, None,
                             progress=False, file_names=file_names[:2])


def test_save_anomaly_figures_single_image_no_thresholds(tmp_path):
    images, masks, maps, labels, scores = tiny_set(1)
    masks[:] = False
    paths = save_anomaly_figures(str(tmp_path), images, masks, maps, labels, scores, ['a/b.png'], None, None,
                                 progress=False)
    assert len(paths) == 1 and Path(paths[0]).read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(UserError):
        save_anomaly_figures(str(tmp_path), images, masks[:, :5], maps, labels, scores, ['a'], None, None)
    with pytest.raises(UserError):
        save_anomaly_figures(str(tmp_path), images, masks, maps, labels, scores, ['a', 'b'], None, None)


def test_pixel_histogram_sums_over_chunks_and_score_histogram(tmp_path):
    images, masks, maps, labels, scores = tiny_set(3)
    edges = histogram_edges(float(maps.min()), float(maps.max()), 20)
    normal, anomalous = pixel_histogram(masks, maps, edges)
    assert normal.sum() == (~masks).sum() and anomalous.sum() == masks.sum()
    parts = [pixel_histogram(masks[i:i + 1], maps[i:i + 1], edges) for i in range(3)]
    np.testing.assert_array_equal(sum(p[0] for p in parts), normal)
    np.testing.assert_array_equal(sum(p[1] for p in parts), anomalous)
    np.testing.assert_array_equal(normal, np.histogram(maps[~masks], bins=edges)[0])
    assert histogram_edges(1.0, np.inf, 5) is None
    assert histogram_edges(2.0, 2.0, 4).tolist() == [2.0, 2.25, 2.5, 2.75, 3.0]
    path = tmp_path / 'h' / 'hist.png'
    save_score_histogram(str(path), edges, normal, anomalous, labels, scores)
    assert path.read_bytes()[:8] == PNG_MAGIC
    _, masks1, maps1, labels1, scores1 = tiny_set(1)
    save_score_histogram(str(tmp_path / 'one.png'), None, np.zeros(0), np.zeros(0), labels1, scores1)
    assert (tmp_path / 'one.png').read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(UserError):
        save_score_histogram(str(tmp_path / 'bad.png'), edges, normal[:-1], anomalous, labels, scores)


def test_write_npz_in_parts_reads_back_like_savez(tmp_path):
    from utils.io import atomic_write_bytes, write_npz
    rng = np.random.default_rng(4)
    maps = rng.random((7, 5, 6)).astype(np.float32)
    masks = rng.random((7, 5, 6)) > 0.7
    names = np.asarray(['a/1.png', 'bb/2.png', 'c', 'd', 'e', 'f', 'g'])
    path = tmp_path / 'out' / 'maps.npz'
    atomic_write_bytes(path, lambda f: write_npz(f, {
        'maps': (maps.shape, np.float32, (maps[s:s + 3] for s in range(0, 7, 3))),
        'masks': (masks.shape, np.bool_, [masks[:4], masks[4:]]), 'names': names, 'labels': np.arange(7)}))
    with np.load(path) as got:
        assert sorted(got.files) == ['labels', 'maps', 'masks', 'names']
        np.testing.assert_array_equal(got['maps'], maps)
        np.testing.assert_array_equal(got['masks'], masks)
        np.testing.assert_array_equal(got['names'], names)
        np.testing.assert_array_equal(got['labels'], np.arange(7))
    for bad in ([maps[:3]], [maps[:3, :4]]):  # too few rows; a part of the wrong shape
        with pytest.raises(ValueError):
            atomic_write_bytes(tmp_path / 'bad.npz', lambda f: write_npz(f, {'maps': (maps.shape, np.float32, bad)}))
    assert not (tmp_path / 'bad.npz').exists()
