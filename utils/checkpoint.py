"""Checkpoint files in the original CFLOW-AD layout, plus what resuming and re-evaluating need.

A checkpoint is a dict with ``encoder_state_dict`` (the encoder's state dict) and ``decoder_state_dict``
(a list of FrEIA 0.2 ``SequenceINN`` state dicts, one per scale, finest first), exactly as the original
writes them. Files written here add ``config``, ``epoch``, ``history``, ``optimizer_state_dict``,
``rng_state`` and, for ``--score-norm train`` or ``position``, the training images' statistics
(``score_maxima`` or ``score_position_stats``); the original code ignores extra keys, and this code reads
files without them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from FrEIA.framework import SequenceINN

from utils.errors import UserError
from utils.io import atomic_write_bytes

FORMAT_TAG = 'cflow-ad-checkpoint-v1'


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write a checkpoint atomically (an interrupted write leaves the previous file intact)."""
    atomic_write_bytes(path, lambda f: torch.save({**payload, 'format': FORMAT_TAG}, f))


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint onto the CPU; raise UserError if it is missing or not a CFLOW-AD checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'checkpoint {path} does not exist; pass the .pt file written by a training run '
                        'with --checkpoint')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
        raise UserError(f'cannot read checkpoint {path} ({type(exc).__name__}: {str(exc).splitlines()[0]}); '
                        'is it a file written by torch.save?') from None
    if not isinstance(ckpt, dict) or 'decoder_state_dict' not in ckpt or 'encoder_state_dict' not in ckpt:
        raise UserError(f'{path} is not a CFLOW-AD checkpoint: it needs the keys encoder_state_dict and '
                        'decoder_state_dict')
    return ckpt


def describe_decoder_state(sd: dict) -> tuple[int, int, int]:
    """(width C, coupling blocks K, condition size P; 0 if unconditional) of a FrEIA decoder state dict."""
    blocks = {int(k.split('.')[1]) for k in sd if k.startswith('module_list.')}
    if not blocks or 'module_list.0.w_perm' not in sd:
        raise UserError('a decoder in the checkpoint is not a FrEIA AllInOneBlock sequence with soft '
                        'permutation (no module_list.0.w_perm)')
    width = int(sd['module_list.0.w_perm'].shape[0])
    passive = width - width // 2
    cond = int(sd['module_list.0.subnet.0.weight'].shape[1]) - passive
    return width, len(blocks), cond


def load_decoders(decoders: list[SequenceINN], states: list[dict], source: str) -> None:
    """Load decoder state dicts strictly, after checking their number, widths, K and condition size."""
    if not isinstance(states, (list, tuple)):
        raise UserError(f'{source}: decoder_state_dict must be a list of state dicts, one per scale')
    expected = [describe_decoder_state(d.state_dict()) for d in decoders]
    found = [describe_decoder_state(s) for s in states]
    if expected != found:
        def fmt(items):
            return ', '.join(f'C={w} K={k} P={p}' for w, k, p in items)
        raise UserError(f'{source} holds decoders [{fmt(found)}] but this run builds [{fmt(expected)}]; '
                        'pass the -enc, -dec, -pl and -cb the checkpoint was trained with')
    for decoder, state in zip(decoders, states):
        want = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in state.items()}
        if want != have:
            diff = sorted(set(want.items()) ^ set(have.items()))[:3]
            raise UserError(f'{source}: decoder keys or shapes differ from a FrEIA 0.2 decoder, e.g. {diff}')
        decoder.load_state_dict(state, strict=True)
