"""A built-in demo dataset in MVTec layout, generated from texture photographs that ship with scikit-image.

Each class (``brick``, ``grass``, ``gravel``) is cut from one 512x512 grey photograph: training crops come
from its top half, test crops from its bottom half (random positions and flips, 128x128 px, saved as RGB PNG).
Four synthetic defect kinds are painted on test crops, each with an exact mask (255 where the defect is):

- ``scratch``: one or two thin bright or dark line segments (anti-aliased); the mask marks the pixels changed
  by more than VISIBLE grey levels;
- ``patch``: a rectangle replaced by a piece of another texture photograph (brick on grass and gravel, grass
  or gravel on brick: pairs that look clearly different);
- ``stain``: a smooth blob that darkens and colours the texture; the mask is where it can change a pixel by
  more than VISIBLE grey levels;
- ``hole``: a dark filled ellipse.
"""
from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from custom_datasets.common import make_temp_dir
from utils.errors import UserError

TEXTURE_CLASSES = ('brick', 'grass', 'gravel')
TEXTURE_DEFECTS = ('hole', 'patch', 'scratch', 'stain')
CROP = 128
N_TRAIN = 60
N_TEST_GOOD = 20
N_PER_DEFECT = 8
VISIBLE = 32
STAIN_TINTS = ((0.50, 0.30, 0.12), (0.80, 0.38, 0.10), (0.22, 0.30, 0.70), (0.30, 0.55, 0.20))
PATCH_SOURCES = {'brick': ('grass', 'gravel'), 'grass': ('brick',), 'gravel': ('brick',)}

Defect = Callable[[np.ndarray, np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _photo(name: str) -> np.ndarray:
    """(512, 512) uint8 grey photograph from ``skimage.data``."""
    import skimage.data
    return np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)


def _crop(photo: np.ndarray, top: int, bottom: int, rng: np.random.Generator) -> np.ndarray:
    """(CROP, CROP, 3) uint8 crop from rows [top, bottom), with random horizontal and vertical flips."""
    y = int(rng.integers(top, bottom - CROP + 1))
    x = int(rng.integers(0, photo.shape[1] - CROP + 1))
    crop = photo[y:y + CROP, x:x + CROP]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    return np.repeat(np.ascontiguousarray(crop)[..., None], 3, axis=2)


def _scratch(img: np.ndarray, rng: np.random.Generator,
             _foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thin line segments, bright on dark textures and dark on bright ones (drawn at 4x, box-downsampled)."""
    scale = 4
    canvas = Image.new('L', (CROP * scale, CROP * scale), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 3))):
        length = rng.uniform(50, 90)
        angle = rng.uniform(0, math.pi)
        cx, cy = rng.uniform(28, CROP - 28, size=2)
        dx, dy = 0.5 * length * math.cos(angle), 0.5 * length * math.sin(angle)
        width = rng.uniform(3.0, 4.5)
        draw.line([((cx - dx) * scale, (cy - dy) * scale), ((cx + dx) * scale, (cy + dy) * scale)],
                  fill=255, width=round(width * scale))
    cover = np.asarray(canvas.resize((CROP, CROP), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255
    under = img[cover[..., 0] > 0.5]
    target = 10.0 if under.mean() > 128 else 245.0
    out = np.clip(np.rint(img * (1 - cover) + target * cover), 0, 255).astype(np.uint8)
    mask = np.abs(out.astype(np.int16) - img.astype(np.int16)).max(axis=2) > VISIBLE
    return out, mask


def _patch(img: np.ndarray, rng: np.random.Generator, foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A rectangle replaced by a piece of another photograph."""
    h, w = (int(v) for v in rng.integers(30, 48, size=2))
    y, x = int(rng.integers(8, CROP - h - 8 + 1)), int(rng.integers(8, CROP - w - 8 + 1))
    fy, fx = int(rng.integers(0, foreign.shape[0] - h + 1)), int(rng.integers(0, foreign.shape[1] - w + 1))
    out = img.copy()
    out[y:y + h, x:x + w] = foreign[fy:fy + h, fx:fx + w, None]
    mask = np.zeros((CROP, CROP), dtype=bool)
    mask[y:y + h, x:x + w] = True
    return out, mask


def _stain(img: np.ndarray, rng: np.random.Generator, _foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A smooth blob (a few Gaussians thresholded, edges blurred) that darkens and colours the texture."""
    yy, xx = np.mgrid[0:CROP, 0:CROP].astype(np.float32)
    cy, cx = rng.uniform(36, CROP - 36, size=2)
    field = np.zeros((CROP, CROP), dtype=np.float32)
    for _ in range(int(rng.integers(3, 6))):
        oy, ox = rng.normal(0, 6, size=2)
        sigma = rng.uniform(6, 10)
        field += np.exp(-((yy - cy - oy) ** 2 + (xx - cx - ox) ** 2) / (2 * sigma ** 2))
    strength = rng.uniform(0.85, 0.95)
    alpha = strength * gaussian_filter((field > 0.5 * field.max()).astype(np.float32), sigma=1.0)
    tint = np.asarray(STAIN_TINTS[int(rng.integers(len(STAIN_TINTS)))], dtype=np.float32)
    out = np.clip(np.rint(img * (1 - alpha[..., None] * (1 - tint))), 0, 255).astype(np.uint8)
    return out, alpha * float(np.max(1 - tint)) * 255 > VISIBLE


def _hole(img: np.ndarray, rng: np.random.Generator, _foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A dark filled ellipse, darkest at its centre."""
    yy, xx = np.mgrid[0:CROP, 0:CROP].astype(np.float32)
    a, b = rng.uniform(8, 15, size=2)
    cy, cx = rng.uniform(b + 8, CROP - b - 8), rng.uniform(a + 8, CROP - a - 8)
    theta = rng.uniform(0, math.pi)
    u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
    v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
    r2 = (u / a) ** 2 + (v / b) ** 2
    inside = r2 <= 1
    fill = 12 + 18 * r2 + rng.normal(0, 3, size=r2.shape)
    out = img.copy()
    out[inside] = np.clip(np.rint(fill[inside]), 0, 255).astype(np.uint8)[:, None]
    return out, inside


DEFECTS: dict[str, Defect] = {'hole': _hole, 'patch': _patch, 'scratch': _scratch, 'stain': _stain}


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _generate(folder: Path, class_name: str, seed: int) -> None:
    """Write one class in MVTec layout into ``folder``."""
    rng = np.random.default_rng([seed, TEXTURE_CLASSES.index(class_name)])
    photo = _photo(class_name)
    half = photo.shape[0] // 2
    others = [_photo(n) for n in PATCH_SOURCES[class_name]]
    for i in range(N_TRAIN):
        _save(_crop(photo, 0, half, rng), folder / 'train' / 'good' / f'{i:03d}.png')
    for i in range(N_TEST_GOOD):
        _save(_crop(photo, half, photo.shape[0], rng), folder / 'test' / 'good' / f'{i:03d}.png')
    for defect in TEXTURE_DEFECTS:
        for i in range(N_PER_DEFECT):
            base = _crop(photo, half, photo.shape[0], rng)
            foreign = others[int(rng.integers(len(others)))]
            image, mask = DEFECTS[defect](base, rng, foreign)
            _save(image, folder / 'test' / defect / f'{i:03d}.png')
            _save(mask.astype(np.uint8) * 255, folder / 'ground_truth' / defect / f'{i:03d}_mask.png')


def make_textures(root: str | Path, class_names: Sequence[str] = TEXTURE_CLASSES,
                  seed: int = 0) -> list[Path]:
    """Generate the texture classes that do not exist yet under ``root`` (deterministic for a given seed).

    Each class is written into a temporary folder ``<root>/.tmp-<class>-*`` and renamed to ``<root>/<class>``
    when complete; an existing class folder is left as it is.

    Returns:
        The class folders, in the order of ``class_names``.

    Raises:
        UserError: an unknown class name, or ``root`` is not writable.
    """
    root = Path(root)
    folders = []
    for name in class_names:
        if name not in TEXTURE_CLASSES:
            raise UserError(f'unknown texture class {name!r}; choose one of {", ".join(TEXTURE_CLASSES)}')
        folder = root / name
        folders.append(folder)
        if folder.is_dir():
            continue
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(f'.tmp-{name}-*'):  # left by an interrupted generation
                shutil.rmtree(stale, ignore_errors=True)
            tmp = make_temp_dir(root, f'.tmp-{name}-')
        except OSError as exc:
            raise UserError(f'cannot create the texture demo under {root} ({exc}); pass --data-path with a '
                            'writable folder') from exc
        try:
            _generate(tmp, name, seed)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not folder.is_dir():  # else another process generated the class first
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folders
