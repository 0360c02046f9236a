"""The benchmark scripts: bench/mtd.py (its synthetic validation defects) and bench/eval_memory.py."""
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
            cfg.feature_pool, cfg.score_norm, cfg.tta) == tuple(mtd.RECIPE[k] for k in (
                'encoder', 'input_size', 'meta_epochs', 'sub_epochs', 'pool_layers', 'coupling_blocks',
                'feature_pool', 'score_norm', 'tta'))
    assert cfg.scale_weights == tuple(float(w) for w in mtd.RECIPE['scale_weights'])
    assert cfg.rotation_deg == mtd.RECIPE['rotation_deg'] == 0
    assert cfg.precision == mtd.RECIPE['precision'] == 'bf16'
    assert cfg.lr == mtd.RECIPE['lr'] == 4e-4
    assert cfg.model_name == 'mtd_efficientnet_lite2_freia-cflow_pl3_cb8_fp3_rot0_inp384_run0_none'
    for cand in mtd.CANDIDATES:
        for score_norm, tta in mtd.SCORINGS:
            cfg = parse_config(mtd.recipe_args({**cand, 'score_norm': score_norm, 'tta': tta}))
            assert (cfg.score_norm, cfg.tta, cfg.input_size) == (score_norm, tta, cand['input_size'])
            assert cfg.feature_pool == cand.get('feature_pool', 1)
            assert cfg.train_flips == cand.get('train_flips', 'none')
            assert cfg.rotation_deg == cand.get('rotation_deg', 5.0)
            assert cfg.train_jitter == cand.get('train_jitter', 0.0)
            assert cfg.precision == cand.get('precision', 'fp32')
            assert cfg.lr == cand.get('lr', 2e-4)
    assert parse_config([]).model_name == 'mvtec_wide_resnet50_2_freia-cflow_pl3_cb8_inp256_run0_none'
    assert (parse_config(['--feature-pool', '3', '--train-flips', 'hflip']).model_name
            == 'mvtec_wide_resnet50_2_freia-cflow_pl3_cb8_fp3_trhflip_inp256_run0_none')
    for bad in ('0', '2'):
        with pytest.raises(SystemExit):
            parse_config(['--feature-pool', bad])


@pytest.mark.parametrize('compile_', [True, False])
@pytest.mark.parametrize('precision', [None, 'fp32', 'bf16'])
def test_benchmark_runs_the_recipe_in_the_precision_and_mode_asked_for(tmp_path, precision, compile_):
    """bench/mtd.py --precision replaces the recipe's precision and --no-compile drops its --compile, and neither
    changes anything else (the same model name); without them the recipe's own precision and mode are used."""
    from config import parse_config
    args = mtd.benchmark_args(tmp_path / 'data', tmp_path / 'out', ['--workers', '2', '--seed', '1'],
                              mtd.benchmark_recipe(precision, compile_))
    cfg = parse_config(args)
    assert cfg.precision == (precision or mtd.RECIPE['precision'])
    assert mtd.RECIPE['compile'] is True and cfg.compile is compile_
    assert (cfg.dataset, cfg.class_name, cfg.pro, cfg.seed, cfg.workers) == ('mtd', 'tile', True, 1, 2)
    assert cfg.model_name == parse_config(mtd.benchmark_args(tmp_path / 'data', tmp_path / 'out', [],
                                                             mtd.RECIPE)).model_name


def test_benchmark_failure_of_the_compiled_recipe_names_no_compile(tmp_path, monkeypatch):
    """A failed main.py run stops the benchmark with its exit status; the compiled recipe's message names
    --no-compile (what to do where torch.compile finds no working compiler), the eager one's does not."""
    import subprocess
    calls = []
    monkeypatch.setattr(subprocess, 'run', lambda cmd: calls.append(cmd) or subprocess.CompletedProcess(cmd, 2))
    for compile_, named in ((True, True), (False, False)):
        with pytest.raises(SystemExit) as exc:
            mtd.benchmark(tmp_path / 'data', tmp_path / 'out', [], None, compile_)
        assert str(exc.value).startswith('main.py failed with exit status 2')
        assert ('--no-compile' in str(exc.value)) is named
        assert ('--compile' in calls[-1]) is compile_


def test_eval_memory_bench_runs_and_cutting_the_score_axis_keeps_the_metrics():
    """bench/eval_memory.py end to end on a tiny grid, with every defect pixel held at once and with a budget
    that cuts the score axis into many ranges: more passes, the same metrics."""
    import json
    import subprocess
    script = Path(__file__).resolve().parents[1] / 'bench' / 'eval_memory.py'
    rows = []
    for budget in (1 << 21, 64):
        proc = subprocess.run([sys.executable, str(script), '--child', '6', '64', str(budget)],
                              stdout=subprocess.PIPE, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert rows[0]['passes'] == 2 and rows[1]['passes'] > 4
    for key in ('image_auroc', 'pixel_auroc', 'aupro', 'aupro_cflow'):
        assert rows[0][key] is not None and rows[0][key] == pytest.approx(rows[1][key], abs=1e-9)


def test_gpu_bench_runs_on_the_cpu_and_both_implementations_agree(tmp_path):
    """bench/gpu.py on a tiny setting on the CPU: the paper-style fps and training rows of ours and the
    original-style loops, with ours' grid scores equal to 256-fiber module calls and the same first loss."""
    import json
    import subprocess
    script = Path(__file__).resolve().parents[1] / 'bench' / 'gpu.py'
    out = tmp_path / 'gpu.json'
    proc = subprocess.run([sys.executable, str(script), '--device', 'cpu', '--encoder', 'resnet18',
                           '--input-size', '128', '--train-images', '32', '--test-images', '8',
                           '--plan', 'ours:fp32', 'original:fp32', '--out', str(out)],
                          stdout=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stdout
    assert '| ours | fp32 |' in proc.stdout and '| original | fp32 |' in proc.stdout
    ours, original = json.loads(out.read_text())['rows']
    for row in (ours, original):
        assert row['encoder_fps'] > 0 and row['all_fps'] > 0 and row['train_images_per_s'] > 0
        assert row['test_images'] == 8 and row['train_images'] == 32
    assert ours['max_rel_diff_log_p_normal'] < 1e-5 and ours['max_rel_diff_log_p'] < 1e-3
    assert ours['train_loss_first'] == pytest.approx(original['train_loss_first'], rel=1e-4)
