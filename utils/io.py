"""Atomic file writes: a crash or interrupt never leaves a half-written result or checkpoint."""
from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np


def atomic_write_bytes(path: str | Path, writer: Callable[[BinaryIO], None]) -> None:
    """Call ``writer(file_object)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the permissions a plain open() would give, not mkstemp's 0600
    try:
        with os.fdopen(fd, 'wb') as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode('utf-8')))


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, 'item') and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(_clean(data), indent=2) + '\n')


ChunkedArray = tuple[tuple[int, ...], np.dtype, Iterable[np.ndarray]]
"""An array given as its shape, dtype and its parts along the first axis, in order."""


def write_npz(f: BinaryIO, arrays: dict[str, np.ndarray | ChunkedArray]) -> None:
    """Write a compressed ``.npz`` (what ``np.savez_compressed`` writes and ``np.load`` reads) to ``f``; an
    array given as a :data:`ChunkedArray` is written part by part, so it never has to be in memory whole."""
    with zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for name, value in arrays.items():
            with zf.open(f'{name}.npy', 'w', force_zip64=True) as member:
                if isinstance(value, np.ndarray):
                    np.lib.format.write_array(member, value, allow_pickle=False)
                    continue
                shape, dtype, parts = value
                dtype = np.dtype(dtype)
                header = {'descr': np.lib.format.dtype_to_descr(dtype), 'fortran_order': False,
                          'shape': tuple(shape)}
                np.lib.format.write_array_header_2_0(member, header)
                rows = 0
                for part in parts:
                    part = np.ascontiguousarray(part, dtype=dtype)
                    if part.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f'{name}: a part of shape {part.shape} for an array of shape {shape}')
                    member.write(part.tobytes())
                    rows += part.shape[0]
                if rows != shape[0]:
                    raise ValueError(f'{name}: the parts hold {rows} rows, the shape says {shape[0]}')
