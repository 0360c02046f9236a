"""Pure math of CFLOW-AD: positional encoding, likelihood, loss, LR schedule, decoders, scoring."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from custom_models.flow import (build_decoder, condition_fibers, decoder_forward, fiber_log_prob, fiber_loss,
                                flatten_fibers, log_likelihood, positional_encoding_2d)
from utils.checkpoint import describe_decoder_state
from utils.schedule import cosine_lr, learning_rate
from utils.scoring import (STD_FLOOR, anomaly_maps, image_scores, position_maps, position_stats, scale_weights,
                           smooth_maps, smoothed_map_chunks)


def test_positional_encoding_layout():
    pe = positional_encoding_2d(8, 3, 5)
    assert pe.shape == (8, 3, 5)
    # D = 4 channels per axis; frequencies 1 and 10000 ** (-2/4) = 0.01
    for y in range(3):
        for x in range(5):
            expect = [math.sin(x), math.cos(x), math.sin(0.01 * x), math.cos(0.01 * x),
                      math.sin(y), math.cos(y), math.sin(0.01 * y), math.cos(0.01 * y)]
            assert torch.allclose(pe[:, y, x], torch.tensor(expect, dtype=torch.float32), atol=1e-6)


def test_positional_encoding_rejects_bad_size():
    with pytest.raises(ValueError, match='multiple of 4'):
        positional_encoding_2d(6, 2, 2)


def test_positional_encoding_128_frequencies():
    pe = positional_encoding_2d(128, 1, 2)
    # column x=1: channel 2k holds sin(10000 ** (-2k / 64))
    k = torch.arange(32, dtype=torch.float64)
    assert torch.allclose(pe[0:64:2, 0, 1].double(), torch.sin(10000.0 ** (-2 * k / 64)), atol=1e-6)


def test_fiber_order_matches_conditions():
    feat = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    fibers = flatten_fibers(feat)
    assert fibers.shape == (16, 3)
    assert torch.equal(fibers[1 * 8 + 1 * 4 + 2], feat[1, :, 1, 2])  # (b, h, w) row-major
    pe = positional_encoding_2d(4, 2, 4)
    conds = condition_fibers(pe, 2)
    assert torch.equal(conds[1 * 8 + 1 * 4 + 2], pe[:, 1, 2])


def test_log_likelihood_constant():
    z = torch.zeros(3, 4)
    lp = log_likelihood(z, torch.zeros(3))
    assert torch.allclose(lp, torch.full((3,), -4 * 0.5 * math.log(2 * math.pi)), atol=1e-6)
    z = torch.randn(5, 7)
    normal = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    assert torch.allclose(log_likelihood(z, torch.full((5,), 0.5)), normal + 0.5, atol=1e-5)


def test_loss_is_minus_logsigmoid():
    x = torch.tensor([-3.0, 0.0, 2.0])
    assert torch.allclose(fiber_loss(x), torch.log1p(torch.exp(-x)), atol=1e-6)
    assert fiber_loss(torch.tensor([0.0])).item() == pytest.approx(math.log(2))


def test_lr_schedule_table():
    # ORIGINAL.md §4.4 table, lr 2e-4, 25 meta-epochs
    table = {2: 1.969e-4, 3: 1.930e-4, 8: 1.536e-4, 12: 1.064e-4, 13: 9.38e-5, 20: 1.93e-5, 24: 9.9e-7}
    for e, value in table.items():
        assert cosine_lr(2e-4, e, 25) == pytest.approx(value, rel=3e-3)
        assert learning_rate(2e-4, e, 5, 40, 25) == pytest.approx(value, rel=3e-3)
    assert learning_rate(2e-4, 0, 0, 40, 25) == pytest.approx(2e-5)
    warm_to = 2e-7 + (2e-4 - 2e-7) * (1 + math.cos(math.pi * 2 / 25)) / 2
    assert warm_to == pytest.approx(1.96861e-4, rel=1e-5)
    assert learning_rate(2e-4, 1, 39, 40, 25) == pytest.approx(2e-5 + 79 / 80 * (warm_to - 2e-5))
    assert learning_rate(2e-4, 1, 0, 40, 25) == pytest.approx(2e-5 + 0.5 * (warm_to - 2e-5))


def _decoder(kind='freia-cflow', width=6, cond=8, blocks=3, seed=0):
    torch.manual_seed(seed)
    np.random.seed(seed)
    return build_decoder(kind, width, cond, blocks).double()


def test_decoder_matches_freia_and_inverts():
    dec = _decoder()
    x = torch.randn(10, 6, dtype=torch.float64)
    c = torch.randn(10, 8, dtype=torch.float64)
    z, logdet = decoder_forward(dec, x, c)
    z_ref, logdet_ref = dec(x, [c])
    assert torch.allclose(z, z_ref, atol=1e-12) and torch.allclose(logdet.double(), logdet_ref, atol=1e-5)
    x_back, logdet_rev = dec(z_ref, [c], rev=True)
    assert torch.allclose(x_back, x, atol=1e-5)
    assert torch.allclose(logdet_ref + logdet_rev, torch.zeros(10, dtype=torch.float64), atol=1e-5)


def test_decoder_logdet_matches_autograd_jacobian():
    dec = _decoder(width=4, cond=4, blocks=2)
    x = torch.randn(4, dtype=torch.float64)
    c = torch.randn(1, 4, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: dec(v[None], [c])[0][0], x)
    _, logdet = dec(x[None], [c])
    assert torch.linalg.slogdet(jac)[1].item() == pytest.approx(logdet.item(), abs=1e-6)


def test_decoder_structure_and_clamp():
    torch.manual_seed(0)
    np.random.seed(0)
    dec = build_decoder('freia-cflow', 10, 128, 8)
    block = dec.module_list[0]
    assert len(dec.module_list) == 8 and block.clamp == 1.9
    # hidden width C1 + P doubled: (5 + 128) * 2
    assert block.subnet[0].weight.shape == (266, 133) and block.subnet[2].weight.shape == (10, 266)
    scale = 0.1 * F.softplus(block.global_scale, beta=0.5)
    assert torch.allclose(scale, torch.ones_like(scale), atol=1e-5)
    w = block.w_perm.detach().double()
    assert torch.allclose(w @ w.T, torch.eye(10, dtype=torch.float64), atol=1e-5)
    assert torch.linalg.det(w).item() == pytest.approx(1.0, abs=1e-4)
    assert describe_decoder_state(dec.state_dict()) == (10, 8, 128)
    assert describe_decoder_state(build_decoder('freia-flow', 10, 128, 2).state_dict()) == (10, 2, 0)


def test_old_freia_clamp_formula():
    """s = 1.9 * tanh(0.1 * raw): the FrEIA 0.2 clamp the paper used."""
    dec = _decoder(width=2, cond=4, blocks=1)
    block = dec.module_list[0]
    x = torch.randn(3, 2, dtype=torch.float64)
    c = torch.randn(3, 4, dtype=torch.float64)
    raw = block.subnet(torch.cat([x[:, :1], c], 1))
    s = 1.9 * torch.tanh(0.1 * raw[:, :1])
    _, logdet = dec(x, [c])
    scale = 0.1 * F.softplus(block.global_scale, beta=0.5)
    assert torch.allclose(logdet, s[:, 0] + torch.log(scale).sum(), atol=1e-10)


def test_unconditional_decoder_ignores_condition():
    dec = _decoder('freia-flow')
    x = torch.randn(4, 6, dtype=torch.float64)
    a = fiber_log_prob(dec, x, torch.randn(4, 8, dtype=torch.float64))
    b = fiber_log_prob(dec, x, None)
    assert torch.allclose(a, b)


def test_anomaly_maps_brute_force():
    torch.manual_seed(0)
    lps = [torch.randn(3, 4, 4), torch.randn(3, 2, 2)]
    maps = anomaly_maps(lps, 8)
    ref = torch.zeros(3, 8, 8, dtype=torch.float64)
    for lp in lps:
        q = torch.exp(lp.double() - lp.max().double())[:, None]
        ref += F.interpolate(q, size=(8, 8), mode='bilinear', align_corners=True)[:, 0]
    ref = ref.max() - ref
    assert torch.allclose(maps.double(), ref, atol=1e-6)
    assert torch.allclose(image_scores(maps), maps.flatten(1).max(1).values)
    assert maps.min() == pytest.approx(0.0, abs=1e-6)


def test_anomaly_maps_train_norm_is_per_image():
    torch.manual_seed(0)
    lps = [torch.randn(4, 4, 4), torch.randn(4, 2, 2)]
    maxima = [3.0, 2.5]
    full = anomaly_maps(lps, 8, maxima)
    single = anomaly_maps([lp[2:3] for lp in lps], 8, maxima)
    assert torch.allclose(full[2:3], single)
    # test-set normalisation depends on the other images
    assert not torch.allclose(anomaly_maps(lps, 8)[2:3], anomaly_maps([lp[2:3] for lp in lps], 8))


def test_position_stats_against_numpy():
    rng = np.random.default_rng(0)
    lp = rng.normal(size=(5, 3, 4)).astype(np.float32)
    lp[:, 0, 0] = 1.5  # no spread at one position: the floor applies
    (mean, std), = position_stats([torch.from_numpy(lp)])
    assert np.allclose(mean.numpy(), lp.mean(axis=0), atol=1e-6)
    expected = np.maximum(lp.std(axis=0, ddof=0), STD_FLOOR)
    assert np.allclose(std.numpy(), expected, atol=1e-6)
    assert std[0, 0] == pytest.approx(STD_FLOOR)


def test_position_maps_brute_force_and_per_image():
    rng = np.random.default_rng(1)
    train = [rng.normal(size=(6, 4, 4)), rng.normal(size=(6, 2, 2))]
    test = [rng.normal(size=(3, 4, 4)), rng.normal(size=(3, 2, 2))]
    stats = position_stats([torch.from_numpy(t).float() for t in train])
    maps = position_maps([torch.from_numpy(t).float() for t in test], stats, 8)
    ref = np.zeros((3, 8, 8))
    for tr_l, te_l in zip(train, test):
        z = (tr_l.mean(axis=0) - te_l) / np.maximum(tr_l.std(axis=0), STD_FLOOR)
        for i in range(3):  # one image at a time
            ref[i] += F.interpolate(torch.from_numpy(z[i])[None, None], size=(8, 8), mode='bilinear',
                                    align_corners=True)[0, 0].numpy()
    assert np.allclose(maps.numpy(), ref, atol=1e-4)
    single = position_maps([torch.from_numpy(t[1:2]).float() for t in test], stats, 8)
    assert torch.allclose(single, maps[1:2])
    # a position that is less likely than usual scores higher
    shifted = [torch.from_numpy(t).float().clone() for t in test]
    shifted[0][0, 1, 1] -= 10.0
    assert position_maps(shifted, stats, 8)[0].max() > maps[0].max()
    with pytest.raises(ValueError):
        position_maps([torch.zeros(1, 3, 3), torch.zeros(1, 2, 2)], stats, 8)


def test_scale_weights_weight_the_sum_over_scales():
    """Weighted maps are the weighted sums of the single-scale maps; a zero weight leaves a scale out."""
    torch.manual_seed(2)
    lps = [torch.randn(4, 8, 8), torch.randn(4, 4, 4), torch.randn(4, 2, 2)]
    stats = position_stats([lp + 0.1 * torch.randn_like(lp) for lp in lps])
    w = (2.0, 0.5, 0.0)
    single = [position_maps([lp], [st], 16) for lp, st in zip(lps, stats)]
    assert torch.allclose(position_maps(lps, stats, 16, weights=w), 2.0 * single[0] + 0.5 * single[1], atol=1e-5)
    assert torch.equal(position_maps(lps, stats, 16, weights=(1, 1, 1)), position_maps(lps, stats, 16))
    # training maxima: A = sum_l w_l - sum_l w_l q_l, each q_l = exp(lp_l - m_l) upsampled
    maxima = [float(lp.max()) + 0.5 for lp in lps]
    q = [1.0 - anomaly_maps([lp], 16, [m]) for lp, m in zip(lps, maxima)]
    expected = 2.5 - (2.0 * q[0] + 0.5 * q[1])
    assert torch.allclose(anomaly_maps(lps, 16, maxima, weights=w), expected, atol=1e-5)
    # test-set maxima: the offset is the largest weighted score over the set
    tested = anomaly_maps(lps, 16, weights=w)
    assert float(tested.min()) == pytest.approx(0.0, abs=1e-6)
    assert scale_weights(None, 3) == (1.0, 1.0, 1.0)
    for bad in ((1, 1), (0, 0, 0), (1, -1, 1), (1, float('nan'), 1), (1, float('inf'), 1)):
        with pytest.raises(ValueError):
            scale_weights(bad, 3)


def test_score_map_chunks_dispatch_and_ranges():
    from train import score_map_chunks
    torch.manual_seed(0)
    lps = [torch.randn(5, 4, 4), torch.randn(5, 2, 2)]
    stats = position_stats(lps)
    for norm, ref, whole in (('test', None, anomaly_maps(lps, 8)),
                             ('train', [1.0, 2.0], anomaly_maps(lps, 8, [1.0, 2.0])),
                             ('position', stats, position_maps(lps, stats, 8))):
        maps = score_map_chunks(norm, lps, 8, ref)
        assert torch.equal(maps(0, 5), whole)
        # any range gives the same maps as the whole set (the test-set offset is the whole set's)
        assert torch.equal(torch.cat([maps(0, 2), maps(2, 3), maps(3, 5)]), whole)
    with pytest.raises(ValueError):
        score_map_chunks('position', lps, 8, None)
    for norm, ref, whole in (('test', None, anomaly_maps(lps, 8, weights=(1, 0))),
                             ('train', [1.0, 2.0], anomaly_maps(lps, 8, [1.0, 2.0], weights=(1, 0))),
                             ('position', stats, position_maps(lps, stats, 8, weights=(1, 0)))):
        assert torch.equal(score_map_chunks(norm, lps, 8, ref, (1, 0))(0, 5), whole)


def _mirror_smooth_brute_force(m: np.ndarray, sigma: float, radius_h: int, radius_w: int) -> np.ndarray:
    """Gaussian smoothing by explicit sums: weights exp(-d^2 / 2 sigma^2) over |d| <= radius, normalised, with
    mirrored indices (-1 -> 1, H -> H - 2), rows then columns."""
    def along(a: np.ndarray, radius: int, axis: int) -> np.ndarray:
        n = a.shape[axis]
        w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        w /= w.sum()
        out = np.zeros_like(a)
        for i in range(n):
            for d, wd in zip(range(-radius, radius + 1), w):
                j = i + d
                j = -j if j < 0 else 2 * (n - 1) - j if j >= n else j
                if axis == 0:
                    out[i] += wd * a[j]
                else:
                    out[:, i] += wd * a[:, j]
        return out
    return along(along(m.astype(np.float64), radius_w, 1), radius_h, 0)


@pytest.mark.parametrize('sigma', [0.5, 1.0, 2.5, 6.0])
def test_smooth_maps_brute_force(sigma):
    torch.manual_seed(0)
    maps = torch.rand(3, 11, 14)
    got = smooth_maps(maps, sigma)
    assert got.dtype == maps.dtype and got.shape == maps.shape
    for m, g in zip(maps, got):
        # the radius is round(4 sigma), at most one less than the side (sigma 6: 10 rows, 13 columns)
        rh, rw = (min(int(4 * sigma + 0.5), n - 1) for n in m.shape)
        assert np.allclose(g.numpy(), _mirror_smooth_brute_force(m.numpy(), sigma, rh, rw), atol=1e-6)
    # a constant map stays constant; sigma 0 is the identity; the maximum does not grow
    assert torch.allclose(smooth_maps(torch.full((1, 9, 9), 3.0), 2.0), torch.full((1, 9, 9), 3.0))
    assert torch.equal(smooth_maps(maps, 0.0), maps)
    assert float(got.max()) <= float(maps.max()) + 1e-6


def test_smoothed_map_chunks_equal_whole_set():
    torch.manual_seed(1)
    lps = [torch.randn(5, 4, 4), torch.randn(5, 2, 2)]
    whole = anomaly_maps(lps, 16)
    chunks = smoothed_map_chunks(lambda a, b: anomaly_maps(lps, 16)[a:b], 2.0)
    assert torch.allclose(torch.cat([chunks(0, 2), chunks(2, 5)]), smooth_maps(whole, 2.0))
    assert not torch.allclose(chunks(0, 5), whole)
    plain = lambda a, b: whole[a:b]  # noqa: E731
    assert smoothed_map_chunks(plain, 0.0) is plain


def test_grid_inference_equals_fiber_by_fiber():
    from custom_models.flow import condition_tables, grid_log_prob
    torch.manual_seed(1)
    np.random.seed(1)
    dec = build_decoder('freia-cflow', 12, 8, 3)
    feat = torch.randn(3, 12, 4, 5)
    pe = positional_encoding_2d(8, 4, 5)
    fibers, conds = flatten_fibers(feat), condition_fibers(pe, 3)
    ref = torch.cat([fiber_log_prob(dec, fibers[i:i + 1], conds[i:i + 1]) for i in range(fibers.shape[0])])
    fast = grid_log_prob(dec, fibers, condition_tables(dec, pe))
    assert torch.allclose(fast, ref, atol=1e-5)
    freia_z, freia_j = dec(fibers, [conds])
    assert torch.allclose(fast, log_likelihood(freia_z, freia_j) / 12, atol=1e-5)
    unconditional = build_decoder('freia-flow', 12, 8, 2)
    assert condition_tables(unconditional, pe) is None
    assert torch.allclose(grid_log_prob(unconditional, fibers, None), fiber_log_prob(unconditional, fibers, None))
