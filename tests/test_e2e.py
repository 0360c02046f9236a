"""End to end: main.py trains, saves, resumes and re-evaluates on a tiny generated MVTec-layout dataset."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]


def make_tiny_mvtec(root: Path, class_name: str = 'widget', size: int = 128, seed: int = 0) -> Path:
    """A smooth random texture; anomalies are bright squares with exact masks."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.5, 0.04, size=(size, size, 3))

    def image() -> np.ndarray:
        noise = rng.normal(0.0, 0.03, size=(size, size, 3))
        return np.clip(base + noise, 0, 1)

    def save(arr: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((arr * 255).astype(np.uint8)).save(path)

    cls = root / class_name
    for i in range(8):
        save(image(), cls / 'train' / 'good' / f'{i:03d}.png')
    for i in range(4):
        save(image(), cls / 'test' / 'good' / f'{i:03d}.png')
    for i in range(4):
        img = image()
        mask = np.zeros((size, size), dtype=np.uint8)
        y, x = rng.integers(8, size - 40, size=2)
        img[y:y + 28, x:x + 28] = [1.0, 0.1, 0.1]
        mask[y:y + 28, x:x + 28] = 255
        save(img, cls / 'test' / 'spot' / f'{i:03d}.png')
        (cls / 'ground_truth' / 'spot').mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(cls / 'ground_truth' / 'spot' / f'{i:03d}_mask.png')
    return root


def run_main(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / 'main.py'), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


COMMON = ['--dataset', 'mvtec', '--class-name', 'widget', '-enc', 'efficientnet_lite0', '-inp', '128',
          '-bs', '4', '--workers', '0', '--no-cuda', '--no-progress', '-cb', '2', '--pro']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp('e2e')
    make_tiny_mvtec(work / 'data')
    out = work / 'out'
    proc = run_main(*COMMON, '--data-path', str(work / 'data'), '--output-dir', str(out), '--meta-epochs', '2',
                    '--sub-epochs', '1', '--save-maps', '--viz', cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, out, proc


def _result(out: Path, suffix: str = '') -> dict:
    name = 'mvtec_efficientnet_lite0_freia-cflow_pl3_cb2_inp128_run0_widget'
    return json.loads((out / 'results' / f'{name}{suffix}.json').read_text())


def test_train_writes_results_checkpoint_and_figures(trained):
    work, out, proc = trained
    res = _result(out)
    assert res['status'] == 'ok' and res['last']['epoch'] == 1 and len(res['history']) == 2
    for key in ('image_auroc', 'pixel_auroc', 'aupro', 'aupro_cflow'):
        assert 0 <= res['last'][key] <= 100
        assert res['best'][key] >= res['last'][key]
    # an easy, large defect: a working pipeline finds it
    assert res['last']['image_auroc'] >= 90 and res['last']['pixel_auroc'] >= 90
    assert set(res['timing']) >= {'sub_epoch_s', 'train_images_per_s', 'test_forward_s', 'test_images_per_s',
                                  'scoring_s', 'aupro_s', 'aupro_cflow_s', 'eval_s', 'peak_rss_mb'}
    assert len(res['timing']['sub_epoch_s']) == 2
    assert 'spot' in res['per_defect']
    assert 'test-selected' in proc.stdout and 'DET_AUROC' in proc.stdout
    maps = np.load(out / 'results' / (res['model_name'] + '_maps.npz'))
    assert maps['maps'].shape == (8, 128, 128) and maps['masks'].shape == (8, 128, 128)
    assert list(maps['labels']) == [0] * 4 + [1] * 4
    # the metrics, computed from maps made a chunk at a time, agree with sklearn on the saved maps
    np.testing.assert_array_equal(maps['scores'], maps['maps'].reshape(8, -1).max(axis=1))
    assert res['last']['image_auroc'] == pytest.approx(100 * roc_auc_score(maps['labels'], maps['scores']), abs=1e-9)
    valid = maps['mask_valid']
    expected = 100 * roc_auc_score(maps['masks'][valid].ravel(), maps['maps'][valid].ravel())
    assert res['last']['pixel_auroc'] == pytest.approx(expected, abs=1e-6)
    assert len(list((out / 'viz' / res['model_name']).glob('*.png'))) >= 9
    assert (out / 'weights' / (res['model_name'] + '.pt')).is_file()


def test_norm_test_reproduces_last_epoch(trained):
    work, out, _ = trained
    ckpt = out / 'weights' / (_result(out)['model_name'] + '.pt')
    proc = run_main(*COMMON, '--data-path', str(work / 'data'), '--output-dir', str(out),
                    '--action-type', 'norm-test', '--checkpoint', str(ckpt), cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_res, test_res = _result(out), _result(out, '_norm-test')
    for key in ('image_auroc', 'pixel_auroc', 'aupro', 'aupro_cflow'):
        assert test_res['last'][key] == pytest.approx(train_res['last'][key], abs=1e-6)
    assert test_res['last']['epoch'] == 1


def test_compiled_evaluation_matches_eager(trained, tmp_path):
    """--compile: the compiled forward pass (its last chunk padded: 8 test images in loader batches of 4)
    gives the eager run's maps to float rounding, and the compile time is reported apart."""
    work, out, _ = trained
    name = _result(out)['model_name']
    proc = run_main(*COMMON, '--data-path', str(work / 'data'), '--output-dir', str(tmp_path), '--compile',
                    '--action-type', 'norm-test', '--checkpoint', str(out / 'weights' / f'{name}.pt'),
                    '--save-maps', cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eager = np.load(out / 'results' / f'{name}_maps.npz')
    compiled = np.load(tmp_path / 'results' / f'{name}_maps.npz')
    np.testing.assert_allclose(compiled['maps'], eager['maps'], rtol=1e-4, atol=1e-4 * np.abs(eager['maps']).max())
    tested, train_res = _result(tmp_path, '_norm-test'), _result(out)
    for key in ('image_auroc', 'pixel_auroc', 'aupro'):
        assert tested['last'][key] == pytest.approx(train_res['last'][key], abs=1e-3)
    assert tested['timing']['compile_s'] > 0 and train_res['timing']['compile_s'] is None


@pytest.mark.parametrize('graphs', [[], ['--cuda-graphs']], ids=['compile', 'cuda-graphs'])
def test_compiled_training_follows_eager_training(trained, tmp_path, graphs):
    """--compile in training (with --cuda-graphs: compiled in mode 'reduce-overhead', which on the CPU
    records no graphs, and says so): the compiled training step and encoder follow the eager run's loss
    curve and reach its figures; compiling happens before training and is reported apart."""
    work, out, _ = trained
    proc = run_main(*COMMON, '--data-path', str(work / 'data'), '--output-dir', str(tmp_path), '--meta-epochs', '2',
                    '--sub-epochs', '1', '--compile', *graphs, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Compiled the training step and evaluation forward pass' in proc.stdout
    assert ('--cuda-graphs has no effect on the CPU' in proc.stdout) == bool(graphs)
    eager, compiled = _result(out), _result(tmp_path)
    for a, b in zip(eager['history'], compiled['history'], strict=True):
        assert b['train_loss'] == pytest.approx(a['train_loss'], rel=1e-4)
        for key in ('image_auroc', 'pixel_auroc', 'aupro'):
            assert b[key] == pytest.approx(a[key], abs=0.5)
    assert compiled['timing']['compile_s'] > 0


def test_position_score_norm_is_saved_and_reused(trained, tmp_path):
    """--score-norm position: the training statistics are saved with the model and norm-test reproduces the
    run's figures; the easy defects are still found."""
    work, out, _ = trained
    args = [*COMMON, '--data-path', str(work / 'data'), '--meta-epochs', '1', '--sub-epochs', '1',
            '--score-norm', 'position', '--output-dir', str(tmp_path)]
    proc = run_main(*args, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'original AUPRO variant' in proc.stdout
    res = _result(tmp_path)
    assert res['config']['score_norm'] == 'position'
    assert res['last']['image_auroc'] >= 90 and res['last']['pixel_auroc'] >= 90, res['last']
    ckpt_path = tmp_path / 'weights' / (res['model_name'] + '.pt')
    stats = torch_load(ckpt_path)['score_position_stats']
    assert sorted(tuple(m.shape) for m, _ in stats) == [(4, 4), (8, 8), (16, 16)]  # strides 32, 16, 8 at 128
    assert all(m.shape == s.shape and bool((s > 0).all()) for m, s in stats)
    again = run_main(*args, '--action-type', 'norm-test', '--checkpoint', str(ckpt_path), cwd=work)
    assert again.returncode == 0, again.stderr[-3000:]
    tested = _result(tmp_path, '_norm-test')
    for key in ('image_auroc', 'pixel_auroc', 'aupro', 'aupro_cflow'):
        assert tested['last'][key] == pytest.approx(res['last'][key], abs=1e-6)
    # test-time flips: the same model scored with mirrored copies averaged in (statistics recomputed for them)
    flipped = run_main(*args, '--action-type', 'norm-test', '--checkpoint', str(ckpt_path), '--tta', 'hflip',
                       '--output-dir', str(tmp_path / 'tta'), cwd=work)
    assert flipped.returncode == 0, flipped.stderr[-3000:]
    assert 'test-time flips hflip' in flipped.stdout
    with_tta = json.loads((tmp_path / 'tta' / 'results' / f'{res["model_name"]}_norm-test.json').read_text())
    assert with_tta['config']['tta'] == 'hflip'
    assert with_tta['last']['image_auroc'] >= 90 and with_tta['last']['pixel_auroc'] >= 90, with_tta['last']
    assert with_tta['last']['pixel_auroc'] != tested['last']['pixel_auroc']
    # smoothed maps without the coarsest scale: other test-time settings of the same model
    smoothed = run_main(*args, '--action-type', 'norm-test', '--checkpoint', str(ckpt_path), '--smooth-sigma', '4',
                        '--scale-weights', '1', '1', '0', '--output-dir', str(tmp_path / 'smooth'), cwd=work)
    assert smoothed.returncode == 0, smoothed.stderr[-3000:]
    assert 'maps smoothed with sigma 4 px, scale weights 1 / 1 / 0' in smoothed.stdout
    with_smooth = json.loads((tmp_path / 'smooth' / 'results' / f'{res["model_name"]}_norm-test.json').read_text())
    assert with_smooth['config']['smooth_sigma'] == 4.0 and with_smooth['config']['scale_weights'] == [1, 1, 0]
    assert with_smooth['last']['image_auroc'] >= 90 and with_smooth['last']['pixel_auroc'] >= 90, with_smooth['last']
    assert with_smooth['last']['pixel_auroc'] != tested['last']['pixel_auroc']


def test_interrupted_run_resumes_identically(trained, tmp_path):
    """Ctrl-C after the first meta-epoch, then --resume: the same history as an uninterrupted run (with the
    training images mirrored at random, so that the augmentation's random state is resumed too)."""
    import signal
    work, out, _ = trained
    args = [*COMMON, '--data-path', str(work / 'data'), '--sub-epochs', '1', '--meta-epochs', '3',
            '--train-flips', 'hflip']
    name = _result(out)['model_name'].replace('_inp', '_trhflip_inp', 1)
    cmd = [sys.executable, str(REPO / 'main.py'), *args, '--output-dir', str(tmp_path / 'out')]
    # a child inherits an ignored SIGINT (as under `nohup` or `&`) and then never sees Ctrl-C: restore it
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith('Saving weights'):
            proc.send_signal(signal.SIGINT)
            break
    proc.stdout.read()
    stderr = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130 and '--resume' in stderr and 'Traceback' not in stderr, stderr[-2000:]
    ckpt = torch_load(tmp_path / 'out' / 'weights' / (name + '.pt'))
    assert ckpt['epoch'] == 0
    # the same command again refuses to overwrite the checkpoint
    again = run_main(*args, '--output-dir', str(tmp_path / 'out'), cwd=work)
    assert again.returncode == 2 and '--resume' in again.stderr and 'Traceback' not in again.stderr
    resumed = run_main(*args, '--output-dir', str(tmp_path / 'out'), '--resume', cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'Resuming after meta-epoch 0' in resumed.stdout and 'mirrored left-right at random' in resumed.stdout
    straight = run_main(*args, '--output-dir', str(tmp_path / 'straight'), cwd=work)
    assert straight.returncode == 0
    a, b = (json.loads((tmp_path / run / 'results' / f'{name}.json').read_text())['history']
            for run in ('out', 'straight'))
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert ra['train_loss'] == pytest.approx(rb['train_loss'], rel=1e-6)
        assert ra['image_auroc'] == pytest.approx(rb['image_auroc'], abs=1e-6)
        assert ra['pixel_auroc'] == pytest.approx(rb['pixel_auroc'], abs=1e-6)


def torch_load(path: Path) -> dict:
    import torch
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.parametrize('args, needle', [
    (['--data-path', '/nonexistent/dir', '--class-name', 'widget'], '/nonexistent/dir'),
    (['--class-name', 'nosuchclass'], 'widget'),
    (['--class-name', 'widget', '--gpu', '0'], '--no-cuda'),
    (['--class-name', 'widget', '--action-type', 'norm-test'], '--checkpoint'),
    (['--class-name', 'widget', '--action-type', 'norm-test', '--checkpoint', '/nonexistent.pt'], 'nonexistent.pt'),
])
def test_bad_input_one_line(trained, args, needle):
    work, out, _ = trained
    base = ['--dataset', 'mvtec', '-enc', 'efficientnet_lite0', '-inp', '128', '--workers', '0', '--no-progress',
            '--output-dir', str(work / 'bad')]
    if '--data-path' not in args:
        base += ['--data-path', str(work / 'data')]
    if '--gpu' not in args:
        base += ['--no-cuda']
    proc = run_main(*base, *args, cwd=work)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error:') and needle in err[0], proc.stderr


def test_checkpoint_from_other_encoder_is_refused(trained):
    work, out, _ = trained
    ckpt = out / 'weights' / (_result(out)['model_name'] + '.pt')
    proc = run_main('--dataset', 'mvtec', '--class-name', 'widget', '--data-path', str(work / 'data'), '-inp', '128',
                    '-enc', 'resnet18', '--encoder-weights', 'none', '--no-cuda', '--workers', '0',
                    '--action-type', 'norm-test', '--checkpoint', str(ckpt), '--output-dir', str(work / 'bad'),
                    cwd=work)
    assert proc.returncode == 2
    assert proc.stderr.startswith('error:') and '-enc' in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_checkpoint_with_other_feature_pool_is_refused(trained):
    """Flows trained on raw features must not score pooled ones (nor the reverse)."""
    work, out, _ = trained
    ckpt = out / 'weights' / (_result(out)['model_name'] + '.pt')
    proc = run_main('--dataset', 'mvtec', '--class-name', 'widget', '--data-path', str(work / 'data'), '-inp', '128',
                    '-enc', 'efficientnet_lite0', '-cb', '2', '--feature-pool', '3', '--no-cuda', '--workers', '0',
                    '--action-type', 'norm-test', '--checkpoint', str(ckpt), '--output-dir', str(work / 'bad'),
                    cwd=work)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error:') and 'pass --feature-pool 1' in err[0], proc.stderr


def test_norm_test_reads_original_layout(trained, tmp_path):
    """A checkpoint with only encoder_state_dict and decoder_state_dict, as the original code writes them."""
    import torch
    work, out, _ = trained
    ours = torch.load(out / 'weights' / (_result(out)['model_name'] + '.pt'), map_location='cpu')
    original = {'encoder_state_dict': ours['encoder_state_dict'], 'decoder_state_dict': ours['decoder_state_dict']}
    assert sorted(original['decoder_state_dict'][0]) == sorted(
        ['module_list.0.global_scale', 'module_list.0.global_offset', 'module_list.0.w_perm',
         'module_list.0.w_perm_inv', 'module_list.0.subnet.0.weight', 'module_list.0.subnet.0.bias',
         'module_list.0.subnet.2.weight', 'module_list.0.subnet.2.bias',
         'module_list.1.global_scale', 'module_list.1.global_offset', 'module_list.1.w_perm',
         'module_list.1.w_perm_inv', 'module_list.1.subnet.0.weight', 'module_list.1.subnet.0.bias',
         'module_list.1.subnet.2.weight', 'module_list.1.subnet.2.bias'])
    path = tmp_path / 'original.pt'
    torch.save(original, path)
    proc = run_main(*COMMON, '--data-path', str(work / 'data'), '--output-dir', str(tmp_path),
                    '--action-type', 'norm-test', '--checkpoint', str(path), cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = _result(tmp_path, '_norm-test')
    assert res['last']['image_auroc'] == pytest.approx(_result(out)['last']['image_auroc'], abs=1e-6)
    assert res['last']['pixel_auroc'] == pytest.approx(_result(out)['last']['pixel_auroc'], abs=1e-6)
