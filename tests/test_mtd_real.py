"""Real defects: a short training run on a fixed subset of the Magnetic Tile Defects data in ../shared/data."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
MTD = REPO.parent / 'shared' / 'data' / 'magnetic_tile'

pytestmark = pytest.mark.skipif(not (MTD / 'MT_Free' / 'Imgs').is_dir(),
                                reason=f'Magnetic Tile data not found at {MTD} (it sits beside the checkout in CI)')


def make_subset(root: Path, normal: int = 120, per_defect: int = 8) -> Path:
    """MTD layout of symbolic links: the first ``normal`` defect-free images by name and the first
    ``per_defect`` images of three defect types. Nothing is copied."""
    for folder, count in (('MT_Free', normal), ('MT_Blowhole', per_defect), ('MT_Break', per_defect),
                          ('MT_Fray', per_defect)):
        dst = root / folder / 'Imgs'
        dst.mkdir(parents=True)
        for jpg in sorted((MTD / folder / 'Imgs').glob('*.jpg'))[:count]:
            for src in (jpg, jpg.with_suffix('.png')):
                (dst / src.name).symlink_to(src)
    return root


def test_magnetic_tile_subset_detects_real_defects(tmp_path):
    data = make_subset(tmp_path / 'mtd')
    cmd = [sys.executable, str(REPO / 'main.py'), '--dataset', 'mtd', '--data-path', str(data),
           '-enc', 'efficientnet_lite0', '-inp', '256', '--meta-epochs', '2', '--sub-epochs', '2', '-bs', '16', '--save-maps',
           '--workers', '0', '--no-cuda', '--no-progress', '--output-dir', str(tmp_path / 'out')]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((tmp_path / 'out' / 'results').glob('mtd_*.json'))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    assert res['n_test'] == 24 + 24  # every 5th normal image of 120, and 3 x 8 defects
    assert set(res['per_defect']) == {'Blowhole', 'Break', 'Fray'}
    # a broken pipeline (random scores, wrong sign, masks misaligned) cannot reach these
    assert res['last']['image_auroc'] >= 85, res['last']
    assert res['last']['pixel_auroc'] >= 85, res['last']
    # the printed figures are those of the saved maps and scores
    maps = np.load(files[0].with_name(files[0].stem + '_maps.npz'))
    assert 100 * roc_auc_score(maps['labels'], maps['scores']) == pytest.approx(res['last']['image_auroc'], abs=1e-6)
    blowhole = np.array([n.startswith('MT_Free') or n.startswith('MT_Blowhole') for n in maps['names']])
    pixel = 100 * roc_auc_score(maps['masks'][blowhole].ravel(), maps['maps'][blowhole].ravel())
    assert pixel == pytest.approx(res['per_defect']['Blowhole']['pixel_auroc'], abs=1e-4)
