"""Adam over the decoders of all scales, stepping one decoder at a time.

The training loop takes Adam steps on one decoder's fibers at a time, with one Adam over all decoders, as
the paper's code does. With ``--adam-mode paper`` (PyTorch 1.8's ``zero_grad``, which zeroes gradients
rather than freeing them) every step also moves each idle decoder that has trained before: its gradient is
zero, so its moments decay and its weights follow them,

    m <- beta1 m,   v <- beta2 v,   w <- w - lr_t / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps),

one pass over every idle weight per step. :class:`DecoderAdam` defers these zero-gradient steps and applies
a decoder's pending ones just before it trains again (and at the end of each sub-epoch) with
:func:`idle_adam_steps`, ``IDLE_UNROLL`` steps per pass over its weights: the same updates in the same
order, as each weight's updates depend only on its own state, up to float rounding. Where the compiled
kernel is unavailable, the pending steps are replayed through the Adam itself, one pass each.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

IDLE_UNROLL = 16  # zero-gradient steps per pass of idle_adam_steps


def idle_adam_steps(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, coefs: Tensor, eps: float) -> None:
    """``coefs.shape[1]`` zero-gradient Adam steps on one weight tensor and its moments, in place.

    ``coefs`` rows, per step j: the step size ``lr_j / (1 - beta1^t_j)``, ``sqrt(1 - beta2^t_j)``, and the
    multipliers of the first and second moments (beta1, beta2). A step with step size 0 and multipliers 1
    changes nothing (padding).
    """
    p, m, v = param, exp_avg, exp_avg_sq
    for j in range(coefs.shape[1]):
        m = m * coefs[2, j]
        v = v * coefs[3, j]
        p = p - coefs[0, j] * m / (v.sqrt() / coefs[1, j] + eps)
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def idle_step_coefficients(lrs: list[float], first_step: int, betas: tuple[float, float],
                           unroll: int = IDLE_UNROLL) -> Tensor:
    """(ceil(k / unroll), 4, unroll) float32 ``coefs`` for :func:`idle_adam_steps` of the k = len(lrs) steps
    numbered ``first_step``, ``first_step + 1``, ... (Adam's step counter, from 1), padded with no-op steps.
    Step size and bias correction are computed in float64 as torch's Adam does."""
    beta1, beta2 = betas
    k = len(lrs)
    chunks = max(1, math.ceil(k / unroll))
    coefs = torch.zeros(chunks * unroll, 4, dtype=torch.float64)
    coefs[:, 1:] = 1.0
    for j, lr in enumerate(lrs):
        t = first_step + j
        coefs[j, 0] = lr / (1 - beta1 ** t)
        coefs[j, 1] = math.sqrt(1 - beta2 ** t)
        coefs[j, 2] = beta1
        coefs[j, 3] = beta2
    return coefs.view(chunks, unroll, 4).transpose(1, 2).contiguous().float()


_KERNELS: dict[str, Callable | None] = {}  # compiled idle_adam_steps per device type; None where compiling failed


def _no_op(kernel: Callable, device: torch.device) -> None:
    """Run ``kernel`` on padding only (changes nothing), compiling it if it is not compiled yet."""
    log = logging.getLogger('torch.utils.cpp_extension')  # warns of a missing CUDA runtime on CPU hosts
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            z = torch.zeros(8, device=device)
            kernel(z, z.clone(), z.clone(), idle_step_coefficients([], 1, (0.9, 0.999)).to(device)[0], 1e-8)
    finally:
        log.setLevel(level)


def compiled_idle_kernel(device: torch.device) -> Callable | None:
    """:func:`idle_adam_steps` compiled for ``device`` (tried once per process), or None where that fails."""
    if device.type not in _KERNELS:
        kernel = torch.compile(idle_adam_steps, dynamic=True)
        try:
            _no_op(kernel, device)
            _KERNELS[device.type] = kernel
        except Exception:  # noqa: BLE001 - no compiler toolchain or an unsupported device: replay instead
            _KERNELS[device.type] = None
    return _KERNELS[device.type]


def warm_idle_kernel(device: torch.device) -> None:
    """Compile the idle-step kernel for ``device`` now, or again after ``torch._dynamo.reset()`` (which
    ``train.compile_model`` calls for a new encoder) dropped its compiled code."""
    if _KERNELS.get(device.type) is not None:
        _no_op(_KERNELS[device.type], device)
    else:
        compiled_idle_kernel(device)


class DecoderAdam:
    """One ``torch.optim.Adam`` over all decoders' trainable weights (its ``state_dict`` is what checkpoints
    hold), stepped one decoder at a time.

    ``adam_mode``: ``'paper'`` moves idle decoders on their momentum (deferred, see the module docstring);
    ``'torch2'`` leaves them alone (PyTorch 2's ``zero_grad`` frees gradients, so Adam skips them).
    """

    def __init__(self, decoders: Iterable[nn.Module], lr: float, adam_mode: str = 'paper') -> None:
        if adam_mode not in ('paper', 'torch2'):
            raise ValueError(f'unknown adam_mode {adam_mode!r}')
        self.weights = [[p for p in d.parameters() if p.requires_grad] for d in decoders]
        params = [p for ws in self.weights for p in ws]
        try:  # the fused implementation: the same update rule in one kernel instead of one per operation
            self.adam = torch.optim.Adam(params, lr=lr, fused=True)
        except (RuntimeError, ValueError):
            self.adam = torch.optim.Adam(params, lr=lr)
        self.paper = adam_mode == 'paper'
        self.pending: list[list[float]] = [[] for _ in self.weights]  # learning rates of deferred idle steps

    @property
    def param_groups(self) -> list[dict]:
        return self.adam.param_groups

    def state_dict(self) -> dict:
        self.flush()
        return self.adam.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pending = [[] for _ in self.weights]
        self.adam.load_state_dict(state)

    def prepare(self) -> None:
        """In paper mode, compile the idle-step kernel now rather than in the first meta-epoch (call it after
        ``train.compile_model``, which resets torch's compiled code for a new encoder)."""
        weights = [p for ws in self.weights for p in ws]
        if self.paper and weights:
            warm_idle_kernel(weights[0].device)

    def begin(self, decoder: int) -> None:
        """Bring decoder ``decoder`` up to date before it trains."""
        self._apply_pending(decoder)

    def step(self, decoder: int) -> None:
        """One Adam step of ``decoder`` from its gradients, which are then freed (call :meth:`begin` before
        a decoder's first step of a pass: its pending idle steps must come first)."""
        self.adam.step()
        for p in self.weights[decoder]:  # the other decoders' gradients are None already
            p.grad = None
        if self.paper:
            lr = self.adam.param_groups[0]['lr']
            for other, ws in enumerate(self.weights):
                if other != decoder and ws and ws[0] in self.adam.state:  # it has trained before
                    self.pending[other].append(lr)

    def flush(self) -> None:
        """Apply every pending idle step (before evaluating or saving)."""
        for decoder in range(len(self.weights)):
            self._apply_pending(decoder)

    def _apply_pending(self, decoder: int) -> None:
        lrs = self.pending[decoder]
        if not lrs:
            return
        self.pending[decoder] = []
        group = self.adam.param_groups[0]
        if group['weight_decay'] or group['amsgrad'] or group['maximize']:
            raise ValueError('DecoderAdam defers plain Adam steps only')
        weights = [p for p in self.weights[decoder] if p in self.adam.state]
        kernel = compiled_idle_kernel(weights[0].device) if weights else None
        if kernel is None:
            self._replay(weights, lrs)
            return
        by_step: dict[int, list[Tensor]] = {}
        for p in weights:
            by_step.setdefault(int(self.adam.state[p]['step']), []).append(p)
        with torch.no_grad():
            for step, ps in by_step.items():
                coefs = idle_step_coefficients(lrs, step + 1, group['betas']).to(ps[0].device)
                for chunk in coefs:
                    for p in ps:
                        st = self.adam.state[p]
                        kernel(p.detach().view(-1), st['exp_avg'].view(-1), st['exp_avg_sq'].view(-1), chunk,
                               group['eps'])
                for p in ps:
                    self.adam.state[p]['step'] += len(lrs)

    def _replay(self, weights: list[Tensor], lrs: list[float]) -> None:
        """The pending steps through the Adam itself: zero gradients on ``weights`` only, one step per rate."""
        group = self.adam.param_groups[0]
        lr = group['lr']
        self.adam.zero_grad(set_to_none=True)
        for p in weights:
            p.grad = torch.zeros_like(p)
        for rate in lrs:
            group['lr'] = rate
            self.adam.step()
        group['lr'] = lr
        self.adam.zero_grad(set_to_none=True)
