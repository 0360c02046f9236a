"""Magnetic Tile Defects, original layout: ``MT_<Class>/Imgs/<stem>.jpg`` with a same-stem ``.png`` mask.

Split (deterministic): ``MT_Free`` images sorted by file name; index i goes to test when i % 5 == 0, the rest
to train (761 train / 191 test normal images for the full set). Every defect image is a test image. Masks are
binarised as value > 127 at the original resolution.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from custom_datasets.common import MaskRef, Sample
from utils.errors import UserError

MTD_CLASS = 'tile'
MTD_FREE = 'MT_Free'
MTD_DEFECTS = ('Blowhole', 'Break', 'Crack', 'Fray', 'Uneven')
MTD_MASK_THRESHOLD = 127
MTD_TEST_EVERY = 5

PathLike = TypeVar('PathLike', str, Path)


def _jpgs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == '.jpg'
                   and not p.name.startswith('.')), key=lambda p: p.name)


def has_mtd_layout(root: str | Path) -> bool:
    """True when ``root`` holds ``MT_Free/Imgs``."""
    return (Path(root) / MTD_FREE / 'Imgs').is_dir()


def mtd_split(root: str | Path) -> tuple[list[Path], list[Path]]:
    """Deterministic split of the defect-free images.

    Returns:
        (train_paths, test_normal_paths): ``MT_Free/Imgs/*.jpg`` sorted by file name; index i is a test image
        when i % 5 == 0, otherwise a train image. Both lists keep the sorted order.
    """
    images = _jpgs(Path(root) / MTD_FREE / 'Imgs')
    train = [p for i, p in enumerate(images) if i % MTD_TEST_EVERY != 0]
    test = [p for i, p in enumerate(images) if i % MTD_TEST_EVERY == 0]
    return train, test


def mtd_validation_split(train_paths: Sequence[PathLike],
                         every: int = 5) -> tuple[list[PathLike], list[PathLike]]:
    """Split training images into a fit part and a validation part, without touching test data.

    The paths are sorted by file name (then full path); index i goes to validation when i % every == 0.

    Returns:
        (fit, val), both sorted.
    """
    if every < 2:
        raise UserError(f'the validation split needs every >= 2, got {every}')
    ordered = sorted(train_paths, key=lambda p: (Path(p).name, str(p)))
    fit = [p for i, p in enumerate(ordered) if i % every != 0]
    val = [p for i, p in enumerate(ordered) if i % every == 0]
    return fit, val


def _mask_ref(image: Path) -> MaskRef | None:
    mask = image.with_suffix('.png')
    return MaskRef(str(mask), threshold=MTD_MASK_THRESHOLD) if mask.is_file() else None


def mtd_normal_samples(root: str | Path, paths: Sequence[str | Path]) -> list[Sample]:
    """Normal samples (label 0, zero mask) for the given ``MT_Free`` image paths."""
    root = Path(root)
    return [Sample(str(p), 0, 'good', Path(p).relative_to(root).as_posix()) for p in paths]


def mtd_defect_samples(root: str | Path) -> list[Sample]:
    """Every defect image, folders in the order of MTD_DEFECTS, files sorted by name.

    defect_type is the folder name without ``MT_`` (``'Blowhole'``, ...). A missing mask gives
    mask_valid False.
    """
    root = Path(root)
    samples = []
    for defect in MTD_DEFECTS:
        for path in _jpgs(root / f'MT_{defect}' / 'Imgs'):
            ref = _mask_ref(path)
            name = path.relative_to(root).as_posix()
            samples.append(Sample(str(path), 1, defect, name, ref, ref is not None))
    return samples


def mtd_samples(root: str | Path) -> tuple[list[Sample], list[Sample]]:
    """(train, test) samples: train = split normal images; test = held-out normal images, then all defects."""
    train_paths, test_paths = mtd_split(root)
    test = mtd_normal_samples(root, test_paths) + mtd_defect_samples(root)
    return mtd_normal_samples(root, train_paths), test


LAYOUT_HINT = 'MT_Free/Imgs/*.jpg and MT_<Defect>/Imgs/<stem>.jpg with <stem>.png masks'
