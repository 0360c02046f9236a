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
    opt_ours = train.make_optimizer(ours, cfg.lr)
    opt_theirs = original_style.make_optimizer(theirs, cfg.lr)
    positions = train.PositionCache(cfg.condition_dim, torch.device('cpu'))
    losses_ours, losses_theirs = [], []
    for batch in range(3):
        feats = _features(batch)
        torch.manual_seed(100 + batch)
        total = 0.0
        for decoder, feat in zip(ours, feats):
            conds = condition_fibers(positions(feat.shape[2], feat.shape[3]), feat.shape[0])
            s, _ = train.train_layer_fibers(decoder, opt_ours, flatten_fibers(feat), conds, 256, cfg,
                                            torch.device('cpu'))
            total += s
        losses_ours.append(total)
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
        opt = train.make_optimizer(decoders, cfg.lr)
        feats = _features(0)
        positions = train.PositionCache(cfg.condition_dim, torch.device('cpu'))
        torch.manual_seed(0)
        conds = condition_fibers(positions(16, 16), 4)
        train.train_layer_fibers(decoders[0], opt, flatten_fibers(feats[0]), conds, 256, cfg, torch.device('cpu'))
        before = [p.detach().clone() for p in decoders[0].parameters()]
        conds = condition_fibers(positions(8, 8), 4)
        train.train_layer_fibers(decoders[1], opt, flatten_fibers(feats[1]), conds, 256, cfg, torch.device('cpu'))
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
