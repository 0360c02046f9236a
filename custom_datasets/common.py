"""Samples, image and mask reading, and the dataset class shared by every dataset layout."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from utils.errors import UserError

IMAGE_EXTENSIONS = ('.bmp', '.jpeg', '.jpg', '.png', '.tif', '.tiff')
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class MaskRef:
    """Where a ground-truth mask lives.

    Attributes:
        path: an image file, or a ``.npy`` stack of shape (frames, H, W) when ``index`` is set.
        threshold: image masks count as defect where value > threshold; ``.npy`` masks where value != 0.
        index: the frame in the ``.npy`` stack, or None for an image file.
        also: further image files of the same mask, OR-ed with ``path`` (one file per defect region).
    """
    path: str
    threshold: int = 0
    index: int | None = None
    also: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        image: path of the image file.
        label: 0 normal, 1 anomalous.
        defect_type: ``'good'`` for normal images, otherwise the defect folder or kind.
        name: path relative to the dataset root, for display.
        mask: the mask source, or None for an all-zero mask (normal images and missing masks).
        mask_valid: False for an anomalous image whose mask is missing.
    """
    image: str
    label: int
    defect_type: str
    name: str
    mask: MaskRef | None = None
    mask_valid: bool = True


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` with an accepted extension (any case), sorted by name.

    Hidden files (names starting with a dot) are skipped. A missing folder gives an empty list.
    """
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith('.')
                   and p.suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: p.name)


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new uniquely named folder in ``parent``, with the permissions a plain mkdir would give."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) read from the file header only; raises UserError when the file is not an image."""
    try:
        with Image.open(path) as img:
            return img.size
    except _READ_ERRORS as exc:
        raise UserError(f'cannot read image {path} ({exc}); replace or remove the file') from exc


def read_image(path: str | Path) -> Image.Image:
    """The image converted to RGB (grey, RGB, RGBA and palette files all work).

    Raises:
        UserError: the file is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert('RGB')
    except _READ_ERRORS as exc:
        raise UserError(f'cannot read image {path} ({exc}); replace or remove the file') from exc


def binarize_mask_image(img: Image.Image, threshold: int) -> np.ndarray:
    """(H, W) bool array: True where the mask value is above ``threshold``.

    Colour and palette masks are turned into grey first; 16-bit and float masks are compared as they are.
    """
    if img.mode not in ('L', 'I', 'I;16', 'F'):
        img = img.convert('L')
    return np.asarray(img) > threshold


def read_mask(ref: MaskRef) -> np.ndarray:
    """The mask as an (H, W) bool array, binarised at the original resolution.

    Raises:
        UserError: the file cannot be read, or a ``.npy`` stack has too few frames.
    """
    if ref.index is not None:
        try:
            stack = np.load(ref.path, mmap_mode='r')
        except (OSError, ValueError) as exc:
            raise UserError(f'cannot read pixel masks {ref.path} ({exc}); replace the file') from exc
        if stack.ndim != 3 or ref.index >= stack.shape[0]:
            raise UserError(f'pixel masks {ref.path} have shape {stack.shape}; expected (frames, H, W) with '
                            f'more than {ref.index} frames')
        return np.asarray(stack[ref.index]) != 0
    binary = _read_mask_file(ref.path, ref.threshold)
    for path in ref.also:
        part = _read_mask_file(path, ref.threshold)
        if part.shape != binary.shape:
            raise UserError(f'mask files {ref.path} and {path} of one image differ in size '
                            f'({binary.shape[1]}x{binary.shape[0]} and {part.shape[1]}x{part.shape[0]})')
        binary |= part
    return binary


def _read_mask_file(path: str, threshold: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            return binarize_mask_image(img, threshold)
    except _READ_ERRORS as exc:
        raise UserError(f'cannot read mask {path} ({exc}); replace or remove the file') from exc


def check_files(samples: Sequence[Sample]) -> None:
    """Read the header of every image and image mask; UserError for unreadable files and size mismatches."""
    for sample in samples:
        size = image_size(sample.image)
        if sample.mask is not None and sample.mask.index is None:
            for path in (sample.mask.path, *sample.mask.also):
                mask_size = image_size(path)
                if mask_size != size:
                    raise _size_error(sample.image, size, path, mask_size)


def _size_error(image: str, size: tuple[int, int], mask: str, mask_size: tuple[int, int]) -> UserError:
    return UserError(f'mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {image} is '
                     f'{size[0]}x{size[1]} (width x height); masks must have their image\'s size')


FLIP_CHOICES = ('none', 'hflip', 'flips')


class AnomalyDataset(Dataset):
    """Images with image labels and pixel masks, transformed as in the original CFLOW-AD.

    Image transform: square Resize((S, S)) with LANCZOS (PIL's antialias filter), then, for training only,
    ColorJitter(brightness=jitter, contrast=jitter) when ``jitter`` > 0 (each factor uniform in
    [1 - jitter, 1 + jitter], the two in random order), RandomRotation(rotation_deg) with NEAREST interpolation,
    fill 0 and no expansion, then the random mirrorings of ``flips`` (``'hflip'``: left-right with probability
    1/2; ``'flips'``: also upside down, independently), then ToTensor and Normalize(mean, std). Masks are
    binarised at their own resolution and resized with NEAREST.

    Attributes:
        samples: the samples, in dataset order.
        labels: 0 normal, 1 anomalous, per sample.
        defect_types: ``'good'`` for normal samples, otherwise the defect kind.
        names: path of each image relative to the dataset root.
        mask_valid: False for anomalous images without a mask.
        n_missing_masks: how many anomalous images have no mask.
    """

    def __init__(self, samples: Sequence[Sample], input_size: int, mean: Sequence[float],
                 std: Sequence[float], rotation_deg: float = 0.0, flips: str = 'none',
                 jitter: float = 0.0) -> None:
        self.samples = list(samples)
        self.input_size = int(input_size)
        self.labels = [s.label for s in self.samples]
        self.defect_types = [s.defect_type for s in self.samples]
        self.names = [s.name for s in self.samples]
        self.mask_valid = [s.mask_valid for s in self.samples]
        self.n_missing_masks = sum(1 for s in self.samples if s.label == 1 and not s.mask_valid)
        size = (self.input_size, self.input_size)
        steps: list = [T.Resize(size, interpolation=T.InterpolationMode.LANCZOS)]
        if jitter:
            steps.append(T.ColorJitter(brightness=jitter, contrast=jitter))
        if rotation_deg:
            steps.append(T.RandomRotation(rotation_deg, interpolation=T.InterpolationMode.NEAREST,
                                          expand=False, fill=0))
        if flips not in FLIP_CHOICES:
            raise ValueError(f'flips must be one of {FLIP_CHOICES}, got {flips!r}')
        if flips in ('hflip', 'flips'):
            steps.append(T.RandomHorizontalFlip())
        if flips == 'flips':
            steps.append(T.RandomVerticalFlip())
        steps += [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
        self.transform = T.Compose(steps)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor, bool]:
        """One sample.

        Returns:
            image: (3, S, S) float, normalised.
            label: 0 normal, 1 anomalous.
            mask: (1, S, S) float with values exactly 0 or 1.
            mask_valid: False when an anomalous image has no mask (its mask is then all zero).

        Raises:
            UserError: the image or mask cannot be read, or the mask's size differs from the image's.
        """
        sample = self.samples[index]
        img = read_image(sample.image)
        image = self.transform(img)
        size = self.input_size
        if sample.mask is None:
            return image, sample.label, torch.zeros(1, size, size), sample.mask_valid
        binary = read_mask(sample.mask)
        if binary.shape != (img.height, img.width):
            raise _size_error(sample.image, img.size, sample.mask.path, (binary.shape[1], binary.shape[0]))
        small = Image.fromarray(binary.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
        mask = torch.from_numpy(np.asarray(small, dtype=np.float32).copy()).unsqueeze(0)
        return image, sample.label, mask, sample.mask_valid
