"""Datasets: MVTec AD layout (any class folder), ShanghaiTech Campus, Magnetic Tile Defects, a texture demo.

``build_datasets`` returns (train, test) :class:`AnomalyDataset` objects whose items are
``(image (3, S, S) normalised, label 0/1, mask (1, S, S) with values 0/1, mask_valid)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from custom_datasets import mtd, mvtec, stc
from custom_datasets.common import (FLIP_CHOICES, IMAGE_EXTENSIONS, AnomalyDataset, MaskRef, Sample, check_files,
                                    read_mask)
from custom_datasets.mtd import MTD_CLASS, MTD_DEFECTS, mtd_split, mtd_validation_split
from custom_datasets.stc import STC_SCENES
from custom_datasets.textures import TEXTURE_CLASSES, TEXTURE_DEFECTS, make_textures
from utils.errors import UserError

__all__ = ['DATASET_NAMES', 'FLIP_CHOICES', 'IMAGE_EXTENSIONS', 'MTD_CLASS', 'MTD_DEFECTS', 'MVTEC_CLASSES',
           'STC_SCENES', 'TEXTURE_CLASSES', 'TEXTURE_DEFECTS', 'AnomalyDataset', 'MaskRef', 'Sample',
           'build_datasets', 'default_data_path', 'list_classes', 'make_textures', 'mtd_split',
           'mtd_validation_split', 'read_mask']

DATASET_NAMES = ('mvtec', 'stc', 'mtd', 'textures')
MVTEC_CLASSES = ('bottle', 'cable', 'capsule', 'carpet', 'grid', 'hazelnut', 'leather', 'metal_nut', 'pill',
                 'screw', 'tile', 'toothbrush', 'transistor', 'wood', 'zipper')
_DEFAULT_PATHS = {'mvtec': './data/MVTec-AD', 'stc': './data/STC/shanghaitech', 'mtd': './data/magnetic_tile',
                  'textures': './data/textures'}
_LAYOUTS = {'mvtec': mvtec.LAYOUT_HINT, 'stc': stc.LAYOUT_HINT, 'mtd': mtd.LAYOUT_HINT,
            'textures': mvtec.LAYOUT_HINT}


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASET_NAMES:
        raise UserError(f'unknown dataset {dataset!r}; choose one of {", ".join(DATASET_NAMES)}')


def default_data_path(dataset: str) -> str:
    """The folder used when --data-path is not given (relative to the working directory)."""
    _check_dataset(dataset)
    return _DEFAULT_PATHS[dataset]


def _check_root(dataset: str, root: Path) -> None:
    if not root.is_dir():
        raise UserError(f'data folder {root} does not exist; pass --data-path with the folder that holds the '
                        f'{dataset} data ({_LAYOUTS[dataset]})')


def list_classes(dataset: str, root: str | Path) -> list[str]:
    """Classes present under ``root``.

    mvtec: sub-folders having ``train/good``; stc: scenes with training videos (or decoded frames);
    mtd: ``['tile']`` when ``MT_Free/Imgs`` exists; textures: all of TEXTURE_CLASSES (generated on demand).

    Raises:
        UserError: unknown dataset, or ``root`` is missing (except for textures).
    """
    _check_dataset(dataset)
    if dataset == 'textures':
        return list(TEXTURE_CLASSES)
    root = Path(root)
    _check_root(dataset, root)
    if dataset == 'mvtec':
        return mvtec.list_mvtec_classes(root)
    if dataset == 'stc':
        return stc.list_stc_scenes(root)
    return [MTD_CLASS] if mtd.has_mtd_layout(root) else []


def _check_settings(input_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if int(input_size) < 1:
        raise UserError(f'the input size must be a positive number of pixels, got {input_size}')
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise UserError(f'normalisation needs 3 means and 3 positive stds, got mean {mean} and std {std}')


def _samples(dataset: str, root: Path, class_name: str, progress: bool) -> tuple[list[Sample], list[Sample]]:
    if dataset == 'textures':
        if class_name not in TEXTURE_CLASSES:
            raise UserError(f'unknown textures class {class_name!r}; classes: {", ".join(TEXTURE_CLASSES)}')
        make_textures(root, (class_name,))
        return mvtec.mvtec_samples(root, class_name)
    _check_root(dataset, root)
    classes = list_classes(dataset, root)
    if class_name not in classes:
        raise UserError(f'class {class_name!r} not found under {root} (expected {_LAYOUTS[dataset]}); '
                        f'classes found: {", ".join(classes) or "none"}')
    if dataset == 'mvtec':
        return mvtec.mvtec_samples(root, class_name)
    if dataset == 'mtd':
        return mtd.mtd_samples(root)
    return stc.stc_train_samples(root, class_name, progress), stc.stc_test_samples(root, class_name)


def build_datasets(dataset: str, root: str | Path, class_name: str, input_size: int, mean: Sequence[float],
                   std: Sequence[float], rotation_deg: float = 5.0, train_flips: str = 'none',
                   train_jitter: float = 0.0, progress: bool = True) -> tuple[AnomalyDataset, AnomalyDataset]:
    """Train and test datasets of one class.

    The training set applies brightness and contrast jitter (``train_jitter``, none when 0),
    RandomRotation(rotation_deg) (none when 0) and the random mirrorings of ``train_flips``; the test set is
    never jittered, rotated or mirrored. Every
    image and image-mask header is read once here so that unreadable files and mask/image size mismatches
    fail before training (STC training frames, which are written by this package, are not checked).

    Args:
        dataset: one of DATASET_NAMES.
        root: the dataset folder (see default_data_path).
        class_name: an MVTec-layout class folder, an STC scene id, ``'tile'`` (mtd) or a texture class.
        input_size: side S of the square images and masks.
        mean, std: per-channel normalisation.
        rotation_deg: maximum training rotation in degrees.
        train_flips: ``'none'``, ``'hflip'`` (left-right, probability 1/2) or ``'flips'`` (left-right and
            upside down, each independently with probability 1/2), training set only.
        train_jitter: brightness and contrast factors drawn from [1 - train_jitter, 1 + train_jitter] for each
            training image (0 = none).
        progress: show a progress bar while STC training videos are decoded.

    Returns:
        (train, test).

    Raises:
        UserError: missing root, unknown class, empty train or test set, unreadable files, bad masks.
    """
    _check_dataset(dataset)
    _check_settings(input_size, mean, std)
    root = Path(root)
    train, test = _samples(dataset, root, class_name, progress)
    where = f'{dataset} class {class_name!r} under {root}'
    if not train:
        raise UserError(f'the training set of {where} is empty; it needs normal images ({_LAYOUTS[dataset]})')
    if not test:
        raise UserError(f'the test set of {where} is empty; it needs test images ({_LAYOUTS[dataset]})')
    check_files(test if dataset == 'stc' else train + test)
    return (AnomalyDataset(train, input_size, mean, std, rotation_deg, train_flips, train_jitter),
            AnomalyDataset(test, input_size, mean, std, 0.0))
