"""Datasets: MVTec-layout reading, item contract, transforms, errors, MTD split, STC frames, textures."""
import json
import shutil
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import custom_datasets.stc as stc_module
import custom_datasets.textures as textures_module
from custom_datasets import (
    DATASET_NAMES,
    MVTEC_CLASSES,
    STC_SCENES,
    TEXTURE_CLASSES,
    AnomalyDataset,
    MaskRef,
    Sample,
    build_datasets,
    default_data_path,
    list_classes,
    make_textures,
    mtd_split,
    mtd_validation_split,
    read_mask,
)
from utils.errors import UserError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
REAL_MTD = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'magnetic_tile'
SIDE = 16
GREYS = np.array([10, 100, 200], dtype=np.uint8)


def _save(array: np.ndarray, path: Path, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode == 'P':
        img = img.convert('P', palette=Image.Palette.ADAPTIVE)
    elif mode is not None:
        img = img.convert(mode)
    img.save(path)


def _grey(seed: int, shape=(SIDE, SIDE)) -> np.ndarray:
    """Random image made of three grey levels only (so NEAREST resampling creates no new values)."""
    return GREYS[np.random.default_rng(seed).integers(0, 3, size=shape)]


def _normalised(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float as ToTensor + Normalize."""
    x = rgb.astype(np.float32).transpose(2, 0, 1) / 255
    return (x - np.asarray(MEAN, np.float32)[:, None, None]) / np.asarray(STD, np.float32)[:, None, None]


RECT = np.zeros((SIDE, SIDE), dtype=np.uint8)
RECT[4:9, 3:11] = 255
RECT[12, 12] = 1  # any nonzero value marks a defect in MVTec masks


@pytest.fixture(scope='module')
def mvtec_root(tmp_path_factory) -> Path:
    """Classes: widget (complete: grey/RGB/RGBA/palette images, a missing mask), badmask, badimage, notest."""
    root = tmp_path_factory.mktemp('mvtec')
    w = root / 'widget'
    colour = np.stack([_grey(1), _grey(2), _grey(3)], axis=2)
    _save(_grey(0), w / 'train' / 'good' / '000.png')                      # grey
    _save(colour, w / 'train' / 'good' / '001.png')                        # RGB
    _save(colour, w / 'train' / 'good' / '002.png', 'RGBA')                # RGBA
    _save(colour, w / 'train' / 'good' / '003.png', 'P')                   # palette (3 levels: exact)
    (w / 'train' / 'good' / 'notes.txt').write_text('not an image')
    (w / 'train' / 'good' / '.hidden.png').write_bytes(b'junk')
    _save(_grey(4), w / 'test' / 'good' / '000.png')
    _save(_grey(5), w / 'test' / 'good' / '001.JPG', 'RGB')                # upper-case extension
    _save(_grey(6), w / 'test' / 'crack' / '000.png')
    _save(RECT, w / 'ground_truth' / 'crack' / '000_mask.png')
    _save(_grey(7, (12, 20)), w / 'test' / 'crack' / '001.bmp')            # no mask, non-square
    (root / 'not_a_class' / 'test').mkdir(parents=True)
    b = root / 'badmask'
    _save(_grey(0), b / 'train' / 'good' / '000.png')
    _save(_grey(1), b / 'test' / 'hole' / '000.png')
    _save(np.zeros((8, 10), np.uint8), b / 'ground_truth' / 'hole' / '000_mask.png')
    c = root / 'badimage'
    _save(_grey(0), c / 'train' / 'good' / '000.png')
    (c / 'train' / 'good' / '001.png').write_bytes(b'this is not a png')
    _save(_grey(1), c / 'test' / 'good' / '000.png')
    _save(_grey(0), root / 'notest' / 'train' / 'good' / '000.png')
    (root / 'notrain' / 'train' / 'good').mkdir(parents=True)
    _save(_grey(0), root / 'notrain' / 'test' / 'good' / '000.png')
    return root


def test_constants_and_default_paths():
    assert DATASET_NAMES == ('mvtec', 'stc', 'mtd', 'textures')
    assert len(MVTEC_CLASSES) == 15 and list(MVTEC_CLASSES) == sorted(MVTEC_CLASSES)
    assert STC_SCENES[0] == '01' and STC_SCENES[-1] == '12' and len(STC_SCENES) == 12
    assert default_data_path('mvtec') == './data/MVTec-AD'
    assert default_data_path('stc') == './data/STC/shanghaitech'
    assert default_data_path('mtd') == './data/magnetic_tile'
    assert default_data_path('textures') == './data/textures'
    with pytest.raises(UserError, match='mvtec'):
        default_data_path('imagenet')


def test_list_classes_mvtec(mvtec_root):
    assert list_classes('mvtec', mvtec_root) == ['badimage', 'badmask', 'notest', 'notrain', 'widget']
    assert list_classes('textures', mvtec_root / 'nowhere') == list(TEXTURE_CLASSES)


def test_mvtec_listing_and_labels(mvtec_root):
    train, test = build_datasets('mvtec', str(mvtec_root), 'widget', SIDE, MEAN, STD)
    assert train.names == [f'widget/train/good/00{i}.png' for i in range(4)]
    assert train.labels == [0, 0, 0, 0] and train.defect_types == ['good'] * 4
    assert test.names == ['widget/test/crack/000.png', 'widget/test/crack/001.bmp',
                          'widget/test/good/000.png', 'widget/test/good/001.JPG']
    assert test.labels == [1, 1, 0, 0]
    assert test.defect_types == ['crack', 'crack', 'good', 'good']
    assert test.mask_valid == [True, False, True, True]
    assert test.n_missing_masks == 1 and train.n_missing_masks == 0


def test_mvtec_masks_named_like_their_images(tmp_path):
    """``<stem>_mask.*`` is preferred; ``<stem>.*`` (e.g. a .png mask of a .bmp image) is the fallback."""
    w = tmp_path / 'part'
    _save(_grey(0), w / 'train' / 'good' / '000.bmp')
    for name in ('000.bmp', '001.bmp', '002.bmp'):
        _save(_grey(1), w / 'test' / 'ko' / name)
    _save(RECT, w / 'ground_truth' / 'ko' / '000.png')             # same stem as the image
    _save(RECT, w / 'ground_truth' / 'ko' / '001_mask.png')        # MVTec naming wins over ...
    _save(np.zeros((SIDE, SIDE), np.uint8), w / 'ground_truth' / 'ko' / '001.png')  # ... the same stem
    _, test = build_datasets('mvtec', str(tmp_path), 'part', SIDE, MEAN, STD)
    assert test.mask_valid == [True, True, False] and test.n_missing_masks == 1
    for i in (0, 1):
        assert torch.equal(test[i][2][0], torch.from_numpy(RECT > 0).float())


def test_btad_layout_ok_and_ko(tmp_path):
    """BTAD names its defect-free folders ``ok``: the class is listed and those images are normal."""
    c = tmp_path / '01'
    _save(_grey(0), c / 'train' / 'ok' / '0000.bmp')
    _save(_grey(1), c / 'train' / 'ok' / '0001.bmp')
    _save(_grey(2), c / 'test' / 'ok' / '0000.bmp')
    _save(_grey(3), c / 'test' / 'ko' / '0000.bmp')
    _save(RECT, c / 'ground_truth' / 'ko' / '0000.png')
    _save(_grey(0), tmp_path / 'other' / 'train' / 'normal' / '0000.png')  # neither good nor ok: no class
    assert list_classes('mvtec', tmp_path) == ['01']
    train, test = build_datasets('mvtec', str(tmp_path), '01', SIDE, MEAN, STD)
    assert train.names == ['01/train/ok/0000.bmp', '01/train/ok/0001.bmp'] and train.labels == [0, 0]
    assert test.names == ['01/test/ko/0000.bmp', '01/test/ok/0000.bmp']
    assert test.labels == [1, 0] and test.defect_types == ['ko', 'good'] and test.mask_valid == [True, True]
    assert torch.equal(test[0][2][0], torch.from_numpy(RECT > 0).float())


def test_mvtec_3d_layout_rgb_and_gt(tmp_path):
    """MVTec 3D-AD keeps images in ``rgb/`` and masks in ``test/<type>/gt/``; ``xyz/`` is not read."""
    c = tmp_path / 'bagel'
    _save(_grey(0), c / 'train' / 'good' / 'rgb' / '000.png')
    (c / 'train' / 'good' / 'xyz').mkdir(parents=True)
    (c / 'train' / 'good' / 'xyz' / '000.tiff').write_bytes(b'not read')
    _save(_grey(1), c / 'validation' / 'good' / 'rgb' / '000.png')
    _save(_grey(2), c / 'test' / 'good' / 'rgb' / '000.png')
    _save(np.zeros((SIDE, SIDE), np.uint8), c / 'test' / 'good' / 'gt' / '000.png')
    _save(_grey(3), c / 'test' / 'crack' / 'rgb' / '000.png')
    _save(_grey(4), c / 'test' / 'crack' / 'rgb' / '001.png')
    _save(RECT, c / 'test' / 'crack' / 'gt' / '000.png')
    train, test = build_datasets('mvtec', str(tmp_path), 'bagel', SIDE, MEAN, STD)
    assert train.names == ['bagel/train/good/rgb/000.png']
    assert test.names == ['bagel/test/crack/rgb/000.png', 'bagel/test/crack/rgb/001.png',
                          'bagel/test/good/rgb/000.png']
    assert test.labels == [1, 1, 0] and test.mask_valid == [True, False, True]
    assert torch.equal(test[0][2][0], torch.from_numpy(RECT > 0).float())


def test_mvtec_loco_mask_folders_are_united(tmp_path):
    """MVTec LOCO AD has a folder of masks per image (one file per defect region): the mask is their union."""
    c = tmp_path / 'juice_bottle'
    _save(_grey(0), c / 'train' / 'good' / '000.png')
    _save(_grey(1), c / 'test' / 'good' / '000.png')
    _save(_grey(2), c / 'test' / 'logical_anomalies' / '000.png')
    _save(_grey(3), c / 'test' / 'logical_anomalies' / '001.png')
    other = np.zeros((SIDE, SIDE), np.uint8)
    other[0:2, 0:3] = 255
    _save(RECT, c / 'ground_truth' / 'logical_anomalies' / '000' / '000.png')
    _save(other, c / 'ground_truth' / 'logical_anomalies' / '000' / '001.png')
    _save(other, c / 'ground_truth' / 'logical_anomalies' / '001' / '000.png')
    _, test = build_datasets('mvtec', str(tmp_path), 'juice_bottle', SIDE, MEAN, STD)
    assert test.labels == [0, 1, 1] and test.mask_valid == [True, True, True]
    assert torch.equal(test[1][2][0], torch.from_numpy((RECT > 0) | (other > 0)).float())
    assert torch.equal(test[2][2][0], torch.from_numpy(other > 0).float())
    _save(np.zeros((SIDE + 2, SIDE), np.uint8), c / 'ground_truth' / 'logical_anomalies' / '001' / '001.png')
    with pytest.raises(UserError, match='001/001.png.*masks must have their image'):
        build_datasets('mvtec', str(tmp_path), 'juice_bottle', SIDE, MEAN, STD)


def test_images_converted_to_rgb_exactly(mvtec_root):
    """At S equal to the image side the resize is the identity, so values are known exactly."""
    _, test = build_datasets('mvtec', mvtec_root, 'widget', SIDE, MEAN, STD)
    train, _ = build_datasets('mvtec', mvtec_root, 'widget', SIDE, MEAN, STD, rotation_deg=0.0)
    colour = np.stack([_grey(1), _grey(2), _grey(3)], axis=2)
    expected = [np.repeat(_grey(0)[..., None], 3, axis=2), colour, colour, colour]
    for i, rgb in enumerate(expected):
        image, label, mask, valid = train[i]
        assert image.dtype == torch.float32 and image.shape == (3, SIDE, SIDE)
        np.testing.assert_allclose(image.numpy(), _normalised(rgb), atol=1e-6)
        assert label == 0 and valid is True and mask.shape == (1, SIDE, SIDE) and not mask.any()
    image, *_ = test[2]
    grey = np.repeat(_grey(4)[..., None], 3, axis=2)
    np.testing.assert_allclose(image.numpy(), _normalised(grey), atol=1e-6)


@pytest.mark.parametrize('side', [SIDE, 2 * SIDE])
def test_masks_binary_and_nearest(mvtec_root, side):
    _, test = build_datasets('mvtec', mvtec_root, 'widget', side, MEAN, STD)
    image, label, mask, valid = test[0]
    assert label == 1 and valid is True and mask.dtype == torch.float32 and mask.shape == (1, side, side)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    k = side // SIDE
    np.testing.assert_array_equal(mask[0].numpy(), np.kron((RECT > 0).astype(np.float32), np.ones((k, k))))
    image, label, mask, valid = test[1]  # defect image without a mask file, non-square
    assert image.shape == (3, side, side) and label == 1 and valid is False and not mask.any()


def test_resize_uses_lanczos(mvtec_root):
    _, test = build_datasets('mvtec', mvtec_root, 'widget', 11, MEAN, STD)
    img = Image.open(mvtec_root / 'widget' / 'test' / 'crack' / '001.bmp').convert('RGB')
    lanczos = np.asarray(img.resize((11, 11), Image.Resampling.LANCZOS))
    bilinear = np.asarray(img.resize((11, 11), Image.Resampling.BILINEAR))
    assert not np.array_equal(lanczos, bilinear)
    np.testing.assert_allclose(test[1][0].numpy(), _normalised(lanczos), atol=1e-6)


def test_rotation_only_in_train(mvtec_root):
    train, test = build_datasets('mvtec', mvtec_root, 'widget', SIDE, MEAN, STD, rotation_deg=40.0)
    train0, _ = build_datasets('mvtec', mvtec_root, 'widget', SIDE, MEAN, STD, rotation_deg=0.0)
    reference = train0[0][0]
    fill = torch.tensor([(0 - m) / s for m, s in zip(MEAN, STD, strict=True)])
    torch.manual_seed(0)
    draws = [train[0][0] for _ in range(6)]
    assert sum(not torch.allclose(d, reference) for d in draws) >= 4  # a tiny angle may change no pixel
    assert any(torch.allclose(d[:, 0, 0], fill) for d in draws)  # corners filled with 0 before Normalize
    allowed = np.append((GREYS / 255 - MEAN[0]) / STD[0], fill[0].item())
    for d in draws:  # NEAREST: no new grey values appear
        assert np.abs(d[0].numpy().reshape(-1, 1) - allowed).min(axis=1).max() < 1e-5
    torch.manual_seed(1)
    assert torch.equal(test[2][0], test[2][0])
    torch.manual_seed(2)
    first = test[2][0]
    torch.manual_seed(3)
    assert torch.equal(first, test[2][0])
    assert torch.equal(train0[0][0], reference)


def test_train_jitter_scales_brightness_and_contrast_of_training_images_only(mvtec_root):
    """--train-jitter: each training draw maps every grey level to one value, keeping their order (brightness
    and contrast are monotone maps); draws differ; the test set and a jitter of 0 are untouched."""
    train, test = build_datasets('mvtec', mvtec_root, 'widget', SIDE, MEAN, STD, rotation_deg=0.0,
                                 train_jitter=0.5)
    plain, plain_test = build_datasets('mvtec', mvtec_root, 'widget', SIDE, MEAN, STD, rotation_deg=0.0)
    reference = plain[0][0]
    torch.manual_seed(0)
    draws = [train[0][0] for _ in range(6)]
    assert sum(not torch.allclose(d, reference) for d in draws) >= 5
    levels = _grey(0)
    for d in draws:
        out = d[0].numpy()
        mapped = [np.unique(out[levels == g]) for g in GREYS]
        assert all(len(m) == 1 for m in mapped)  # one value per grey level: no spatial change
        assert mapped[0][0] <= mapped[1][0] <= mapped[2][0]
    torch.manual_seed(1)
    for i in range(len(test)):
        assert torch.equal(test[i][0], plain_test[i][0])
    assert torch.equal(plain[0][0], reference)


@pytest.mark.parametrize('flips, expected', [('none', {'id'}), ('hflip', {'id', 'lr'}),
                                              ('flips', {'id', 'lr', 'ud', 'both'})])
def test_train_flips_mirror_training_images_only(mvtec_root, flips, expected):
    train, test = build_datasets('mvtec', mvtec_root, 'widget', SIDE, MEAN, STD, rotation_deg=0.0,
                                 train_flips=flips)
    plain, plain_test = build_datasets('mvtec', mvtec_root, 'widget', SIDE, MEAN, STD, rotation_deg=0.0)
    reference = plain[0][0]
    views = {'id': reference, 'lr': reference.flip(-1), 'ud': reference.flip(-2), 'both': reference.flip(-1, -2)}
    assert len({v.numpy().tobytes() for v in views.values()}) == 4  # the image has no mirror symmetry
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        draw = train[0][0]
        match = [name for name, v in views.items() if torch.equal(draw, v)]
        assert len(match) == 1, 'a training image is the image or one of its mirror images'
        seen.add(match[0])
    assert seen == expected
    for i in range(len(test)):  # the test set is never mirrored
        assert torch.equal(test[i][0], plain_test[i][0]) and torch.equal(test[i][2], plain_test[i][2])


def test_missing_root_names_path_and_flag(tmp_path):
    missing = tmp_path / 'no_such_folder'
    for dataset in ('mvtec', 'stc', 'mtd'):
        with pytest.raises(UserError) as err:
            build_datasets(dataset, missing, 'x', SIDE, MEAN, STD)
        assert str(missing) in str(err.value) and '--data-path' in str(err.value)
        with pytest.raises(UserError, match='--data-path'):
            list_classes(dataset, missing)


def test_unknown_class_lists_existing(mvtec_root):
    with pytest.raises(UserError) as err:
        build_datasets('mvtec', mvtec_root, 'bottle', SIDE, MEAN, STD)
    assert 'bottle' in str(err.value) and 'widget' in str(err.value) and 'badmask' in str(err.value)
    with pytest.raises(UserError, match='brick'):
        build_datasets('textures', mvtec_root, 'bottle', SIDE, MEAN, STD)
    with pytest.raises(UserError, match='mvtec'):
        build_datasets('imagenet', mvtec_root, 'widget', SIDE, MEAN, STD)


def test_wrong_size_mask(mvtec_root):
    with pytest.raises(UserError) as err:
        build_datasets('mvtec', mvtec_root, 'badmask', SIDE, MEAN, STD)
    text = str(err.value)
    assert '000_mask.png' in text and 'hole/000.png' in text and '10x8' in text and '16x16' in text
    sample = Sample(str(mvtec_root / 'badmask' / 'test' / 'hole' / '000.png'), 1, 'hole', 'x',
                    MaskRef(str(mvtec_root / 'badmask' / 'ground_truth' / 'hole' / '000_mask.png')))
    with pytest.raises(UserError, match='10x8'):
        AnomalyDataset([sample], SIDE, MEAN, STD)[0]


def test_unreadable_image(mvtec_root, tmp_path):
    with pytest.raises(UserError, match='badimage/train/good/001.png'):
        build_datasets('mvtec', mvtec_root, 'badimage', SIDE, MEAN, STD)
    truncated = tmp_path / 'truncated.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    dataset = AnomalyDataset([Sample(str(truncated), 0, 'good', 'truncated.png')], SIDE, MEAN, STD)
    with pytest.raises(UserError, match='truncated.png'):
        dataset[0]


def test_empty_sets(mvtec_root):
    with pytest.raises(UserError, match='test set'):
        build_datasets('mvtec', mvtec_root, 'notest', SIDE, MEAN, STD)
    with pytest.raises(UserError, match='training set'):
        build_datasets('mvtec', mvtec_root, 'notrain', SIDE, MEAN, STD)


# ----------------------------------------------------------------------------------------------------- MTD

MTD_FREE_NAMES = [f'exp{k}_num_{n}' for k, n in [(3, 7), (1, 20), (2, 5), (1, 3), (6, 1), (4, 11), (5, 2),
                                                  (1, 100), (2, 9), (3, 1), (6, 40), (4, 4)]]


@pytest.fixture(scope='module')
def mtd_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('mtd')
    for i, stem in enumerate(MTD_FREE_NAMES):  # created in unsorted order
        _save(_grey(i, (6, 8)), root / 'MT_Free' / 'Imgs' / f'{stem}.jpg')
        _save(np.zeros((6, 8), np.uint8), root / 'MT_Free' / 'Imgs' / f'{stem}.png')
    mask = np.zeros((8, 8), np.uint8)
    mask[0, :4] = [126, 127, 128, 255]
    mask[5:7, 5:7] = 200
    for stem in ('exp1_num_2', 'exp1_num_1'):
        _save(_grey(50, (8, 8)), root / 'MT_Blowhole' / 'Imgs' / f'{stem}.jpg')
        _save(mask, root / 'MT_Blowhole' / 'Imgs' / f'{stem}.png')
    _save(_grey(51, (8, 8)), root / 'MT_Crack' / 'Imgs' / 'exp2_num_1.jpg')  # no mask
    return root


def test_mtd_split_fake_tree(mtd_root):
    train, test = mtd_split(mtd_root)
    assert (train, test) == mtd_split(str(mtd_root))
    names = sorted(f'{s}.jpg' for s in MTD_FREE_NAMES)
    assert [p.name for p in test] == [names[0], names[5], names[10]]
    assert [p.name for p in train] == [n for i, n in enumerate(names) if i % 5]
    assert not set(train) & set(test) and len(train) + len(test) == 12
    fit, val = mtd_validation_split(list(reversed(train)))
    assert [p.name for p in val] == [train[0].name, train[5].name] and len(fit) == 7
    assert sorted(fit + val) == sorted(train) and not set(fit) & set(val)
    assert mtd_validation_split([str(p) for p in train], every=3)[1] == [str(train[i]) for i in (0, 3, 6)]
    with pytest.raises(UserError):
        mtd_validation_split(train, every=1)


def test_mtd_datasets_fake_tree(mtd_root):
    assert list_classes('mtd', mtd_root) == ['tile']
    with pytest.raises(UserError, match='tile'):
        build_datasets('mtd', mtd_root, 'bottle', 8, MEAN, STD)
    train, test = build_datasets('mtd', mtd_root, 'tile', 8, MEAN, STD)
    assert len(train) == 9 and set(train.labels) == {0}
    assert test.labels == [0, 0, 0, 1, 1, 1]
    assert test.defect_types == ['good'] * 3 + ['Blowhole', 'Blowhole', 'Crack']
    assert test.names[3] == 'MT_Blowhole/Imgs/exp1_num_1.jpg'
    assert test.mask_valid == [True] * 5 + [False] and test.n_missing_masks == 1
    _, _, mask, valid = test[3]
    expected = np.zeros((8, 8), np.float32)
    expected[0, 2:4] = 1  # 128 and 255 are above 127; 126 and 127 are not
    expected[5:7, 5:7] = 1
    assert valid is True
    np.testing.assert_array_equal(mask[0].numpy(), expected)
    image, label, mask, valid = test[0]
    assert image.shape == (3, 8, 8) and label == 0 and not mask.any()


@pytest.mark.skipif(not REAL_MTD.is_dir(), reason=f'the Magnetic Tile Defects data is not at {REAL_MTD}')
def test_real_mtd():
    train_paths, test_paths = mtd_split(REAL_MTD)
    assert len(train_paths) == 761 and len(test_paths) == 191
    train, test = build_datasets('mtd', REAL_MTD, 'tile', 32, MEAN, STD)
    assert len(train) == 761 and len(test) == 191 + 392 and sum(test.labels) == 392
    assert test.n_missing_masks == 0
    uneven = [s for s in test.samples if s.defect_type == 'Uneven']
    assert len(uneven) == 103
    empty = sorted(Path(s.mask.path).name for s in uneven if not read_mask(s.mask).any())
    assert empty == ['exp3_num_45042.png', 'exp4_num_124690.png', 'exp4_num_352527.png', 'exp4_num_45057.png']
    index = test.names.index('MT_Uneven/Imgs/exp3_num_45042.jpg')
    _, label, mask, valid = test[index]
    assert label == 1 and valid is True and not mask.any()


# ----------------------------------------------------------------------------------------------------- STC

def _write_video(path: Path, frames: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with av.open(str(path), 'w') as out:
        stream = out.add_stream('mpeg4', rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, 'yuv420p'
        for _ in range(frames):
            pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format='rgb24')
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _write_test_video(root: Path, video_id: str, labels: list[int], n_frames: int | None = None) -> None:
    n_frames = len(labels) if n_frames is None else n_frames
    for i in range(n_frames):
        _save(_grey(i, (48, 64)), root / 'testing' / 'frames' / video_id / f'{i:03d}.jpg', 'RGB')
    pixels = np.zeros((len(labels), 48, 64), np.uint8)
    for i in range(len(labels)):  # set in every frame; only frames labelled 1 may use it
        pixels[i, 4 + 8 * i:20 + 8 * i, 16:48] = 1
    (root / 'testing' / 'test_frame_mask').mkdir(parents=True, exist_ok=True)
    (root / 'testing' / 'test_pixel_mask').mkdir(parents=True, exist_ok=True)
    np.save(root / 'testing' / 'test_frame_mask' / f'{video_id}.npy', np.asarray(labels, np.int64))
    np.save(root / 'testing' / 'test_pixel_mask' / f'{video_id}.npy', pixels)


@pytest.fixture()
def stc_root(tmp_path) -> Path:
    root = tmp_path / 'shanghaitech'
    _write_video(root / 'training' / 'videos' / '01_001.avi', 5, 0)
    _write_video(root / 'training' / 'videos' / '01_002.avi', 4, 1)
    _write_video(root / 'training' / 'videos' / '02_001.avi', 3, 2)
    _write_test_video(root, '01_0014', [0, 1, 1, 0])
    _write_test_video(root, '02_0001', [0, 1])
    return root


def test_stc_extraction_once_and_contract(stc_root, monkeypatch):
    assert list_classes('stc', stc_root) == ['01', '02']
    calls = []
    real_decode = stc_module.decode_video

    def counting(video, out_dir, progress=True):
        calls.append(video.name)
        return real_decode(video, out_dir, progress)

    monkeypatch.setattr(stc_module, 'decode_video', counting)
    train, test = build_datasets('stc', stc_root, '01', 32, (0.5,) * 3, (0.225,) * 3)
    assert calls == ['01_001.avi', '01_002.avi']
    assert len(train) == 9 and set(train.labels) == {0} and set(train.defect_types) == {'good'}
    assert train.names[0] == 'training/frames/01_001/00000000.jpg'
    assert sorted(p.name for p in (stc_root / 'training' / 'frames').iterdir()) == ['01_001', '01_002']
    marker = json.loads((stc_root / 'training' / 'frames_01.json').read_text())
    assert marker['videos'] == ['01_001', '01_002']
    with Image.open(stc_root / 'training' / 'frames' / '01_001' / '00000004.jpg') as img:
        assert img.size == (64, 48) and img.mode == 'RGB'
    image, label, mask, valid = train[0]
    assert image.shape == (3, 32, 32) and label == 0 and not mask.any() and valid is True

    assert test.labels == [0, 1, 1, 0] and test.defect_types == ['good', 'anomaly', 'anomaly', 'good']
    assert test.names[1] == 'testing/frames/01_0014/001.jpg' and test.n_missing_masks == 0
    pixels = np.load(stc_root / 'testing' / 'test_pixel_mask' / '01_0014.npy')
    for i in range(4):
        _, label, mask, valid = test[i]
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and valid is True
        if label:
            small = Image.fromarray(pixels[i]).resize((32, 32), Image.Resampling.NEAREST)
            np.testing.assert_array_equal(mask[0].numpy(), np.asarray(small, np.float32))
            assert mask.sum() > 0
        else:
            assert not mask.any()  # frame label 0 gives a zero mask even where the pixel mask is set

    calls.clear()
    train2, test2 = build_datasets('stc', stc_root, '01', 32, (0.5,) * 3, (0.225,) * 3)
    assert calls == [] and train2.names == train.names and len(test2) == 4


def test_stc_resumes_interrupted_extraction(stc_root, monkeypatch):
    build_datasets('stc', stc_root, '02', 16, MEAN, STD)
    build_datasets('stc', stc_root, '01', 16, MEAN, STD)
    frames = stc_root / 'training' / 'frames'
    shutil.rmtree(frames / '01_002')
    (frames / '.tmp-01_002-x').mkdir()  # what an interrupted decode could leave behind
    calls = []
    real_decode = stc_module.decode_video

    def counting(video, out_dir, progress=True):
        calls.append(video.name)
        return real_decode(video, out_dir, progress)

    monkeypatch.setattr(stc_module, 'decode_video', counting)
    train, _ = build_datasets('stc', stc_root, '01', 16, MEAN, STD)
    assert calls == ['01_002.avi'] and len(train) == 9
    assert sorted(p.name for p in frames.iterdir()) == ['01_001', '01_002', '02_001']
    assert json.loads((stc_root / 'training' / 'frames_02.json').read_text())['videos'] == ['02_001']


def test_stc_count_mismatch_names_video(stc_root):
    _write_test_video(stc_root, '01_0015', [0, 1, 0], n_frames=2)
    with pytest.raises(UserError, match='01_0015'):
        build_datasets('stc', stc_root, '01', 16, MEAN, STD)
    with pytest.raises(UserError, match='03'):
        build_datasets('stc', stc_root, '03', 16, MEAN, STD)


def test_stc_bad_video(tmp_path):
    root = tmp_path / 'stc'
    (root / 'training' / 'videos').mkdir(parents=True)
    (root / 'training' / 'videos' / '05_001.avi').write_bytes(b'not a video' * 20)
    with pytest.raises(UserError, match='05_001.avi'):
        build_datasets('stc', root, '05', 16, MEAN, STD)
    assert not [p for p in (root / 'training' / 'frames').iterdir()]


# ------------------------------------------------------------------------------------------------ textures

def _tree_bytes(folder: Path) -> dict[str, bytes]:
    files = sorted(p for p in folder.rglob('*') if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def test_textures_deterministic_and_complete(tmp_path, monkeypatch):
    start = time.perf_counter()
    (first,) = make_textures(tmp_path / 'a', ('gravel',))
    elapsed = time.perf_counter() - start
    (second,) = make_textures(tmp_path / 'b', ('gravel',))
    a, b = _tree_bytes(first), _tree_bytes(second)
    assert a == b and len(a) == 60 + 20 + 2 * 4 * 8
    assert sorted(p.name for p in (tmp_path / 'a').iterdir()) == ['gravel']  # no temporary folder left
    assert elapsed < 20
    for defect in textures_module.TEXTURE_DEFECTS:
        for i in range(8):
            mask = np.asarray(Image.open(first / 'ground_truth' / defect / f'{i:03d}_mask.png'))
            assert set(np.unique(mask).tolist()) == {0, 255}
    monkeypatch.setattr(textures_module, '_generate', lambda *args: pytest.fail('generated twice'))
    make_textures(tmp_path / 'a', ('gravel',))
    train, test = build_datasets('textures', tmp_path / 'a', 'gravel', 32, MEAN, STD)
    assert len(train) == 60 and len(test) == 52 and sum(test.labels) == 32 and test.n_missing_masks == 0
    assert set(test.defect_types) == {'good', 'hole', 'patch', 'scratch', 'stain'}


def test_texture_defect_masks_exact():
    rng = np.random.default_rng(0)
    photo = textures_module._photo('brick')
    foreign = textures_module._photo('grass')
    for _ in range(5):
        base = textures_module._crop(photo, 256, 512, rng)
        for name, paint in textures_module.DEFECTS.items():
            out, mask = paint(base, rng, foreign)
            change = np.abs(out.astype(int) - base.astype(int)).max(axis=2)
            assert mask.dtype == bool and mask.sum() > 20, name
            if name == 'scratch':
                np.testing.assert_array_equal(mask, change > textures_module.VISIBLE)
            elif name == 'stain':
                assert change[~mask].max() <= textures_module.VISIBLE
                assert np.median(change[mask]) > textures_module.VISIBLE
            else:
                assert not change[~mask].any(), name
                assert np.mean(change[mask] > 0) > 0.8, name
                if name == 'hole':
                    assert np.mean(change[mask] > textures_module.VISIBLE) > 0.5


def test_textures_unwritable_root(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    with pytest.raises(UserError, match='--data-path'):
        build_datasets('textures', blocker, 'brick', 32, MEAN, STD)
