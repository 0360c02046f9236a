"""DecoderAdam: deferred zero-gradient steps equal PyTorch's Adam stepping every idle decoder at once."""
from __future__ import annotations

import copy

import pytest
import torch

from utils import optim
from utils.optim import IDLE_UNROLL, DecoderAdam, idle_adam_steps, idle_step_coefficients


def _modules() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)), torch.nn.Linear(4, 6),
            torch.nn.Linear(3, 2)]


# (decoder, learning rate) per step: decoder 2 starts late, runs longer than IDLE_UNROLL, rates change
SCHEDULE = ([(0, 1e-2)] * 5 + [(1, 1e-2)] * 3 + [(0, 5e-3)] * 21 + [(2, 5e-3)] * 2 + [(1, 2e-3)] * 40
            + [(0, 1e-3)] * 2)


def _grads(step: int, module: torch.nn.Module) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=g) for p in module.parameters()]


def _reference(modules: list[torch.nn.Module], set_to_none: bool) -> torch.optim.Adam:
    """Plain PyTorch Adam over all modules. ``set_to_none=False`` is PyTorch 1.8's loop: gradients are
    zeroed, not freed, so every decoder that has had a backward pass takes every step."""
    adam = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=1.0, fused=True)
    for step, (index, lr) in enumerate(SCHEDULE):
        adam.param_groups[0]['lr'] = lr
        adam.zero_grad(set_to_none=set_to_none)
        for p, g in zip(modules[index].parameters(), _grads(step, modules[index])):
            p.grad = g
        adam.step()
    return adam


def _ours(modules: list[torch.nn.Module], mode: str) -> DecoderAdam:
    opt = DecoderAdam(modules, 1.0, mode)
    for step, (index, lr) in enumerate(SCHEDULE):
        opt.param_groups[0]['lr'] = lr
        if step == 0 or SCHEDULE[step - 1][0] != index:
            opt.begin(index)
        for p, g in zip(modules[index].parameters(), _grads(step, modules[index])):
            p.grad = g
        opt.step(index)
    return opt


@pytest.mark.parametrize('compiled', [True, False])
def test_deferred_idle_steps_equal_stepping_every_idle_decoder(compiled, monkeypatch):
    if compiled:
        assert optim.compiled_idle_kernel(torch.device('cpu')) is not None, 'the idle-step kernel compiles here'
    else:  # the fallback: replay through torch's Adam
        monkeypatch.setitem(optim._KERNELS, 'cpu', None)
    base = _modules()
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    adam = _reference(theirs, set_to_none=False)
    opt = _ours(ours, 'paper')
    assert any(opt.pending), 'the schedule must leave idle steps pending'
    state = opt.state_dict()  # applies what is pending
    assert not any(opt.pending)
    for a, b in zip(theirs, ours):
        for p, q in zip(a.parameters(), b.parameters()):
            tol = dict(rtol=1e-6, atol=1e-7) if compiled else dict(rtol=0, atol=0)  # replay: the same arithmetic
            torch.testing.assert_close(q, p, **tol)
            torch.testing.assert_close(opt.adam.state[q]['exp_avg'], adam.state[p]['exp_avg'], **tol)
            torch.testing.assert_close(opt.adam.state[q]['exp_avg_sq'], adam.state[p]['exp_avg_sq'], **tol)
            assert int(opt.adam.state[q]['step']) == int(adam.state[p]['step'])
    assert [int(s['step']) for s in state['state'].values()] == [int(adam.state[p]['step'])
                                                                 for m in theirs for p in m.parameters()]
    moved = [not torch.equal(p, q) for p, q in zip(base[2].parameters(), ours[2].parameters())]
    assert all(moved)


def test_torch2_mode_leaves_idle_decoders_alone():
    base = _modules()
    ours = copy.deepcopy(base)
    opt = _ours(ours, 'torch2')
    assert not any(opt.pending)
    _reference(base, set_to_none=True)
    for a, b in zip(base, ours):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)


def test_idle_adam_steps_brute_force_and_padding():
    g = torch.Generator().manual_seed(1)
    p, m, v = torch.randn(50, generator=g), torch.randn(50, generator=g) * 1e-2, torch.rand(50, generator=g) * 1e-4
    lrs = [1e-2, 5e-3, 5e-3]
    coefs = idle_step_coefficients(lrs, 4, (0.9, 0.999))
    assert coefs.shape == (1, 4, IDLE_UNROLL)
    got = [p.double(), m.double(), v.double()]
    idle_adam_steps(*got, coefs[0].double(), 1e-8)
    bp, bm, bv = p.double(), m.double(), v.double()
    for j, lr in enumerate(lrs):
        t = 4 + j
        bm = 0.9 * bm
        bv = 0.999 * bv
        bp = bp - lr / (1 - 0.9 ** t) * bm / (bv.sqrt() / (1 - 0.999 ** t) ** 0.5 + 1e-8)
    for a, b in zip(got, (bp, bm, bv)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)  # coefficients are float32
    still = [p.clone(), m.clone(), v.clone()]
    idle_adam_steps(*still, idle_step_coefficients([], 1, (0.9, 0.999))[0], 1e-8)
    assert all(torch.equal(a, b) for a, b in zip(still, (p, m, v)))
