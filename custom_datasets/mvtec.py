"""MVTec AD layout: ``<class>/train/good``, ``<class>/test/<type>``, ``<class>/ground_truth/<type>``.

Variants of that layout read as they are: ``ok`` instead of ``good`` (BTAD); images in an ``rgb`` sub-folder
of each split folder with their masks in ``test/<type>/gt`` (MVTec 3D-AD, whose ``xyz`` point clouds are not
used); a folder of mask files per image, ``ground_truth/<type>/<stem>/*.png``, whose union is the mask
(MVTec LOCO AD). Any other sub-folder of a class (``validation``) is ignored.
"""
from __future__ import annotations

from pathlib import Path

from custom_datasets.common import IMAGE_EXTENSIONS, MaskRef, Sample, list_images

GOOD = 'good'
NORMAL_FOLDERS = (GOOD, 'ok')  # the name of the defect-free folders: MVTec AD and most datasets; BTAD
RGB_FOLDER = 'rgb'  # MVTec 3D-AD: <split>/<type>/rgb/*.png
GT_FOLDER = 'gt'  # MVTec 3D-AD: test/<type>/gt/<stem>.png


def normal_folder(class_dir: Path) -> str | None:
    """The name of the defect-free folder of a class (the first of NORMAL_FOLDERS under ``train``), or None."""
    return next((name for name in NORMAL_FOLDERS if (class_dir / 'train' / name).is_dir()), None)


def list_mvtec_classes(root: str | Path) -> list[str]:
    """Sub-folders of ``root`` that have a ``train/good`` (or ``train/ok``) folder, sorted."""
    root = Path(root)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and normal_folder(p) is not None)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _split_images(folder: Path) -> list[Path]:
    """Images of one split folder, or of its ``rgb`` sub-folder when it has one (MVTec 3D-AD)."""
    rgb = folder / RGB_FOLDER
    return list_images(rgb) if rgb.is_dir() else list_images(folder)


def _mask_index(folder: Path) -> dict[str, Path]:
    """Mask stem -> file in one ground-truth folder; a ``.png`` wins when a stem has several extensions."""
    index: dict[str, Path] = {}
    for path in list_images(folder):
        if path.stem not in index or path.suffix.lower() == '.png':
            index[path.stem] = path
    return index


def _mask_ref(files: list[Path]) -> MaskRef | None:
    if not files:
        return None
    return MaskRef(str(files[0]), threshold=0, also=tuple(str(f) for f in files[1:]))


def _find_mask(image: Path, gt_dir: Path, gt_index: dict[str, Path], gt3d_index: dict[str, Path]) -> MaskRef | None:
    """The mask of one anomalous image: ``<stem>_mask.*`` or ``<stem>.*`` in ``gt_dir``, else the files of
    the folder ``gt_dir/<stem>`` (all of them, OR-ed), else ``<stem>.*`` in the MVTec 3D-AD ``gt`` folder."""
    stem = image.stem
    hit = gt_index.get(f'{stem}_mask', gt_index.get(stem))
    if hit is not None:
        return _mask_ref([hit])
    ref = _mask_ref(list_images(gt_dir / stem))
    if ref is not None:
        return ref
    hit = gt3d_index.get(stem)
    return _mask_ref([hit]) if hit is not None else None


def mvtec_samples(root: str | Path, class_name: str) -> tuple[list[Sample], list[Sample]]:
    """Train and test samples of one class, in sorted folder and file order.

    Test images in ``test/good`` (``test/ok`` where the training folder is ``train/ok``) are normal (label 0,
    zero mask, defect type ``'good'``); every other test folder holds anomalous images whose mask is
    ``ground_truth/<type>/<stem>_mask.<ext>`` (MVTec AD's naming) or, failing that,
    ``ground_truth/<type>/<stem>.<ext>`` (the naming of several datasets converted to this layout), or the
    union of the files in ``ground_truth/<type>/<stem>/`` (MVTec LOCO AD), or ``test/<type>/gt/<stem>.<ext>``
    (MVTec 3D-AD), binarised as value > 0. A missing mask gives ``mask_valid=False``.

    Returns:
        (train, test) sample lists; either may be empty.
    """
    root = Path(root)
    folder = root / class_name
    normal = normal_folder(folder) or GOOD
    train = [Sample(str(p), 0, GOOD, _relative(p, root)) for p in _split_images(folder / 'train' / normal)]
    test: list[Sample] = []
    test_dir = folder / 'test'
    types = sorted(p.name for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
    for defect_type in types:
        images = _split_images(test_dir / defect_type)
        if defect_type == normal:
            test += [Sample(str(p), 0, GOOD, _relative(p, root)) for p in images]
            continue
        gt_dir = folder / 'ground_truth' / defect_type
        gt_index, gt3d_index = _mask_index(gt_dir), _mask_index(test_dir / defect_type / GT_FOLDER)
        for path in images:
            ref = _find_mask(path, gt_dir, gt_index, gt3d_index)
            test.append(Sample(str(path), 1, defect_type, _relative(path, root), ref, ref is not None))
    return train, test


LAYOUT_HINT = ('<class>/train/good/* (or train/ok/*), <class>/test/<type>/* and '
               '<class>/ground_truth/<type>/<stem>_mask.png '
               '(or <stem>.png); '
               f'image extensions {", ".join(e[1:] for e in IMAGE_EXTENSIONS)}')
