"""The Magnetic Tile benchmark's synthetic validation defects (bench/mtd.py)."""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))
import mtd  # noqa: E402


def _tile(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(90, 170, (150, 210), dtype=np.uint8))


@pytest.mark.parametrize('kind', mtd.SYNTHETIC_KINDS)
def test_synthetic_defect_changes_the_image_where_its_mask_says(kind):
    image = _tile()
    before = np.asarray(image, dtype=np.float32)
    out, mask = mtd.synthetic_defect(image, kind, np.random.default_rng(1))
    after = np.asarray(out, dtype=np.float32)
    assert out.size == image.size and mask.shape == before.shape and mask.dtype == bool
    assert 0 < mask.mean() < 0.6
    assert np.abs(after - before)[mask].mean() > 3  # visible inside the mask
    if kind != 'uneven':  # the brightness bump is smooth: its mask is where it exceeds 10 %
        np.testing.assert_array_equal(after[~mask], before[~mask])


def test_synthetic_cracks_are_thin_and_faint():
    rng = np.random.default_rng(2)
    for _ in range(20):
        image = _tile(int(rng.integers(1000)))
        before = np.asarray(image, dtype=np.float32)
        out, mask = mtd.synthetic_defect(image, 'crack', rng)
        ratio = np.asarray(out, dtype=np.float32)[mask].mean() / before[mask].mean()
        assert 0.68 < ratio < 0.87
        assert mask.mean() < 0.05


def test_synthetic_defects_are_deterministic_for_a_seed():
    a = mtd.synthetic_defect(_tile(), 'crack', np.random.default_rng(5))
    b = mtd.synthetic_defect(_tile(), 'crack', np.random.default_rng(5))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(a[1], b[1])


def test_recipe_and_scorings_are_valid_command_lines():
    """The benchmark's recipe and every validation scoring parse into the configuration they describe."""
    from config import parse_config
    cfg = parse_config(['--dataset', 'mtd', *mtd.recipe_args(mtd.RECIPE)])
    assert (cfg.enc_arch, cfg.input_size, cfg.meta_epochs, cfg.sub_epochs, cfg.pool_layers, cfg.coupling_blocks,
            cfg.score_norm, cfg.tta) == tuple(mtd.RECIPE[k] for k in (
                'encoder', 'input_size', 'meta_epochs', 'sub_epochs', 'pool_layers', 'coupling_blocks',
                'score_norm', 'tta'))
    for cand in mtd.CANDIDATES:
        for score_norm, tta in mtd.SCORINGS:
            cfg = parse_config(mtd.recipe_args({**cand, 'score_norm': score_norm, 'tta': tta}))
            assert (cfg.score_norm, cfg.tta, cfg.input_size) == (score_norm, tta, cand['input_size'])
