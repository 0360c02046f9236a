"""End to end through main.py: ``--class-name all`` with a failing class and a missing mask, and ShanghaiTech
Campus from generated videos."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_datasets import _write_test_video, _write_video
from tests.test_e2e import make_tiny_mvtec

REPO = Path(__file__).resolve().parents[1]
FAST = ['-enc', 'efficientnet_lite0', '-inp', '64', '-bs', '4', '--workers', '0', '--no-cuda', '--no-progress',
        '-cb', '2', '--meta-epochs', '1', '--sub-epochs', '1']


def run_main(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / 'main.py'), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_class_name_all_reports_a_failed_class_and_a_missing_mask(tmp_path):
    data = tmp_path / 'data'
    make_tiny_mvtec(data, 'alpha', size=64, seed=1)
    make_tiny_mvtec(data, 'beta', size=64, seed=2)
    (data / 'alpha' / 'ground_truth' / 'spot' / '003_mask.png').unlink()  # allowed: image-level only
    (data / 'beta' / 'test' / 'good' / '001.png').write_bytes(b'not an image')
    out = tmp_path / 'out'
    proc = run_main('--dataset', 'mvtec', '--class-name', 'all', '--data-path', str(data),
                    '--output-dir', str(out), *FAST, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    assert 'beta run 0 failed' in proc.stderr and '001.png' in proc.stderr
    assert '1 anomalous test image(s) have no mask file' in proc.stdout

    results = out / 'results'
    alpha = json.loads((results / 'mvtec_efficientnet_lite0_freia-cflow_pl3_cb2_inp64_run0_alpha.json').read_text())
    beta = json.loads((results / 'mvtec_efficientnet_lite0_freia-cflow_pl3_cb2_inp64_run0_beta.json').read_text())
    assert alpha['status'] == 'ok' and alpha['n_missing_masks'] == 1 and alpha['n_test'] == 8
    assert alpha['last']['pixel_auroc'] is not None and alpha['last']['image_auroc'] is not None
    assert beta['status'] == 'failed' and '001.png' in beta['error'] and beta['last'] is None

    table = (results / 'table_mvtec_efficientnet_lite0_freia-cflow.md').read_text()
    rows = {line.split('|')[1].strip(): line for line in table.splitlines() if line.startswith('|')}
    assert 'failed' in rows['beta']
    assert f"{alpha['last']['image_auroc']:.1f}" in rows['alpha']
    csv = (results / 'table_mvtec_efficientnet_lite0_freia-cflow.csv').read_text()
    assert 'alpha' in csv and 'beta' in csv

    # the table can be rebuilt from the results files alone
    rebuilt = subprocess.run([sys.executable, '-m', 'utils.report', str(results)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rows['alpha'].split('|')[2:5] == \
        next(line for line in rebuilt.stdout.splitlines() if line.startswith('| alpha')).split('|')[2:5]


@pytest.fixture()
def stc_scene(tmp_path) -> Path:
    root = tmp_path / 'shanghaitech'
    _write_video(root / 'training' / 'videos' / '01_001.avi', 6, 0)
    _write_video(root / 'training' / 'videos' / '01_002.avi', 5, 1)
    _write_test_video(root, '01_0014', [0, 1, 1, 0])
    _write_test_video(root, '01_0015', [1, 0, 0])
    return root


def test_stc_scene_trains_and_evaluates_from_videos(stc_scene, tmp_path):
    out = tmp_path / 'out'
    proc = run_main('--dataset', 'stc', '--class-name', '01', '--data-path', str(stc_scene),
                    '--output-dir', str(out), '--save-maps', *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((out / 'results' / 'stc_efficientnet_lite0_freia-cflow_pl3_cb2_inp64_run0_01.json').read_text())
    assert res['status'] == 'ok' and res['n_train'] == 11 and res['n_test'] == 7
    for key in ('image_auroc', 'pixel_auroc'):
        assert 0 <= res['last'][key] <= 100
    # frames were decoded once, to JPEG files beside the videos
    assert len(list((stc_scene / 'training' / 'frames' / '01_001').glob('*.jpg'))) == 6
    maps = np.load(out / 'results' / (res['model_name'] + '_maps.npz'))
    assert list(maps['labels']) == [0, 1, 1, 0, 1, 0, 0]
    # pixel masks come from the .npy files: a frame labelled normal has an empty mask
    assert maps['masks'][1].any() and not maps['masks'][0].any()
