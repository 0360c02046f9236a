"""MVTec AD layout: ``<class>/train/good``, ``<class>/test/<type>``, ``<class>/ground_truth/<type>``."""
from __future__ import annotations

from pathlib import Path

from custom_datasets.common import IMAGE_EXTENSIONS, MaskRef, Sample, list_images

GOOD = 'good'


def list_mvtec_classes(root: str | Path) -> list[str]:
    """Sub-folders of ``root`` that have a ``train/good`` folder, sorted."""
    root = Path(root)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / 'train' / GOOD).is_dir())


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _mask_index(folder: Path) -> dict[str, Path]:
    """Mask stem -> file in one ground-truth folder; a ``.png`` wins when a stem has several extensions."""
    index: dict[str, Path] = {}
    for path in list_images(folder):
        if path.stem not in index or path.suffix.lower() == '.png':
            index[path.stem] = path
    return index


def mvtec_samples(root: str | Path, class_name: str) -> tuple[list[Sample], list[Sample]]:
    """Train and test samples of one class, in sorted folder and file order.

    Test images in ``test/good`` are normal (label 0, zero mask); every other test folder holds anomalous
    images whose mask is ``ground_truth/<type>/<stem>_mask.<ext>`` (MVTec AD's naming) or, failing that,
    ``ground_truth/<type>/<stem>.<ext>`` (the naming of several datasets converted to this layout), binarised
    as value > 0. A missing mask gives ``mask_valid=False``.

    Returns:
        (train, test) sample lists; either may be empty.
    """
    root = Path(root)
    folder = root / class_name
    train = [Sample(str(p), 0, GOOD, _relative(p, root)) for p in list_images(folder / 'train' / GOOD)]
    test: list[Sample] = []
    test_dir = folder / 'test'
    types = sorted(p.name for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
    for defect_type in types:
        images = list_images(test_dir / defect_type)
        if defect_type == GOOD:
            test += [Sample(str(p), 0, GOOD, _relative(p, root)) for p in images]
            continue
        masks = _mask_index(folder / 'ground_truth' / defect_type)
        for path in images:
            mask = masks.get(f'{path.stem}_mask', masks.get(path.stem))
            ref = MaskRef(str(mask), threshold=0) if mask is not None else None
            test.append(Sample(str(path), 1, defect_type, _relative(path, root), ref, mask is not None))
    return train, test


LAYOUT_HINT = ('<class>/train/good/*, <class>/test/<type>/* and <class>/ground_truth/<type>/<stem>_mask.png '
               '(or <stem>.png); '
               f'image extensions {", ".join(e[1:] for e in IMAGE_EXTENSIONS)}')
