"""Command line of cflow-ad, parsed once into a frozen :class:`Config`.

The options of the original implementation keep their long and short names and defaults; the
options added here are grouped separately in ``--help``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from custom_datasets import DATASET_NAMES, FLIP_CHOICES
from custom_models.encoders import ENCODER_NAMES
from custom_models.flow import DECODER_NAMES
from utils.scoring import scale_weights

ACTION_TYPES = ('norm-train', 'norm-test')
DEFAULT_INPUT_SIZE = 256


def pool_sizes(feature_pool: int | Sequence[int], n_scales: int) -> tuple[int, ...]:
    """``--feature-pool`` as one K per scale (finest first): a single K applies to every scale."""
    if isinstance(feature_pool, int):
        return (feature_pool,) * n_scales
    return tuple(int(k) for k in feature_pool)


def fold_pool_sizes(ks: Sequence[int]) -> int | tuple[int, ...]:
    """``--feature-pool`` as it is stored and typed: one K when every scale has the same, else one per scale."""
    return int(ks[0]) if len(set(ks)) == 1 else tuple(int(k) for k in ks)


@dataclass(frozen=True)
class Config:
    """All settings of one run; nothing changes them after :func:`parse_config`."""
    # options of the original implementation
    dataset: str = 'mvtec'
    checkpoint: str = ''
    class_name: str = 'none'
    enc_arch: str = 'wide_resnet50_2'
    dec_arch: str = 'freia-cflow'
    pool_layers: int = 3
    coupling_blocks: int = 8
    run_name: int = 0
    input_size: int = DEFAULT_INPUT_SIZE
    action_type: str = 'norm-train'
    batch_size: int = 32
    lr: float = 2e-4
    meta_epochs: int = 25
    sub_epochs: int = 8
    pro: bool = False
    viz: bool = False
    workers: int = 4
    gpu: str | None = None
    no_cuda: bool = False
    video_path: str = '.'
    # options added by this implementation
    seed: int = 0
    data_path: str | None = None
    fiber_batch: int = 256
    test_fiber_batch: int = 16384
    output_dir: str = '.'
    encoder_weights: str = 'default'
    save_maps: bool = False
    score_norm: str = 'test'
    precision: str = 'fp32'
    compile: bool = False
    cuda_graphs: bool = False
    tta: str = 'none'
    smooth_sigma: float = 0.0
    scale_weights: tuple[float, ...] | None = None
    feature_pool: int | tuple[int, ...] = 1
    train_flips: str = 'none'
    rotation_deg: float = 5.0
    train_jitter: float = 0.0
    adam_mode: str = 'paper'
    run_count: int = 1
    resume: bool = False
    progress: bool = True
    input_size_given: bool = False
    # fixed values of the method
    condition_dim: int = 128
    clamp_alpha: float = 1.9
    lr_warm_epochs: int = 2
    lr_decay_rate: float = 0.1
    aupro_fpr_limit: float = 0.3
    aupro_cflow_thresholds: int = 1000

    @property
    def model_name(self) -> str:
        """``{dataset}_{enc}_{dec}_pl{L}_cb{K}_inp{inp}_run{run}_{class}``, as the original names runs
        (``_fp{k}`` follows ``cb{K}`` when ``--feature-pool`` k > 1, ``_fp{k1}-{k2}-{k3}`` with one k per
        scale, then ``_tr{flips}`` with ``--train-flips``, ``_rot{deg}`` with a ``--rotation-deg`` other than 5
        and ``_jit{f}`` with ``--train-jitter``)."""
        fp = fold_pool_sizes(pool_sizes(self.feature_pool, self.pool_layers))
        pool = '' if fp == 1 else f'_fp{fp}' if isinstance(fp, int) else '_fp' + '-'.join(map(str, fp))
        augment = f'_tr{self.train_flips}' if self.train_flips != 'none' else ''
        augment += f'_rot{self.rotation_deg:g}' if self.rotation_deg != 5.0 else ''
        augment += f'_jit{self.train_jitter:g}' if self.train_jitter else ''
        return (f'{self.dataset}_{self.enc_arch}_{self.dec_arch}_pl{self.pool_layers}_cb{self.coupling_blocks}'
                f'{pool}{augment}_inp{self.input_size}_run{self.run_name}_{self.class_name}')

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='main.py',
        description='CFLOW-AD: unsupervised anomaly detection and localisation with conditional normalizing flows.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    o = p.add_argument_group('options of the original implementation')
    o.add_argument('--dataset', default='mvtec', choices=DATASET_NAMES,
                   help='dataset layout: mvtec (MVTec AD or any folder in its layout), stc (ShanghaiTech Campus), '
                        'mtd (Magnetic Tile Defects), textures (built-in demo, generated offline)')
    o.add_argument('--checkpoint', default='', help='checkpoint file to evaluate with --action-type norm-test')
    o.add_argument('-cl', '--class-name', default='none',
                   help="class (MVTec-layout folder name), STC scene 01..12, 'tile' for mtd, or 'all'")
    o.add_argument('-enc', '--enc-arch', default='wide_resnet50_2', choices=ENCODER_NAMES, help='feature encoder')
    o.add_argument('-dec', '--dec-arch', default='freia-cflow', choices=DECODER_NAMES,
                   help='normalizing-flow decoder: conditional (freia-cflow) or unconditional (freia-flow)')
    o.add_argument('-pl', '--pool-layers', default=3, type=int, choices=(1, 2, 3),
                   help='number of encoder scales L, one decoder each (coarsest kept first)')
    o.add_argument('-cb', '--coupling-blocks', default=8, type=int, help='coupling blocks K per decoder')
    o.add_argument('-run', '--run-name', default=0, type=int, help='run index, used in output names')
    o.add_argument('-inp', '--input-size', default=None, type=int,
                   help=f'square input size in pixels (default {DEFAULT_INPUT_SIZE}; with --class-name all, '
                        'the paper\'s per-class size)')
    o.add_argument('--action-type', default='norm-train', choices=ACTION_TYPES,
                   help='norm-train: train and evaluate; norm-test: evaluate --checkpoint')
    o.add_argument('-bs', '--batch-size', default=32, type=int, help='image batch size')
    o.add_argument('--lr', default=2e-4, type=float, help='base learning rate of Adam')
    o.add_argument('--meta-epochs', default=25, type=int, help='meta-epochs; the test set is scored after each')
    o.add_argument('--sub-epochs', default=8, type=int, help='passes over the training set per meta-epoch')
    o.add_argument('--pro', action='store_true', help='also compute AUPRO (both variants)')
    o.add_argument('--viz', action='store_true', help='write anomaly-map figures and a score histogram to viz/')
    o.add_argument('--workers', default=4, type=int, help='data-loader worker processes')
    o.add_argument('--gpu', default=None, metavar='ID',
                   help='CUDA device id; when given, CUDA is required (default: CUDA 0 if available, else CPU)')
    o.add_argument('--no-cuda', action='store_true', help='run on the CPU')
    o.add_argument('--video-path', default='.', help='unused; kept for command-line compatibility')
    n = p.add_argument_group('options added by this implementation')
    n.add_argument('--seed', default=0, type=int, help='random seed (runs are deterministic for a seed)')
    n.add_argument('--data-path', default=None,
                   help='dataset root (default ./data/MVTec-AD, ./data/STC/shanghaitech, ./data/magnetic_tile, '
                        './data/textures)')
    n.add_argument('--fiber-batch', default=256, type=int, help='fibers per optimizer step (N)')
    n.add_argument('--test-fiber-batch', default=16384, type=int,
                   help='fibers per decoder call at test time (does not change the scores)')
    n.add_argument('--output-dir', default='.', help='results/, weights/ and viz/ are written under this folder')
    n.add_argument('--encoder-weights', default='default', metavar='default|none|PATH',
                   help="encoder weights: 'default' (ImageNet), 'none' (random initialisation) or a local "
                        'state-dict file')
    n.add_argument('--save-maps', action='store_true',
                   help='write anomaly maps, masks, labels, scores and names to results/<model>_maps.npz')
    n.add_argument('--score-norm', default='test', choices=('test', 'train', 'position'),
                   help='how likelihoods become anomaly maps: per-scale normalisation by the test-set maximum '
                        '(test, the paper), by the maximum over the training images (train; scores single '
                        'images), or per-position standardisation against the mean and std of the training '
                        "images' log-likelihood at each position of each scale (position; scores single images)")
    n.add_argument('--precision', default='fp32', choices=('fp32', 'bf16'),
                   help='bf16 runs encoder and flows under autocast; log-determinants and likelihoods stay fp32')
    n.add_argument('--compile', action='store_true',
                   help='compile the encoder, the training step (flows forward and backward) and the evaluation '
                        'forward pass with torch.compile: a one-off cost of about a minute (timing.compile_s), '
                        'then faster training and scoring with the same results to float rounding; on the CPU '
                        'it needs a C++ compiler')
    n.add_argument('--cuda-graphs', action='store_true',
                   help='with --compile on a CUDA device: record each decoder\'s training step (flows forward and '
                        'backward on one fiber batch) once as a CUDA graph and replay it at every step '
                        "(torch.compile's mode 'reduce-overhead'), instead of launching its many small kernels "
                        'one by one; the same arithmetic; on the CPU it changes nothing')
    n.add_argument('--tta', default='none', choices=('none', 'hflip', 'flips'),
                   help='test-time augmentation: score each image also mirrored left-right (hflip) or mirrored '
                        'left-right, upside down and both (flips), map the log-likelihoods back and average '
                        'them; costs 2x or 4x the test forward pass, training is unchanged')
    n.add_argument('--smooth-sigma', default=0.0, type=float, metavar='SIGMA',
                   help='Gaussian smoothing of each anomaly map (standard deviation in input pixels, mirror '
                        'padding) before the image score and the pixel metrics, as PatchCore and anomalib do; '
                        '0 (default) = none, as the paper; test time only')
    n.add_argument('--scale-weights', default=None, type=float, nargs='+', metavar='W',
                   help='weight of each scale in the sum that makes the anomaly map, one per scale, finest first '
                        '(e.g. 1 1 0 leaves the coarsest scale out of the maps); non-negative, not all zero; '
                        'default: all 1, as the paper; test time only')
    n.add_argument('--feature-pool', default=[1], type=int, nargs='+', metavar='K',
                   help='average each encoder feature map over K x K neighbourhoods (stride 1, same size; at '
                        'the borders over the positions inside the map) before the flows, in training and '
                        'testing: each fiber then describes its neighbourhood; odd K, 1 (default) = off, as '
                        'the paper; one K for every scale or one per scale, finest first (e.g. 1 3 3)')
    n.add_argument('--train-flips', default='none', choices=FLIP_CHOICES,
                   help='training augmentation on top of the original ±5° rotation: mirror each training image '
                        'left-right (hflip) or left-right and upside down (flips), each with probability 1/2; '
                        'for subjects whose mirror images are normal too (textures, tiles); none (default) = '
                        'the paper')
    n.add_argument('--rotation-deg', default=5.0, type=float, metavar='DEG',
                   help='training augmentation: rotate each training image by a random angle in [-DEG, DEG] '
                        '(nearest neighbour, black corners), 5 (default) as the paper; 0 = no rotation, for '
                        'subjects whose corners and edges matter or whose orientation is fixed')
    n.add_argument('--train-jitter', default=0.0, type=float, metavar='F',
                   help='training augmentation: scale the brightness and the contrast of each training image by '
                        'random factors in [1-F, 1+F]; for subjects photographed under varying light; 0 '
                        '(default) = none, as the paper')
    n.add_argument('--adam-mode', default='paper', choices=('paper', 'torch2'),
                   help='paper: one Adam over all decoders whose idle decoders keep moving on their momentum '
                        '(PyTorch 1.8 zero_grad, as the paper ran); torch2: idle decoders are not updated')
    n.add_argument('--run-count', default=1, type=int,
                   help='with --class-name all: runs per class (run indices start at --run-name)')
    n.add_argument('--resume', action='store_true',
                   help='continue an interrupted norm-train run from weights/<model>.pt')
    n.add_argument('--no-progress', dest='progress', action='store_false', help='hide progress bars')
    return p


def parse_config(argv: list[str] | None = None) -> Config:
    """Parse the command line into a :class:`Config` (argparse exits with status 2 on bad options)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = vars(args)
    positive = ('coupling_blocks', 'batch_size', 'meta_epochs', 'sub_epochs', 'fiber_batch', 'test_fiber_batch',
                'run_count')
    for name in positive:
        if values[name] < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1, got {values[name]}')
    pools = values['feature_pool']
    if any(k < 1 or k % 2 == 0 for k in pools):
        parser.error(f'--feature-pool must be odd numbers of at least 1, got {" ".join(map(str, pools))}')
    if len(pools) not in (1, values['pool_layers']):
        parser.error(f'--feature-pool takes one K or one per scale ({values["pool_layers"]} with -pl '
                     f'{values["pool_layers"]}), got {len(pools)}')
    values['feature_pool'] = fold_pool_sizes(pools)
    if values['cuda_graphs'] and not values['compile']:
        parser.error('--cuda-graphs records the compiled training step: add --compile')
    if not 0 <= values['smooth_sigma'] < math.inf:
        parser.error(f'--smooth-sigma must be finite and 0 or more, got {values["smooth_sigma"]}')
    weights = values['scale_weights']
    if weights is not None:
        if len(weights) != values['pool_layers']:
            parser.error(f'--scale-weights takes one weight per scale ({values["pool_layers"]} with -pl '
                         f'{values["pool_layers"]}), got {len(weights)}')
        try:
            values['scale_weights'] = scale_weights(weights, len(weights))
        except ValueError:
            parser.error('--scale-weights must be finite, 0 or more and not all 0, got '
                         + ' '.join(map(str, weights)))
    if not 0 <= values['rotation_deg'] <= 180:
        parser.error(f'--rotation-deg must be between 0 and 180, got {values["rotation_deg"]}')
    if not 0 <= values['train_jitter'] < 1:
        parser.error(f'--train-jitter must be at least 0 and below 1, got {values["train_jitter"]}')
    if values['workers'] < 0:
        parser.error('--workers must be 0 or more')
    if values['lr'] <= 0:
        parser.error('--lr must be positive')
    given = values['input_size'] is not None
    if given and values['input_size'] < 32:
        parser.error(f'--input-size must be at least 32 pixels, got {values["input_size"]}')
    values['input_size'] = values['input_size'] if given else DEFAULT_INPUT_SIZE
    values['input_size_given'] = given
    return Config(**values)
