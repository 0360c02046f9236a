"""Training agrees with the original code's loop: same seed and data give the same loss curve and weights."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import train
from config import Config
from custom_models.flow import build_decoder, condition_fibers, flatten_fibers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))
import original_style  # noqa: E402

CHANNELS = (8, 16)


def _features(seed: int) -> list[torch.Tensor]:
    """Two scales of a 4-image batch: 1024 fibers (4 steps of 256) and 256 fibers (1 step)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, CHANNELS[0], 16, 16, generator=g), torch.randn(4, CHANNELS[1], 8, 8, generator=g)]


def _decoders(cfg: Config) -> list:
    torch.manual_seed(1)
    return [build_decoder(cfg.dec_arch, c, cfg.condition_dim, 2, cfg.clamp_alpha) for c in CHANNELS]


@pytest.mark.parametrize('adam_mode', ['paper', 'torch2'])
def test_fiber_training_follows_the_original_loop(adam_mode):
    cfg = Config(adam_mode=adam_mode, condition_dim=16, lr=1e-3)
    ours = _decoders(cfg)
    theirs = copy.deepcopy(ours)
    opt_ours = train.make_optimizer(ours, cfg.lr, adam_mode)
    opt_theirs = original_style.make_optimizer(theirs, cfg.lr)
    positions = train.PositionCache(cfg.condition_dim, torch.device('cpu'))
    losses_ours, losses_theirs = [], []
    for batch in range(3):
        feats = _features(batch)
        torch.manual_seed(100 + batch)
        total = 0.0
        for index, feat in enumerate(feats):
            conds = condition_fibers(positions(feat.shape[2], feat.shape[3]), feat.shape[0])
            s, _ = train.train_layer_fibers(ours, index, opt_ours, flatten_fibers(feat), conds, 256, cfg,
                                            torch.device('cpu'))
            total += s
        losses_ours.append(total)
        opt_ours.flush()
        torch.manual_seed(100 + batch)
        s, _ = original_style.train_batch(lambda _x, f=feats: f, theirs, opt_theirs, torch.zeros(1),
                                          cfg.condition_dim, torch.device('cpu'), set_to_none=adam_mode == 'torch2')
        losses_theirs.append(s)
    torch.testing.assert_close(torch.tensor(losses_ours), torch.tensor(losses_theirs), rtol=1e-5, atol=1e-5)
    for a, b in zip(ours, theirs):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert losses_ours[0] != losses_ours[-1]


def test_adam_modes_differ_once_a_decoder_is_idle():
    """Paper mode keeps moving the idle decoder on its Adam momentum; torch2 mode leaves it alone."""
    moved = {}
    for mode in ('paper', 'torch2'):
        cfg = Config(adam_mode=mode, condition_dim=16, lr=1e-3)
        decoders = _decoders(cfg)
        opt = train.make_optimizer(decoders, cfg.lr, mode)
        feats = _features(0)
        positions = train.PositionCache(cfg.condition_dim, torch.device('cpu'))
        torch.manual_seed(0)
        conds = condition_fibers(positions(16, 16), 4)
        train.train_layer_fibers(decoders, 0, opt, flatten_fibers(feats[0]), conds, 256, cfg, torch.device('cpu'))
        before = [p.detach().clone() for p in decoders[0].parameters()]
        conds = condition_fibers(positions(8, 8), 4)
        train.train_layer_fibers(decoders, 1, opt, flatten_fibers(feats[1]), conds, 256, cfg, torch.device('cpu'))
        opt.flush()
        moved[mode] = any(not torch.equal(a, b) for a, b in zip(before, decoders[0].parameters()))
    assert moved == {'paper': True, 'torch2': False}


def test_compiled_forward_is_built_once_per_encoder_and_drops_the_previous():
    """--compile keeps one encoder's compiled forward pass; the next encoder (the next class of
    --class-name all) replaces it, so the previous encoder can be freed."""
    import gc
    import weakref
    first, second = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(3, 4, 1)
    fns = train._compiled(first)
    assert fns['encoder'] is first and train._compiled(first)['encode'] is fns['encode']
    gone = weakref.ref(first)
    del first, fns
    assert train._compiled(second)['encoder'] is second
    gc.collect()
    assert gone() is None
    train._COMPILED.clear()


def test_cuda_graphs_option_and_the_training_step_it_selects(monkeypatch):
    """--cuda-graphs needs --compile (and the other checked options: --smooth-sigma, --scale-weights,
    --rotation-deg, --train-jitter); the training step is eager, compiled, or compiled in mode
    'reduce-overhead' with a new CUDA-graph step marked before every call; a change of mode recompiles."""
    from config import parse_config
    with pytest.raises(SystemExit):
        parse_config(['--cuda-graphs'])
    with pytest.raises(SystemExit):
        parse_config(['--smooth-sigma', '-1'])
    assert parse_config(['--smooth-sigma', '2.5']).smooth_sigma == 2.5
    for bad in (['1', '1'], ['0', '0', '0'], ['1', '-1', '0'], ['1', 'nan', '1'], ['1', 'inf', '1']):
        with pytest.raises(SystemExit):
            parse_config(['--scale-weights', *bad])
    assert parse_config(['--scale-weights', '1', '1', '0']).scale_weights == (1.0, 1.0, 0.0)
    assert parse_config(['-pl', '2', '--scale-weights', '2', '1']).scale_weights == (2.0, 1.0)
    assert parse_config([]).scale_weights is None
    for bad in ('-1', '181', 'nan'):
        with pytest.raises(SystemExit):
            parse_config(['--rotation-deg', bad])
    assert parse_config([]).rotation_deg == 5.0 and '_rot' not in parse_config([]).model_name
    no_rotation = parse_config(['--rotation-deg', '0', '--train-flips', 'hflip', '--feature-pool', '3'])
    assert no_rotation.rotation_deg == 0.0 and '_cb8_fp3_trhflip_rot0_inp256_' in no_rotation.model_name
    assert '_rot2.5_inp' in parse_config(['--rotation-deg', '2.5']).model_name
    for bad in ('-0.1', '1', 'nan'):
        with pytest.raises(SystemExit):
            parse_config(['--train-jitter', bad])
    jittered = parse_config(['--rotation-deg', '0', '--train-jitter', '0.3'])
    assert jittered.train_jitter == 0.3 and '_rot0_jit0.3_inp' in jittered.model_name
    assert '_jit' not in parse_config(['--train-jitter', '0']).model_name
    enc = torch.nn.Conv2d(3, 4, 1)
    assert train.training_step(parse_config([]), enc) is train.fiber_batch_losses
    plain = train.training_step(parse_config(['--compile']), enc)
    assert plain is train._compiled(enc)['step']
    assert train._compiled(enc, True)['step'] is not plain  # the other mode: compiled anew
    calls = []
    monkeypatch.setattr(train, '_compiled', lambda e, graphs=False: {'step': lambda *a: calls.append(('step', a))
                                                                     or 'losses'})
    monkeypatch.setattr(torch.compiler, 'cudagraph_mark_step_begin', lambda: calls.append('mark'))
    step = train.training_step(parse_config(['--compile', '--cuda-graphs']), enc)
    assert step('d', 'f', 'c') == 'losses' and step('d', 'g', 'c') == 'losses'
    assert calls == ['mark', ('step', ('d', 'f', 'c')), 'mark', ('step', ('d', 'g', 'c'))]
    train._COMPILED.clear()


def test_encoder_chunk_per_device():
    """Test-time encoder calls take 8 images on the CPU (memory) and 32 on a CUDA device (throughput)."""
    assert train.encoder_chunk(torch.device('cpu')) == train.TEST_ENCODER_CHUNK == 8
    assert train.encoder_chunk(torch.device('cuda')) == train.CUDA_ENCODER_CHUNK == 32


class _TwoScaleEncoder(torch.nn.Module):
    """A tiny random encoder with two scales (strides 2 and 4), channels CHANNELS."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = torch.nn.Conv2d(3, CHANNELS[0], 3, stride=2, padding=1)
        self.b = torch.nn.Conv2d(CHANNELS[0], CHANNELS[1], 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = torch.tanh(self.a(x))
        return [a, torch.tanh(self.b(a))]


def _grids(cfg: Config, images: torch.Tensor, encoder, decoders) -> list[torch.Tensor]:
    n = images.shape[0]
    data = torch.utils.data.TensorDataset(images, torch.zeros(n, dtype=torch.long), torch.zeros(n, 1, 16, 16),
                                          torch.ones(n, dtype=torch.bool))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    positions = train.PositionCache(cfg.condition_dim, torch.device('cpu'))
    with torch.no_grad():
        return train.infer_log_probs(cfg, encoder, decoders, loader, positions, torch.device('cpu'), False,
                                     'test').log_probs


@pytest.mark.parametrize('tta', ['hflip', 'flips'])
def test_tta_averages_the_grids_of_the_flipped_images(tta):
    """--tta equals scoring the flipped copies one by one, flipping their grids back and averaging."""
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    plain = Config(condition_dim=16, progress=False)
    encoder, decoders = _TwoScaleEncoder(), _decoders(plain)
    got = _grids(plain.replace(tta=tta), images, encoder, decoders)
    flips = train.TTA_FLIPS[tta]
    brute = [torch.zeros_like(g) for g in got]
    for dims in flips:
        for acc, g in zip(brute, _grids(plain, images.flip(dims) if dims else images, encoder, decoders)):
            acc += (g.flip(dims) if dims else g) / len(flips)
    for g, b in zip(got, brute):
        assert g.shape == (3, *b.shape[1:])
        torch.testing.assert_close(g, b, rtol=1e-5, atol=1e-5)
    none = _grids(plain, images, encoder, decoders)
    assert not torch.allclose(got[0], none[0], atol=1e-3)


@pytest.mark.parametrize('k', [1, 3, 5])
def test_feature_pool_is_the_mean_over_the_neighbourhood_inside_the_map(k):
    """pool_features against a loop over positions: the mean of the k x k window clipped to the map."""
    feat = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    got = train.pool_features([feat], k)[0]
    r = k // 2
    brute = torch.empty_like(feat)
    for y in range(5):
        for x in range(7):
            brute[:, :, y, x] = feat[:, :, max(0, y - r):y + r + 1, max(0, x - r):x + r + 1].mean(dim=(2, 3))
    assert got.shape == feat.shape
    torch.testing.assert_close(got, brute, rtol=1e-6, atol=1e-6)


def test_feature_pool_per_scale():
    """One K per scale pools each map with its own K (finest first); 1 leaves a map as it is."""
    feats = [torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    got = train.pool_features(feats, (1, 3, 5))
    assert got[0] is feats[0]
    for g, f, k in zip(got[1:], feats[1:], (3, 5)):
        torch.testing.assert_close(g, train.pool_features([f], k)[0])
    with pytest.raises(ValueError):
        train.pool_features(feats, (1, 3))


def test_feature_pool_options_and_checkpoint_check():
    """--feature-pool: one K or one per scale; equal Ks fold to one; a checkpoint is refused with other Ks."""
    import main
    from config import parse_config
    from utils.errors import UserError
    assert parse_config(['--feature-pool', '3']).feature_pool == 3
    assert parse_config(['--feature-pool', '3', '3', '3']).feature_pool == 3
    per_scale = parse_config(['--feature-pool', '1', '3', '3'])
    assert per_scale.feature_pool == (1, 3, 3)
    assert '_cb8_fp1-3-3_inp256_' in per_scale.model_name
    assert '_fp' not in parse_config(['--feature-pool', '1', '1', '1']).model_name
    for bad in (['2'], ['1', '3'], ['1', '3', '3', '3'], ['3', '0', '3']):
        with pytest.raises(SystemExit):
            parse_config(['--feature-pool', *bad])
    assert parse_config(['-pl', '2', '--feature-pool', '1', '3']).feature_pool == (1, 3)
    saved = {'config': {**per_scale.to_dict(), 'feature_pool': [1, 3, 3]}}  # as a list once saved
    main.check_checkpoint_config(per_scale, saved, 'model.pt')
    for other in (parse_config([]), parse_config(['--feature-pool', '3'])):
        with pytest.raises(UserError, match='pass --feature-pool 1 3 3$'):
            main.check_checkpoint_config(other, saved, 'model.pt')
    with pytest.raises(UserError, match='pass --feature-pool 1$'):
        main.check_checkpoint_config(per_scale, {'config': {'enc_arch': per_scale.enc_arch}}, 'old.pt')


def test_feature_pool_reaches_the_flows_in_training_and_testing():
    """--feature-pool changes the features the flows see, at test time and in training batches alike."""
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    plain = Config(condition_dim=16, progress=False)
    pooled = plain.replace(feature_pool=3)
    encoder, decoders = _TwoScaleEncoder(), _decoders(plain)
    raw = encoder(images)
    for got, want in zip(train.encode_batch(pooled, encoder, images, torch.device('cpu')),
                         train.pool_features(raw, 3)):
        torch.testing.assert_close(got, want)

    class Pooled(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return train.pool_features(encoder(x), 3)

    got = _grids(pooled, images, encoder, decoders)
    for g, want in zip(got, _grids(plain, images, Pooled(), decoders)):
        torch.testing.assert_close(g, want)
    assert not torch.allclose(got[0], _grids(plain, images, encoder, decoders)[0], atol=1e-3)


@pytest.mark.parametrize('score_norm,budget', [('test', 1 << 22), ('position', 1 << 22), ('test', 9)])
def test_measure_in_chunks_equals_whole_set_metrics(monkeypatch, score_norm, budget):
    """train.measure, one image per chunk (maps made twice), against metrics of the whole set's maps."""
    import numpy as np

    from utils import metrics, scoring
    from utils.visualize import f1_threshold
    rng = np.random.default_rng(3)
    n, size = 8, 32
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    types = ['good', 'good', 'good', 'cut', 'cut', 'hole', 'hole', 'good']
    masks = np.zeros((n, size, size), dtype=bool)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(2, 20, 2)
        masks[i, y:y + rng.integers(3, 10), x:x + rng.integers(3, 10)] = True
    masks[6] = False  # a defective image whose mask is empty
    valid = np.ones(n, dtype=bool)
    valid[[4, 5]] = False  # defective images without a mask
    log_probs = [torch.from_numpy(rng.normal(-1.0, 0.2, (n, size // s, size // s)).astype(np.float32))
                 for s in (8, 16)]
    log_probs[0][3, 1, 1] -= 2.0
    out = train.EvalOutput(log_probs=log_probs, labels=labels, masks=np.packbits(masks, axis=-1),
                           mask_valid=valid, loss=0.0, forward_s=1.0)
    np.testing.assert_array_equal(out.mask_chunk(2, 5), masks[2:5])
    reference = scoring.position_stats(log_probs) if score_norm == 'position' else None
    whole = train.score_map_chunks(score_norm, log_probs, size, reference)(0, n).numpy()
    monkeypatch.setattr(train, 'SCORING_CHUNK_PIXELS', 1)
    monkeypatch.setattr(scoring, 'UPSAMPLE_CHUNK_PIXELS', 1)
    monkeypatch.setattr(metrics, 'MAX_DEFECT_PIXELS', budget)
    maps = train.score_map_chunks(score_norm, log_probs, size, reference)
    got = train.measure(maps, out, size, types, pro=True, fpr_limit=0.3, cflow_thresholds=100)
    scores = whole.reshape(n, -1).max(axis=1)
    np.testing.assert_array_equal(got['scores'], scores)
    assert got['map_range'] == (float(whole.min()), float(whole.max()))
    assert got['pixel_threshold'] == f1_threshold(masks[valid], whole[valid])
    for name, sel in (('', np.ones(n, dtype=bool)), ('cut', labels == 0), ('hole', labels == 0)):
        values = got['metrics'] if name == '' else got['per_defect'][name]
        if name:
            sel = sel | (np.asarray(types) == name)
            assert values['n_images'] == types.count(name)
        assert values['image_auroc'] == pytest.approx(100 * metrics.image_auroc(labels[sel], scores[sel]))
        pixel_sel = sel & valid
        for key, expected in (('pixel_auroc', metrics.pixel_auroc(masks, whole, pixel_sel)),
                              ('aupro', metrics.aupro(masks, whole, pixel_sel)),
                              ('aupro_cflow', metrics.aupro_cflow(masks, whole, pixel_sel, num_thresholds=100))):
            assert values[key] == (None if expected is None else pytest.approx(100 * expected, abs=1e-9)), (name, key)
    assert got['per_defect']['hole']['pixel_auroc'] is None  # its only image with a mask has an empty one
    assert got['per_defect']['cut']['pixel_auroc'] is not None


@pytest.mark.parametrize('argv, expected', [([], (5.0, 0.0)), (['--rotation-deg', '0', '--train-jitter', '0.2'],
                                                                (0.0, 0.2))])
def test_augmentation_options_reach_the_training_set(monkeypatch, tmp_path, argv, expected):
    """main.py builds the training set with --rotation-deg (5 degrees, the paper's, unless given) and
    --train-jitter (none unless given)."""
    import main
    from config import parse_config
    seen = {}

    class Built(Exception):
        pass

    def fake_build(*args, **kwargs):
        seen.update(kwargs)
        raise Built

    monkeypatch.setattr(main, 'build_datasets', fake_build)
    cfg = parse_config(['--dataset', 'mvtec', '--class-name', 'widget', '-enc', 'efficientnet_lite0', '--no-cuda',
                        '--data-path', str(tmp_path), '--output-dir', str(tmp_path), *argv])
    with pytest.raises(Built):
        main.run_one(cfg)
    assert (seen['rotation_deg'], seen['train_jitter']) == expected
