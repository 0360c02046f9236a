"""ShanghaiTech Campus (STC): training videos decoded once into JPEG frames; test frames with .npy labels.

Layout under the root:
    training/videos/<scene>_<id>.avi            training videos (normal only)
    training/frames/<video_stem>/%08d.jpg       frames written here on first use (JPEG quality 80)
    training/frames_<scene>.json                marker: the videos of the scene already decoded
    testing/frames/<video_id>/*.jpg             test frames, folders starting with the scene id
    testing/test_frame_mask/<video_id>.npy      (frames,) frame labels, nonzero = anomalous
    testing/test_pixel_mask/<video_id>.npy      (frames, H, W) pixel masks, nonzero = anomalous
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from custom_datasets.common import MaskRef, Sample, image_size, list_images, make_temp_dir
from utils.errors import UserError
from utils.io import atomic_write_text

STC_SCENES = tuple(f'{i:02d}' for i in range(1, 13))
JPEG_QUALITY = 80


def _videos(root: Path, scene: str) -> list[Path]:
    folder = root / 'training' / 'videos'
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == '.avi'
                   and p.name.startswith(f'{scene}_')), key=lambda p: p.name)


def marker_path(root: str | Path, scene: str) -> Path:
    """The file listing the training videos of ``scene`` whose frames are complete."""
    return Path(root) / 'training' / f'frames_{scene}.json'


def _read_marker(root: Path, scene: str) -> list[str]:
    path = marker_path(root, scene)
    if not path.is_file():
        return []
    try:
        done = json.loads(path.read_text(encoding='utf-8')).get('videos', [])
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f'cannot read {path} ({exc}); delete it to decode the training videos again') from exc
    return [str(v) for v in done]


def _write_marker(root: Path, scene: str, done: list[str]) -> None:
    atomic_write_text(marker_path(root, scene), json.dumps({'videos': sorted(done)}, indent=1) + '\n')


def list_stc_scenes(root: str | Path) -> list[str]:
    """Scenes with training videos, or with frames already decoded."""
    root = Path(root)
    return [s for s in STC_SCENES if _videos(root, s) or _read_marker(root, s)]


def decode_video(video: Path, out_dir: Path, progress: bool = True) -> int:
    """Decode every frame of ``video`` into ``out_dir/%08d.jpg`` (RGB, JPEG quality 80), streaming.

    Frames go into a temporary folder beside ``out_dir`` that is renamed when the video is complete, so an
    interrupted decode never leaves a partial ``out_dir``; temporary folders of earlier interrupted decodes of
    the same video are removed first.

    Returns:
        The number of frames written.

    Raises:
        UserError: the video cannot be decoded or has no frames.
    """
    import av  # PyAV (FFmpeg) is loaded only where a training video is decoded

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f'.tmp-{out_dir.name}-*'):  # left by an interrupted decode
        shutil.rmtree(stale, ignore_errors=True)
    tmp = make_temp_dir(out_dir.parent, f'.tmp-{out_dir.name}-')
    count = 0
    try:
        try:
            with av.open(str(video)) as container:
                if not container.streams.video:
                    raise UserError(f'{video} has no video stream; replace or remove the file')
                stream = container.streams.video[0]
                frames = container.decode(stream)
                bar = tqdm(frames, total=stream.frames or None, desc=f'decoding {video.name}', unit='frame',
                           leave=False, disable=not progress)
                for frame in bar:
                    frame.to_image().save(tmp / f'{count:08d}.jpg', quality=JPEG_QUALITY)
                    count += 1
        except (av.FFmpegError, OSError) as exc:
            raise UserError(f'cannot decode video {video} ({exc}); replace or remove the file') from exc
        if count == 0:
            raise UserError(f'video {video} has no frames; replace or remove the file')
        if out_dir.exists():
            shutil.rmtree(out_dir)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not out_dir.is_dir():  # else another process finished the same video first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return count


def extract_training_frames(root: str | Path, scene: str, progress: bool = True) -> list[str]:
    """Decode the training videos of ``scene`` that are not yet marked done; update the marker after each.

    Returns:
        The video stems of the scene whose frames are complete, sorted.
    """
    root = Path(root)
    frames_root = root / 'training' / 'frames'
    done = [v for v in _read_marker(root, scene) if (frames_root / v).is_dir()]
    todo = [v for v in _videos(root, scene) if v.stem not in done]
    for video in tqdm(todo, desc=f'STC scene {scene}: decoding training videos', unit='video',
                      disable=not progress or not todo):
        decode_video(video, frames_root / video.stem, progress)
        done.append(video.stem)
        _write_marker(root, scene, done)
    return sorted(done)


def stc_train_samples(root: str | Path, scene: str, progress: bool = True) -> list[Sample]:
    """Normal training frames of ``scene``, decoding the videos first where needed."""
    root = Path(root)
    samples = []
    for stem in extract_training_frames(root, scene, progress):
        for path in list_images(root / 'training' / 'frames' / stem):
            samples.append(Sample(str(path), 0, 'good', path.relative_to(root).as_posix()))
    return samples


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise UserError(f'{path} is missing; every test video needs frame labels and pixel masks')
    try:
        return np.load(path, mmap_mode='r' if mmap else None)
    except (OSError, ValueError) as exc:
        raise UserError(f'cannot read {path} ({exc}); replace the file') from exc


def stc_test_samples(root: str | Path, scene: str) -> list[Sample]:
    """Test frames of ``scene``: labels from test_frame_mask, masks from test_pixel_mask (nonzero = 1).

    Raises:
        UserError: a label or mask file is missing or unreadable, their counts differ from the frame count, or
            the pixel masks' size differs from the frames'.
    """
    root = Path(root)
    frames_root = root / 'testing' / 'frames'
    if not frames_root.is_dir():
        return []
    samples = []
    for folder in sorted(p for p in frames_root.iterdir() if p.is_dir() and p.name.startswith(scene)):
        frames = list_images(folder)
        label_path = root / 'testing' / 'test_frame_mask' / f'{folder.name}.npy'
        mask_path = root / 'testing' / 'test_pixel_mask' / f'{folder.name}.npy'
        labels = np.asarray(_load_npy(label_path, mmap=False)).reshape(-1)
        masks = _load_npy(mask_path, mmap=True)
        if masks.ndim != 3 or not len(frames) == len(labels) == masks.shape[0]:
            raise UserError(f'test video {folder.name}: {len(frames)} frames, {len(labels)} frame labels in '
                            f'{label_path.name} and pixel masks of shape {masks.shape} in {mask_path.name}; '
                            'they must agree')
        if frames:
            width, height = image_size(frames[0])
            if masks.shape[1:] != (height, width):
                raise UserError(f'test video {folder.name}: pixel masks {mask_path} are {masks.shape[2]}x'
                                f'{masks.shape[1]} but frame {frames[0]} is {width}x{height}')
        for i, (path, value) in enumerate(zip(frames, labels, strict=True)):
            label = int(value != 0)
            ref = MaskRef(str(mask_path), index=i) if label else None
            samples.append(Sample(str(path), label, 'anomaly' if label else 'good',
                                  path.relative_to(root).as_posix(), ref, True))
    return samples


LAYOUT_HINT = ('training/videos/<scene>_*.avi and testing/frames/<video_id>/*.jpg with '
               'testing/test_*_mask/<video_id>.npy')
