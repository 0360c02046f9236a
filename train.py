"""Training and evaluation of CFLOW-AD: the fiber loop, test-set scoring and metrics."""
from __future__ import annotations

import contextlib
import math
import random
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import Config, pool_sizes
from custom_models.encoders import Encoder
from custom_models.flow import (condition_fibers, condition_tables, fiber_log_prob, fiber_loss, flatten_fibers,
                                grid_log_prob, positional_encoding_2d)
from utils import metrics
from utils.optim import DecoderAdam
from utils.schedule import cosine_lr, learning_rate
from utils.scoring import (MapChunks, anomaly_map_chunks, image_scores, layer_maxima, position_map_chunks,
                           position_stats, smoothed_map_chunks)

METRIC_NAMES = ('image_auroc', 'pixel_auroc', 'aupro', 'aupro_cflow')


def set_seed(seed: int, cuda: bool) -> None:
    """Seed python, numpy and torch (CPU and CUDA), and ask torch for deterministic kernels where it can."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if cuda:
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def rng_state(loader_generator: torch.Generator | None) -> dict:
    """Every random state a run draws from (Python, numpy, torch, CUDA, the training loader's generator)."""
    return {'torch': torch.get_rng_state(), 'numpy': np.random.get_state()[1].tolist(),
            'numpy_pos': int(np.random.get_state()[2]), 'python': list(random.getstate()[1]),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'loader': loader_generator.get_state() if loader_generator is not None else None}


def restore_rng_state(state: dict, loader_generator: torch.Generator | None) -> None:
    """Put back what :func:`rng_state` returned."""
    torch.set_rng_state(state['torch'])
    np.random.set_state(('MT19937', np.asarray(state['numpy'], dtype=np.uint32), state['numpy_pos'], 0, 0.0))
    random.setstate((3, tuple(state['python']), None))
    if state.get('cuda') and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    if loader_generator is not None and state.get('loader') is not None:
        loader_generator.set_state(state['loader'])


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def autocast(device: torch.device, precision: str):
    """bf16 autocast context for ``--precision bf16``; a no-op for fp32."""
    if precision == 'bf16':
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


TEST_ENCODER_CHUNK = 8  # images per encoder call at test time on the CPU (bounds its activation memory)
CUDA_ENCODER_CHUNK = 32  # the same on a CUDA device, where small calls leave the GPU idle


def encoder_chunk(device: torch.device) -> int:
    """Images per encoder call at test time (and per compiled encoder call in training) on ``device``."""
    return CUDA_ENCODER_CHUNK if device.type == 'cuda' else TEST_ENCODER_CHUNK


class PositionCache:
    """Positional encodings per feature-map shape, built once and kept on the device."""

    def __init__(self, condition_dim: int, device: torch.device):
        self.condition_dim = condition_dim
        self.device = device
        self._cache: dict[tuple[int, int], Tensor] = {}

    def __call__(self, height: int, width: int) -> Tensor:
        key = (height, width)
        if key not in self._cache:
            self._cache[key] = positional_encoding_2d(self.condition_dim, height, width).to(self.device)
        return self._cache[key]


@dataclass
class TrainState:
    """What changes during training and is saved for resuming."""
    epoch: int = -1  # last finished meta-epoch
    history: list[dict] = field(default_factory=list)
    sub_epoch_s: list[float] = field(default_factory=list)
    train_images: int = 0
    train_seconds: float = 0.0


def make_optimizer(decoders, lr: float, adam_mode: str = 'paper') -> DecoderAdam:
    """One Adam over the trainable parameters of all decoders (the fixed rotations are left out), stepped
    one decoder at a time; ``adam_mode`` as ``--adam-mode`` (see :class:`utils.optim.DecoderAdam`)."""
    return DecoderAdam(decoders, lr, adam_mode)


def set_lr(optimizer: DecoderAdam, lr: float) -> None:
    for group in optimizer.param_groups:
        group['lr'] = lr


def fiber_batch_losses(decoder, fibers: Tensor, conds: Tensor | None) -> Tensor:
    """The forward pass of one training step: per-fiber losses (n,) of one fiber batch."""
    return fiber_loss(fiber_log_prob(decoder, fibers, conds))


def train_layer_fibers(decoders, index: int, optimizer: DecoderAdam, fibers: Tensor, conds: Tensor | None,
                       fiber_batch: int, cfg: Config, device: torch.device,
                       step=fiber_batch_losses) -> tuple[float, int]:
    """One pass of fiber batches of decoder ``decoders[index]`` over one scale's fibers of one image batch.

    The fibers of all images and positions are shuffled together and cut into batches of
    ``fiber_batch`` (the remainder is dropped); each batch is one Adam step. ``step`` is
    :func:`fiber_batch_losses` or its compiled form. Returns the summed loss and the number of fibers used.
    """
    decoder = decoders[index]
    steps = fibers.shape[0] // fiber_batch
    perm = torch.randperm(fibers.shape[0], device=device)[:steps * fiber_batch]
    fibers = fibers[perm]  # shuffled once: each step takes a contiguous slice
    conds = conds[perm] if conds is not None else None
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
    used = 0
    optimizer.begin(index)
    for f in range(steps):
        sl = slice(f * fiber_batch, (f + 1) * fiber_batch)
        with autocast(device, cfg.precision):
            loss = step(decoder, fibers[sl], conds[sl] if conds is not None else None)
        loss.mean().backward()
        optimizer.step(index)
        total += loss.detach().sum()
        used += fiber_batch
    return float(total), used


def train_meta_epoch(cfg: Config, epoch: int, encoder: Encoder, decoders, optimizer, loader: DataLoader,
                     positions: PositionCache, device: torch.device, state: TrainState) -> float:
    """Train all decoders for ``sub_epochs`` passes over the training set; returns the mean fiber loss."""
    for d in decoders:
        d.train()
    batches = len(loader)
    total_batches = batches * cfg.sub_epochs
    set_lr(optimizer, cosine_lr(cfg.lr, epoch, cfg.meta_epochs, cfg.lr_decay_rate))
    lr = optimizer.param_groups[0]['lr']
    last_loss = float('nan')
    step = training_step(cfg, encoder)
    for sub in range(cfg.sub_epochs):
        start = time.perf_counter()
        loss_sum, fiber_count, images = 0.0, 0, 0
        bar = tqdm(loader, desc=f'train {epoch}.{sub}', leave=False, disable=not cfg.progress, unit='batch')
        for i, (image, _, _, _) in enumerate(bar):
            lr = learning_rate(cfg.lr, epoch, i + sub * batches, total_batches, cfg.meta_epochs,
                               cfg.lr_warm_epochs, cfg.lr_decay_rate) if epoch < cfg.lr_warm_epochs else lr
            set_lr(optimizer, lr)
            with torch.no_grad():
                features = encode_batch(cfg, encoder, image, device)
            for index, feat in enumerate(features):
                feat = feat.float()
                fibers = flatten_fibers(feat)
                conds = condition_fibers(positions(feat.shape[2], feat.shape[3]), feat.shape[0])
                s, n = train_layer_fibers(decoders, index, optimizer, fibers, conds, cfg.fiber_batch, cfg, device,
                                          step)
                loss_sum += s
                fiber_count += n
            images += image.shape[0]
            bar.set_postfix(loss=f'{loss_sum / max(fiber_count, 1):.4f}', lr=f'{lr:.2e}')
        optimizer.flush()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        state.sub_epoch_s.append(seconds)
        state.train_images += images
        state.train_seconds += seconds
        last_loss = loss_sum / max(fiber_count, 1)
        print(f'Epoch: {epoch}.{sub} \t train loss: {last_loss:.4f}, lr={lr:.6f}', flush=True)
    return last_loss


@dataclass
class EvalOutput:
    """Per-scale log-likelihoods of an image set and what the metrics need."""
    log_probs: list[Tensor]  # per scale (N, H_l, W_l) float32, per-dimension log-likelihood
    labels: np.ndarray  # (N,) int
    masks: np.ndarray | None  # (N, S, ceil(S / 8)) uint8, np.packbits of the bool masks along the width
    mask_valid: np.ndarray  # (N,) bool
    loss: float
    forward_s: float

    def mask_chunk(self, start: int, stop: int) -> np.ndarray:
        """The (stop - start, S, S) bool masks of images start..stop-1."""
        size = self.masks.shape[1]
        return np.unpackbits(self.masks[start:stop], axis=-1, count=size).astype(bool)


_COMPILED: dict = {}  # with --compile: the current encoder and mode, the encoder's compiled form, grid scoring, step


def _compiled(encoder: Encoder, cuda_graphs: bool = False) -> dict:
    """The compiled passes for ``encoder``: its compiled form (frozen weights folded in), a compiled
    :func:`grid_log_prob` and a compiled :func:`fiber_batch_losses` (forward and backward; decoder weights
    stay inputs, so each step sees the current weights). With ``cuda_graphs`` (``--cuda-graphs``) the training
    step is compiled with mode ``'reduce-overhead'``: on CUDA each decoder's step is recorded once as a CUDA
    graph and replayed (see :func:`graphed_step`); elsewhere that mode compiles as the default one.

    Built once per encoder and mode; a new encoder (the next class of ``--class-name all``) drops the previous
    graphs first, so they neither pile up nor reach torch's recompilation limit.
    """
    if _COMPILED.get('encoder') is not encoder or _COMPILED.get('cuda_graphs') != cuda_graphs:
        _COMPILED.clear()
        torch._dynamo.reset()
        mode = 'reduce-overhead' if cuda_graphs else None
        _COMPILED.update(encoder=encoder, cuda_graphs=cuda_graphs,
                         encode=torch.compile(encoder, dynamic=False, options={'freezing': True}),
                         grid=torch.compile(grid_log_prob, dynamic=False),
                         step=torch.compile(fiber_batch_losses, dynamic=False, mode=mode))
    return _COMPILED


def graphed_step(compiled_step):
    """``compiled_step`` (compiled with mode ``'reduce-overhead'``) with a new CUDA-graph step marked before
    each call: the previous step's outputs (its losses, its gradients, already used by then) may then be
    overwritten by the replay instead of being kept alive by a new recording."""
    def step(decoder, fibers: Tensor, conds: Tensor | None) -> Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled_step(decoder, fibers, conds)
    return step


def training_step(cfg: Config, encoder: Encoder):
    """The training step that ``cfg`` asks for: eager, compiled, or compiled and replayed as CUDA graphs."""
    if not cfg.compile:
        return fiber_batch_losses
    step = _compiled(encoder, cfg.cuda_graphs)['step']
    return graphed_step(step) if cfg.cuda_graphs else step


def pool_features(features: list[Tensor], k: int | Sequence[int]) -> list[Tensor]:
    """Each B x C x H x W map averaged over k x k neighbourhoods (``--feature-pool``): stride 1, the same
    size, and at the borders the mean of the positions inside the map. ``k`` is one size for every map or one
    per map; a map with ``k = 1`` is returned as it is."""
    return [f if k == 1 else F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
            for f, k in zip(features, pool_sizes(k, len(features)), strict=True)]


def _encode_chunk(cfg: Config, encoder: Encoder, chunk: Tensor, device: torch.device) -> list[Tensor]:
    """Features of at most :func:`encoder_chunk` images (pooled by ``--feature-pool``). With ``--compile``
    they come from the compiled encoder, and a short chunk is padded with zero images so that it always sees
    the same shape: the features then hold :func:`encoder_chunk` images, the padding last."""
    encode = encoder
    if cfg.compile:
        encode = _compiled(encoder, cfg.cuda_graphs)['encode']
        size = encoder_chunk(device)
        if chunk.shape[0] < size:
            chunk = torch.cat([chunk, chunk.new_zeros((size - chunk.shape[0], *chunk.shape[1:]))])
    with autocast(device, cfg.precision):
        return pool_features(encode(chunk.to(device, non_blocking=True)), cfg.feature_pool)


def encode_batch(cfg: Config, encoder: Encoder, image: Tensor, device: torch.device) -> list[Tensor]:
    """Features of a training batch (pooled by ``--feature-pool``): one encoder call, or with ``--compile``
    chunks of :func:`encoder_chunk` images through the compiled encoder (BatchNorm is frozen, so every
    image's features are its own either way)."""
    if not cfg.compile:
        with autocast(device, cfg.precision):
            return pool_features(encoder(image.to(device, non_blocking=True)), cfg.feature_pool)
    parts = [[f[:chunk.shape[0]] for f in _encode_chunk(cfg, encoder, chunk, device)]
             for chunk in image.split(encoder_chunk(device))]
    return [torch.cat(scale) for scale in zip(*parts)]


def _feature_log_probs(cfg: Config, decoder, feat: Tensor, table: list[Tensor] | None, device: torch.device,
                       score=grid_log_prob) -> Tensor:
    """Per-dimension log-likelihood of every fiber of one scale's feature maps (B x C x H x W), in
    (b, h, w) order; whole images go through the decoder at once, ``--test-fiber-batch`` fibers or one
    image per call, whichever is more; ``score`` is :func:`grid_log_prob` or its compiled form."""
    grid = feat.shape[2] * feat.shape[3]
    fibers = flatten_fibers(feat.float())
    out = torch.empty(fibers.shape[0], device=device)
    step = max(1, cfg.test_fiber_batch // grid) * grid
    for s in range(0, fibers.shape[0], step):
        sl = slice(s, s + step)
        with autocast(device, cfg.precision):
            out[sl] = score(decoder, fibers[sl], table)
    return out


def _chunk_log_probs(cfg: Config, encoder: Encoder, decoders, chunk: Tensor, tables: list,
                     positions: PositionCache, device: torch.device) -> list[Tensor]:
    """Per-scale (b, H_l, W_l) log-likelihoods of one chunk of at most :func:`encoder_chunk` images.

    ``tables`` caches each decoder's :func:`condition_tables` (filled on first use). With ``--compile`` a
    short chunk is padded with zero images, so the compiled code always sees the same shapes.
    """
    b = chunk.shape[0]
    features = _encode_chunk(cfg, encoder, chunk, device)
    score = _compiled(encoder, cfg.cuda_graphs)['grid'] if cfg.compile else grid_log_prob
    out = []
    for layer, (decoder, feat) in enumerate(zip(decoders, features)):
        if tables[layer] is None:
            tables[layer] = condition_tables(decoder, positions(feat.shape[2], feat.shape[3]))
        lp = _feature_log_probs(cfg, decoder, feat, tables[layer], device, score)
        out.append(lp.view(feat.shape[0], feat.shape[2], feat.shape[3])[:b])
    return out


# --tta: the flips applied to each test image, as dimensions of the image (and of the log-likelihood grids)
TTA_FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {
    'none': ((),),
    'hflip': ((), (-1,)),
    'flips': ((), (-1,), (-2,), (-2, -1)),
}


def _augmented_log_probs(cfg: Config, encoder: Encoder, decoders, chunk: Tensor, tables: list,
                         positions: PositionCache, device: torch.device) -> list[Tensor]:
    """:func:`_chunk_log_probs` averaged over the ``--tta`` flips: each flipped chunk is scored, its grids
    are flipped back, and the per-dimension log-likelihoods are averaged position by position."""
    flips = TTA_FLIPS[cfg.tta]
    total: list[Tensor] | None = None
    for dims in flips:
        outs = _chunk_log_probs(cfg, encoder, decoders, chunk.flip(dims) if dims else chunk, tables, positions,
                                device)
        if dims:
            outs = [o.flip(dims) for o in outs]
        total = outs if total is None else [t + o for t, o in zip(total, outs)]
    return total if len(flips) == 1 else [t / len(flips) for t in total]


def compile_model(cfg: Config, encoder: Encoder, decoders, positions: PositionCache, device: torch.device,
                  training: bool) -> float | None:
    """With ``--compile``: compile the evaluation forward pass now, on one chunk of zero images, and with
    ``training`` each decoder's training step (forward and backward on one fiber batch of zeros, gradients
    dropped afterwards: no weight, optimizer state or random state changes; with ``--cuda-graphs`` twice, so
    that each step's CUDA graph is recorded here), so that neither evaluation nor training pays for it.
    Returns the seconds this took (None without ``--compile``)."""
    if not cfg.compile:
        return None
    start = time.perf_counter()
    rng = rng_state(None)
    for d in decoders:
        d.eval()
    chunk = torch.zeros(encoder_chunk(device), 3, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        _chunk_log_probs(cfg, encoder, decoders, chunk, [None] * len(decoders), positions, device)
    if training:
        step = training_step(cfg, encoder)
        conds = torch.zeros(cfg.fiber_batch, cfg.condition_dim, device=device)  # as in training, always given
        for decoder in decoders:
            decoder.train()
            fibers = torch.zeros(cfg.fiber_batch, decoder.shapes[0][0], device=device)
            for _ in range(2 if cfg.cuda_graphs else 1):  # CUDA graphs: a warm-up call, then the recording
                with autocast(device, cfg.precision):
                    loss = step(decoder, fibers, conds)
                loss.mean().backward()
                for p in decoder.parameters():
                    p.grad = None
    restore_rng_state(rng, None)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def infer_log_probs(cfg: Config, encoder: Encoder, decoders, loader: DataLoader, positions: PositionCache,
                    device: torch.device, collect_masks: bool, desc: str) -> EvalOutput:
    """Per-dimension log-likelihood of every fiber of every image, without grad.

    Whole images go through a decoder at once (``--test-fiber-batch`` fibers or one image, whichever is
    more), with the positional condition's share of each subnet computed once per grid; with ``--tta`` each
    image's grids are the average over its flips.
    """
    for d in decoders:
        d.eval()
    n_images = len(loader.dataset)
    log_probs: list[Tensor] | None = None
    labels = np.zeros(n_images, dtype=np.int64)
    valid = np.zeros(n_images, dtype=bool)
    packed_width = (cfg.input_size + 7) // 8
    masks = np.zeros((n_images, cfg.input_size, packed_width), dtype=np.uint8) if collect_masks else None
    loss_sum, loss_count, offset = 0.0, 0, 0
    tables: list = [None] * len(decoders)
    start = time.perf_counter()
    with torch.no_grad():
        for image, label, mask, mask_valid in tqdm(loader, desc=desc, leave=False, disable=not cfg.progress,
                                                   unit='batch'):
            n = image.shape[0]
            labels[offset:offset + n] = label.numpy()
            valid[offset:offset + n] = mask_valid.numpy()
            if masks is not None:
                masks[offset:offset + n] = np.packbits(mask[:, 0].numpy() > 0.5, axis=-1)
            for chunk in image.split(encoder_chunk(device)):  # bounds the encoder's activation memory
                b = chunk.shape[0]
                outs = _augmented_log_probs(cfg, encoder, decoders, chunk, tables, positions, device)
                if log_probs is None:
                    log_probs = [torch.empty(n_images, o.shape[1], o.shape[2]) for o in outs]
                for layer, out in enumerate(outs):
                    loss_sum += float(fiber_loss(out).sum())
                    loss_count += out.numel()
                    log_probs[layer][offset:offset + b] = out.cpu()
                offset += b
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return EvalOutput(log_probs=log_probs, labels=labels, masks=masks, mask_valid=valid,
                      loss=loss_sum / max(loss_count, 1), forward_s=time.perf_counter() - start)


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


SCORING_CHUNK_PIXELS = 1 << 20  # anomaly-map pixels made at a time when scoring (bounds its memory)


def measure(maps: MapChunks, out: EvalOutput, out_size: int, defect_types: list[str], pro: bool,
            fpr_limit: float, cflow_thresholds: int) -> dict:
    """Image scores, metrics (in percent; None when undefined) and per-defect metrics of one scored set.

    The anomaly maps are made a chunk of images at a time, once per pass of
    :class:`utils.metrics.PixelMetrics` (usually two), so that memory grows with the number of images only
    through the feature-resolution log-likelihoods and the packed masks. Per defect type, the metrics count
    that type's images and all normal images. Returns a dict with ``scores``, ``metrics``, ``per_defect``,
    ``pixel_threshold`` (the F1-optimal map threshold over the valid images: test-selected, for figures),
    ``map_range`` (smallest and largest map value), ``passes`` (how many times the maps were made) and
    ``seconds`` (work specific to each AUPRO variant).
    """
    labels = out.labels
    n = len(labels)
    types = np.asarray(defect_types)
    kinds = sorted(set(defect_types) - {'good'})
    normal = labels == 0
    pixel = None
    if out.masks is not None and out.mask_valid.any():
        subsets = {'': out.mask_valid, **{k: out.mask_valid & (normal | (types == k)) for k in kinds}}
        pixel = metrics.PixelMetrics(n, subsets, pro, fpr_limit, cflow_thresholds, metrics.MAX_DEFECT_PIXELS)
    scores = np.empty(n, dtype=np.float64)
    low, high = math.inf, -math.inf
    step = max(1, SCORING_CHUNK_PIXELS // (out_size * out_size))
    sweep = 0
    while sweep == 0 or (pixel is not None and not pixel.done):
        for start in range(0, n, step):
            stop = min(start + step, n)
            chunk = maps(start, stop)
            if sweep == 0:
                scores[start:stop] = image_scores(chunk).numpy()
                low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
            if pixel is not None:
                pixel.add(np.arange(start, stop), chunk.numpy(), out.mask_chunk(start, stop))
        if pixel is not None:
            pixel.end_pass()
        sweep += 1

    def values(name: str, selected: np.ndarray) -> dict:
        result = {'image_auroc': _pct(metrics.image_auroc(labels[selected], scores[selected])),
                  'pixel_auroc': None, 'aupro': None, 'aupro_cflow': None}
        if pixel is not None:
            result['pixel_auroc'] = _pct(pixel.pixel_auroc(name))
            if pro:
                result['aupro'] = _pct(pixel.aupro(name))
                result['aupro_cflow'] = _pct(pixel.aupro_cflow(name))
        return result

    result = values('', np.ones(n, dtype=bool))
    per_defect = {k: {'n_images': int((types == k).sum()), **values(k, normal | (types == k))} for k in kinds}
    return {'scores': scores, 'metrics': result, 'per_defect': per_defect,
            'pixel_threshold': pixel.f1_threshold('') if pixel is not None else None,
            'map_range': (low, high), 'passes': sweep,
            'seconds': dict(pixel.seconds) if pixel is not None else {'aupro': 0.0, 'aupro_cflow': 0.0}}


@dataclass
class Evaluation:
    """Scores and metrics of one evaluation of the test set; maps and masks are made on request."""
    metrics: dict
    per_defect: dict
    test_loss: float
    scores: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    timing: dict
    maps: MapChunks  # maps(start, stop) -> (n, S, S) float32 tensor
    masks: Callable[[int, int], np.ndarray]  # masks(start, stop) -> (n, S, S) bool
    pixel_threshold: float | None  # F1-optimal map threshold over the valid images (test-selected)
    map_range: tuple[float, float]  # smallest and largest map value


def evaluate(cfg: Config, encoder: Encoder, decoders, test_loader: DataLoader, positions: PositionCache,
             device: torch.device, reference: list | None) -> Evaluation:
    """Score the test set and compute all metrics; timings are measured on the way.

    ``reference`` comes from :func:`train_reference` (None for ``--score-norm test``)."""
    start = time.perf_counter()
    out = infer_log_probs(cfg, encoder, decoders, test_loader, positions, device, True, 'test')
    t = time.perf_counter()
    maps = score_map_chunks(cfg.score_norm, out.log_probs, cfg.input_size, reference, cfg.scale_weights)
    maps = smoothed_map_chunks(maps, cfg.smooth_sigma)
    scored = measure(maps, out, cfg.input_size, test_loader.dataset.defect_types, cfg.pro, cfg.aupro_fpr_limit,
                     cfg.aupro_cflow_thresholds)
    end = time.perf_counter()
    aupro_s = scored['seconds']['aupro'] if cfg.pro else None
    aupro_cflow_s = scored['seconds']['aupro_cflow'] if cfg.pro else None
    n = len(out.labels)
    timing = {'aupro_s': aupro_s, 'aupro_cflow_s': aupro_cflow_s, 'test_forward_s': out.forward_s,
              'test_images_per_s': n / out.forward_s if out.forward_s > 0 else None,
              'scoring_s': end - t - (aupro_s or 0.0) - (aupro_cflow_s or 0.0), 'eval_s': end - start}
    heights = [lp.shape[1] for lp in out.log_probs]
    widths = [lp.shape[2] for lp in out.log_probs]
    print(f'Heights/Widths {heights} {widths}', flush=True)
    return Evaluation(metrics=scored['metrics'], per_defect=scored['per_defect'], test_loss=out.loss,
                      scores=scored['scores'], labels=out.labels, valid=out.mask_valid, timing=timing, maps=maps,
                      masks=out.mask_chunk, pixel_threshold=scored['pixel_threshold'], map_range=scored['map_range'])


def score_map_chunks(score_norm: str, log_probs: list[Tensor], out_size: int, reference: list | None,
                     weights: Sequence[float] | None = None) -> MapChunks:
    """Anomaly maps under ``--score-norm``, a range of images at a time: 'test' and 'train' as
    :func:`utils.scoring.anomaly_maps` (with the test-set or the given training maxima), 'position' as
    :func:`utils.scoring.position_maps`; ``weights`` (``--scale-weights``) weight the sum over scales."""
    if score_norm == 'position':
        if reference is None:
            raise ValueError("--score-norm position needs the training images' position statistics")
        return position_map_chunks(log_probs, reference, out_size, weights=weights)
    return anomaly_map_chunks(log_probs, out_size, None if score_norm == 'test' else reference, weights=weights)


def train_reference(cfg: Config, encoder: Encoder, decoders, train_eval_loader: DataLoader,
                    positions: PositionCache, device: torch.device) -> list:
    """What ``--score-norm`` needs from the training images (without augmentation): per-scale maxima of the
    log-likelihood ('train') or its per-position mean and std ('position')."""
    out = infer_log_probs(cfg, encoder, decoders, train_eval_loader, positions, device, False, 'train stats')
    if cfg.score_norm == 'position':
        return position_stats(out.log_probs)
    return layer_maxima(out.log_probs)


class BestTracker:
    """Best value of each metric over epochs and the epoch it was reached (first one on ties)."""

    def __init__(self, names=METRIC_NAMES):
        self.value: dict[str, float | None] = {n: None for n in names}
        self.epoch: dict[str, int | None] = {n: None for n in names}

    def update(self, epoch: int, values: dict) -> None:
        for name in self.value:
            v = values.get(name)
            if v is not None and (self.value[name] is None or v > self.value[name]):
                self.value[name], self.epoch[name] = v, epoch

    def as_dict(self) -> dict:
        return {'epoch': dict(self.epoch), **self.value}

    @classmethod
    def from_history(cls, history: list[dict]) -> BestTracker:
        tracker = cls()
        for row in history:
            tracker.update(row['epoch'], row)
        return tracker


def format_metric(v: float | None) -> str:
    return '–' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:.2f}'
