"""Conditional normalizing-flow decoders of CFLOW-AD and the math around them.

Everything here is pure: no I/O, no configuration objects, no device policy.

Sign convention (as in FrEIA): a decoder maps a feature vector ``x`` to a latent ``z`` and returns
``log|det dz/dx|``; the log-likelihood of ``x`` is ``log N(z; 0, I) + log|det dz/dx|``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import Tensor, nn

DECODER_NAMES: tuple[str, ...] = ('freia-cflow', 'freia-flow')
CLAMP_ALPHA = 1.9
CONDITION_DIM = 128
LOG_2PI_HALF = 0.9189385332046727  # 0.5 * ln(2 * pi)


def positional_encoding_2d(condition_dim: int, height: int, width: int) -> Tensor:
    """2-D sinusoidal positional encoding over integer grid indices.

    The first half of the channels encodes the column index x, the second half the row index y;
    within each half, even channels hold ``sin(w_k * pos)`` and odd channels ``cos(w_k * pos)`` with
    ``w_k = 10000 ** (-2k / D)``, ``D = condition_dim / 2``.

    Returns:
        Tensor of shape (condition_dim, height, width), float32.
    """
    if condition_dim % 4 != 0:
        raise ValueError(f'condition_dim must be a multiple of 4, got {condition_dim}')
    half = condition_dim // 2
    freqs = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(10000.0) / half))
    xs = torch.arange(width, dtype=torch.float64)[:, None] * freqs  # (W, half/2)
    ys = torch.arange(height, dtype=torch.float64)[:, None] * freqs  # (H, half/2)
    pe = torch.zeros(condition_dim, height, width, dtype=torch.float64)
    pe[0:half:2] = torch.sin(xs).T[:, None, :]
    pe[1:half:2] = torch.cos(xs).T[:, None, :]
    pe[half::2] = torch.sin(ys).T[:, :, None]
    pe[half + 1::2] = torch.cos(ys).T[:, :, None]
    return pe.float()


def flatten_fibers(features: Tensor) -> Tensor:
    """Feature map (B, C, H, W) -> fibers (B*H*W, C) in (b, h, w) row-major order."""
    b, c, h, w = features.shape
    return features.permute(0, 2, 3, 1).reshape(b * h * w, c)


def condition_fibers(pos_enc: Tensor, batch: int) -> Tensor:
    """Positional encoding (P, H, W) -> conditions (batch*H*W, P), matching ``flatten_fibers``."""
    p, h, w = pos_enc.shape
    return pos_enc.permute(1, 2, 0).reshape(1, h * w, p).expand(batch, h * w, p).reshape(batch * h * w, p)


def log_likelihood(z: Tensor, log_jac_det: Tensor) -> Tensor:
    """Gaussian log-likelihood in nats, ``-C/2 ln 2pi - |z|^2 / 2 + log|det J|``, computed in float32.

    Args:
        z: (n, C) latent vectors.
        log_jac_det: (n,) log-determinants.
    Returns:
        (n,) log p(x).
    """
    z = z.float()
    return -z.shape[1] * LOG_2PI_HALF - 0.5 * torch.sum(z * z, dim=1) + log_jac_det.float()


def fiber_loss(log_prob_per_dim: Tensor) -> Tensor:
    """The paper's per-fiber loss ``-log sigmoid(log p / C)``; argument is ``log p / C``, shape (n,)."""
    return -F.logsigmoid(log_prob_per_dim)


def subnet_fc(dims_in: int, dims_out: int) -> nn.Module:
    """Coupling subnet: Linear(d, 2d) - ReLU - Linear(2d, d_out), PyTorch default init."""
    return nn.Sequential(nn.Linear(dims_in, 2 * dims_in), nn.ReLU(), nn.Linear(2 * dims_in, dims_out))


def build_decoder(kind: str, n_features: int, condition_dim: int = CONDITION_DIM,
                  coupling_blocks: int = 8, clamp_alpha: float = CLAMP_ALPHA) -> SequenceINN:
    """One decoder: ``coupling_blocks`` FrEIA ``AllInOneBlock``s on vectors of length ``n_features``.

    The soft permutation of every block is drawn from numpy's global RNG (seed it first).
    """
    if kind not in DECODER_NAMES:
        raise ValueError(f'unknown decoder {kind!r}; choose one of {", ".join(DECODER_NAMES)}')
    decoder = SequenceINN(n_features)
    for _ in range(coupling_blocks):
        kwargs = dict(subnet_constructor=subnet_fc, affine_clamping=clamp_alpha,
                      global_affine_type='SOFTPLUS', permute_soft=True)
        if kind == 'freia-cflow':
            decoder.append(AllInOneBlock, cond=0, cond_shape=(condition_dim,), **kwargs)
        else:
            decoder.append(AllInOneBlock, **kwargs)
    return decoder


def is_conditional(decoder: SequenceINN) -> bool:
    """Whether the decoder's blocks take the positional condition."""
    return bool(decoder.module_list[0].conditional)


def _finish_block(block: AllInOneBlock, x: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """The rest of one FrEIA 0.2 ``AllInOneBlock`` forward pass (soft permutation, SOFTPLUS, no GIN), given
    the pre-activation ``hidden`` of its subnet's first layer; returns the output and the float32
    log-determinant."""
    c1, c2 = block.splits
    _, relu, second = block.subnet
    a = second(relu(hidden)) * 0.1
    s = block.clamp * torch.tanh(a[:, :c2])
    y2 = x[:, c1:] * torch.exp(s) + a[:, c2:]
    scale = 0.1 * F.softplus(block.global_scale, beta=0.5)
    u = torch.cat([x[:, :c1], y2], 1) * scale.to(x.dtype) + block.global_offset.to(x.dtype)
    out = F.linear(u, block.w_perm.to(x.dtype))
    return out, s.float().sum(1) + torch.log(scale).sum()


def _block_forward(block: AllInOneBlock, x: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
    """The forward math of one FrEIA 0.2 ``AllInOneBlock``.

    Same arithmetic as ``block((x,), [c])`` with fewer intermediate tensors; the log-determinant is
    returned in float32.
    """
    x1 = x[:, :block.splits[0]]
    return _finish_block(block, x, block.subnet[0](torch.cat([x1, c], 1) if c is not None else x1))


def decoder_forward(decoder: SequenceINN, x: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
    """Run a decoder built by :func:`build_decoder` forward, x -> z.

    Numerically the same as ``decoder(x, [c])`` (``decoder(x)`` for unconditional decoders), with the
    log-determinant accumulated in float32 even under autocast.

    Args:
        x: (n, C) fibers.
        c: (n, P) conditions, or None for an unconditional decoder.
    Returns:
        z (n, C) and log|det dz/dx| (n,).
    """
    log_jac = x.new_zeros(x.shape[0], dtype=torch.float32)
    cond = c if is_conditional(decoder) else None
    for block in decoder.module_list:
        x, j = _block_forward(block, x, cond)
        log_jac = log_jac + j
    return x, log_jac


def fiber_log_prob(decoder: SequenceINN, x: Tensor, c: Tensor | None) -> Tensor:
    """Per-dimension log-likelihood ``log p(x) / C`` of fibers x (n, C); returns (n,) float32."""
    z, log_jac = decoder_forward(decoder, x, c)
    return log_likelihood(z, log_jac) / x.shape[1]


def condition_tables(decoder: SequenceINN, pos_enc: Tensor) -> list[Tensor] | None:
    """Per block, the condition's share of the subnet's first layer at every grid position.

    For inference only: ``Linear([x1, c]) = x1 W_x^T + (c W_c^T + b)``, and the bracket depends on the
    position alone, so it is computed once per grid instead of once per fiber.

    Args:
        pos_enc: (P, H, W) positional encoding of the grid.
    Returns:
        per block a (H*W, hidden) tensor, or None for an unconditional decoder.
    """
    if not is_conditional(decoder):
        return None
    conds = condition_fibers(pos_enc, 1)
    tables = []
    for block in decoder.module_list:
        first = block.subnet[0]
        c1 = block.splits[0]
        tables.append(F.linear(conds.to(first.weight.dtype), first.weight[:, c1:], first.bias))
    return tables


def grid_log_prob(decoder: SequenceINN, x: Tensor, tables: list[Tensor] | None) -> Tensor:
    """Per-dimension log-likelihood of whole feature grids, using :func:`condition_tables`.

    Args:
        x: (k*H*W, C) fibers of k complete images in (b, h, w) order.
        tables: the output of :func:`condition_tables` for this grid (or None if unconditional).
    Returns:
        (k*H*W,) float32 ``log p(x) / C``; equal to :func:`fiber_log_prob` up to float rounding.
    """
    if tables is None:
        return fiber_log_prob(decoder, x, None)
    n, width = x.shape
    log_jac = x.new_zeros(n, dtype=torch.float32)
    for block, table in zip(decoder.module_list, tables):
        first = block.subnet[0]
        hidden = F.linear(x[:, :block.splits[0]], first.weight[:, :block.splits[0]].to(x.dtype))
        hidden = (hidden.view(-1, table.shape[0], table.shape[1]) + table.to(hidden.dtype)).view(n, -1)
        x, j = _finish_block(block, x, hidden)
        log_jac = log_jac + j
    return log_likelihood(x, log_jac) / width


def decoder_state_layout(decoder: SequenceINN) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a decoder's state dict (the FrEIA 0.2 layout the original checkpoints use)."""
    return {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
