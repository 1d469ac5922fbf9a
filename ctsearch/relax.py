"""RELAX: which pixels a representation depends on (Wickstrøm et al.), batched.

Random smooth masks hide parts of the (windowed) image; a pixel is important when hiding it
makes the masked representation unlike the unmasked one. With masks M_n in [0, 1] and
s_n = cosine(h, f(x * M_n)):

    importance R = sum_n s_n M_n / sum_n M_n          (mask-weighted mean of s, per pixel)
    uncertainty U = sum_n M_n (s_n - R)^2 / (W - 1)   (W = sum_n M_n; West's estimator as in the reference)

The reference updates R and U with a Python loop over every mask; here each batch of masks is
folded in with two tensor contractions (shifted weighted sums, so float32 keeps its precision),
which gives the same maps (docs/benchmarks.md, bench/relax.py). Pair explanations replace h by
another representation (``target=``): which parts of the query make it look like a retrieved slice.

Example:
    >>> import torch
    >>> from ctsearch.config import ModelConfig
    >>> from ctsearch.model import build_encoder
    >>> enc = build_encoder(ModelConfig(backbone="tiny", image_size=32)).eval()
    >>> res = relax(enc, torch.rand(3, 32, 32), num_masks=64, batch_size=32, seed=0)
    >>> res.importance.shape, res.uncertainty.shape, res.masks_used
    ((32, 32), (32, 32), 64)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctsearch.errors import CTSearchInputError

# Initial sum of weights in the reference's running mean; keeps never-covered pixels at R = 0.
_W0 = 1e-10


@dataclass
class RelaxResult:
    """RELAX maps for one image ([S, S]) or a stack ([n, S, S]), float32 numpy."""

    importance: np.ndarray
    uncertainty: np.ndarray
    masks_used: int


class MaskSampler:
    """The reference's masks: a grid x grid Bernoulli(p) grid (kept where rand < p), upsampled
    bilinearly to the image size, reflect-padded by grid // 2 and cropped at a random shift.

    Every random number is drawn up front from one seeded generator, so mask n is the same
    whatever the batch size. ``sample(start, stop)`` -> float32 [stop - start, S, S].
    """

    def __init__(self, num_masks: int, size: int, grid: int = 7, p: float = 0.5, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.size, self.grid, self.pad = size, grid, grid // 2
        self.cells = (torch.rand(num_masks, 1, grid, grid, generator=g) < p).float()
        # 0..grid-1 like the reference, never beyond the reflect padding.
        hi = min(grid, 2 * self.pad + 1)
        self.shifts = torch.randint(0, hi, (num_masks, 2), generator=g)

    def __len__(self) -> int:
        return self.cells.shape[0]

    def sample(self, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
        cells = self.cells[start:stop].to(device)
        up = F.interpolate(
            cells, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
        )
        up = F.pad(up, (self.pad,) * 4, mode="reflect")[:, 0]
        sh = self.shifts[start:stop].to(device)
        ar = torch.arange(self.size, device=device)
        rows = (sh[:, 0, None] + ar)[:, :, None]
        cols = (sh[:, 1, None] + ar)[:, None, :]
        return up[torch.arange(len(up), device=device)[:, None, None], rows, cols]


def make_masks(num_masks: int, size: int, grid: int = 7, p: float = 0.5, seed: int = 0) -> torch.Tensor:
    """All masks at once, float32 [num_masks, size, size] (for ``relax(masks=...)`` and cross-checks)."""
    return MaskSampler(num_masks, size, grid, p, seed).sample(0, num_masks)


class _Accumulator:
    """Mask-weighted mean and variance of per-mask scores, per pixel, merged batch by batch.

    Sums are taken of s - c with c the first batch's mean score: s varies little around c, so the
    variance sum S2 - S1^2 / W does not cancel catastrophically in float32.
    """

    def __init__(self, n: int, size: int, device: torch.device):
        z = lambda: torch.zeros(n, size, size, dtype=torch.float64, device=device)  # noqa: E731
        self.w, self.s1, self.s2 = z(), z(), z()
        self.c: torch.Tensor | None = None

    def add(self, sims: torch.Tensor, masks: torch.Tensor) -> None:
        """sims [n, b] float32, masks [b, S, S] float32 (the same masks for every image)."""
        if self.c is None:
            self.c = sims.mean(dim=1).double()
        d = sims - self.c.float()[:, None]
        flat = masks.reshape(masks.shape[0], -1)
        shape = self.w.shape
        self.w += flat.sum(0).double().reshape(shape[1:])
        self.s1 += (d @ flat).double().reshape(shape)
        self.s2 += ((d * d) @ flat).double().reshape(shape)

    def importance(self) -> torch.Tensor:
        return (self.c[:, None, None] * self.w + self.s1) / (self.w + _W0)

    def uncertainty(self) -> torch.Tensor:
        m2 = self.s2 - self.s1**2 / torch.clamp(self.w, min=_W0)
        return torch.clamp(m2, min=0.0) / (self.w + _W0 - 1.0)


def _device_of(encoder: nn.Module) -> torch.device:
    p = next(iter(encoder.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


Precision = Literal["auto", "float32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> bf16 on CUDA, float32 on a CPU; bf16 on a CPU only where it has bf16 instructions.

    On a CPU bf16 is opt-in: the maps move by about 1 % of their range (docs/benchmarks.md, RELAX).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        return "bf16" if cuda else "float32"
    if precision == "bf16" and not cuda and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise CTSearchInputError(
            None,
            "--precision bf16 needs a CPU with bf16 instructions (avx512_bf16 or AMX); this one has none",
        )
    return precision


def _embed(
    encoder: nn.Module, x: torch.Tensor, channels_last: bool = True, precision: str = "auto"
) -> torch.Tensor:
    """Representations in float32, computed in ``precision`` (bf16 through autocast).

    channels_last input lets oneDNN (CPU) and cuDNN (GPU) pick their fast NHWC convolutions
    (about 1.5-2x on CPU for these ResNets) without touching the caller's encoder weights.
    """
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if resolve_precision(precision, x.device) == "bf16":
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return encoder(x).float()
    return encoder(x).float()


_FAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # encoder -> (its state, folded copy)


def _fast_encoder(encoder: nn.Module) -> nn.Module:
    """``encoder`` with its BatchNorm folded into its convolutions (``ctsearch.model.fold_batchnorm``:
    1.1x for ResNet50 on a CPU, float32 and bf16 alike). Made once per encoder and kept while its
    weights and statistics are unchanged (an optimizer step bumps their versions).

    The grey-input copy the embedding actor runs is not used here: with channels_last batches a
    one-channel first convolution made relax() 1.5x slower on the CPU (docs/benchmarks.md, RELAX).
    """
    from ctsearch.model import fold_batchnorm

    state = (encoder.training, tuple(t._version for t in (*encoder.parameters(), *encoder.buffers())))
    kept = _FAST.get(encoder)
    if kept is None or kept[0] != state:
        kept = _FAST[encoder] = (state, fold_batchnorm(encoder))
    return kept[1]


@torch.inference_mode()
def relax(
    encoder: nn.Module,
    image: torch.Tensor,
    num_masks: int = 3000,
    batch_size: int = 100,
    grid: int = 7,
    p: float = 0.5,
    seed: int = 0,
    masks: torch.Tensor | None = None,
    tolerance: float | None = None,
    check_every: int = 300,
    target: torch.Tensor | None = None,
    precision: Precision = "auto",
) -> RelaxResult:
    """Importance and uncertainty maps of ``encoder``'s representation of ``image``.

    Args:
        encoder: [b, 3, S, S] -> [b, D], in eval mode, on the device to compute on.
        image: [3, S, S] or [n, 3, S, S], as ``ctsearch.preprocess.eval_transform`` makes it. Several
            images share the masks and are pushed through the encoder together.
        num_masks: masks per image (3000 in the paper).
        batch_size: masked images per forward pass (all images together).
        grid, p, seed: mask generation (7 x 7 cells kept with probability 0.5).
        masks: explicit float masks [N, S, S] in [0, 1] instead of generated ones (N = num_masks).
        tolerance: stop early once the importance maps change by less than ``tolerance`` times their
            value range between two checks ``check_every`` masks apart; ``masks_used`` says how many.
        target: [D] or [n, D] representation to compare the masked image with instead of the
            image's own (pair explanations: target = the retrieved slice's representation).
        precision: the encoder's arithmetic: ``auto`` (bf16 on CUDA, float32 on a CPU), ``float32``
            or ``bf16`` (on a CPU: about 2x faster where it has bf16 instructions, maps within ~1 %).

    Returns:
        RelaxResult with importance and uncertainty [S, S] (or [n, S, S]) and masks_used.
    """
    single = image.ndim == 3
    x = image[None] if single else image
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
        raise ValueError(f"image must be [3, S, S] or [n, 3, S, S], got {tuple(image.shape)}")
    device = _device_of(encoder)
    precision = resolve_precision(precision, device)
    x = x.to(device, torch.float32)
    n, size = x.shape[0], x.shape[-1]

    if masks is not None:
        if masks.ndim != 3 or masks.shape[1:] != (size, size):
            raise ValueError(f"masks must be [N, {size}, {size}], got {tuple(masks.shape)}")
        total = masks.shape[0]
        get_masks = lambda a, b: masks[a:b].to(device, torch.float32)  # noqa: E731
    else:
        total = num_masks
        sampler = MaskSampler(num_masks, size, grid, p, seed)
        get_masks = lambda a, b: sampler.sample(a, b, device)  # noqa: E731

    encoder = _fast_encoder(encoder)

    if target is None:
        h = _embed(encoder, x, precision=precision)
    else:
        h = torch.as_tensor(target, device=device).float()
        h = h[None] if h.ndim == 1 else h
    if h.shape[0] == 1 and n > 1:
        h = h.expand(n, -1)
    if h.shape[0] != n:
        raise ValueError(f"target must be [D] or [{n}, D], got {tuple(h.shape)}")

    per_pass = max(1, batch_size // n)
    acc = _Accumulator(n, size, device)
    used, next_check, previous = 0, check_every, None
    while used < total:
        stop = min(used + per_pass, total)
        m = get_masks(used, stop)  # [b, S, S]
        xm = (x[:, None] * m[None, :, None]).reshape(-1, 3, size, size)  # [n*b, 3, S, S], image-major
        hm = _embed(encoder, xm, precision=precision).reshape(n, stop - used, -1)
        sims = F.cosine_similarity(h[:, None, :], hm, dim=-1)  # [n, b]
        acc.add(sims, m)
        used = stop
        if tolerance is not None and used >= next_check and used < total:
            next_check += check_every
            r = acc.importance()
            if previous is not None:
                span = (r.amax(dim=(1, 2)) - r.amin(dim=(1, 2))).clamp(min=1e-12)
                change = (r - previous).abs().amax(dim=(1, 2)) / span
                if bool((change < tolerance).all()):
                    break
            previous = r

    imp = acc.importance().float().cpu().numpy()
    unc = acc.uncertainty().float().cpu().numpy()
    if single:
        imp, unc = imp[0], unc[0]
    return RelaxResult(importance=imp, uncertainty=unc, masks_used=used)


def u_relax(
    importance: np.ndarray, uncertainty: np.ndarray, gamma: float = 1.0, average: str = "mean"
) -> np.ndarray:
    """U-RELAX: importance kept only where uncertainty < gamma * mean (or median) uncertainty.

    importance, uncertainty: [S, S] or [n, S, S]; the average is taken per map.
    """
    imp, unc = np.asarray(importance), np.asarray(uncertainty)
    axes = (-2, -1)
    if average == "mean":
        ref = unc.mean(axis=axes, keepdims=True)
    elif average == "median":
        ref = np.median(unc, axis=axes, keepdims=True)
    else:
        raise ValueError(f"average must be 'mean' or 'median', got {average!r}")
    return imp * (unc < gamma * ref)


@torch.no_grad()
def relax_per_mask(
    encoder: nn.Module, image: torch.Tensor, masks: torch.Tensor, batch_size: int = 100
) -> RelaxResult:
    """The reference's algorithm, kept as the cross-check for ``relax``: West's running update
    of R and U, one mask at a time in a Python loop, plain memory format, batches of 100.
    image [3, S, S], masks [N, S, S].
    """
    device = _device_of(encoder)
    x = image.to(device, torch.float32)[None]
    size = x.shape[-1]
    h = _embed(encoder, x, channels_last=False)
    r = torch.zeros(size, size, device=device)
    u = torch.zeros(size, size, device=device)
    w = torch.full((size, size), _W0, device=device)
    for start in range(0, masks.shape[0], batch_size):
        m = masks[start : start + batch_size].to(device, torch.float32)
        sims = F.cosine_similarity(h, _embed(encoder, x * m[:, None], channels_last=False), dim=1)
        for s, mi in zip(sims, m):
            w += mi
            r_prev = r.clone()
            r = r + mi * (s - r) / w
            u = u + (s - r) * (s - r_prev) * mi
    return RelaxResult(
        importance=r.cpu().numpy(), uncertainty=(u / (w - 1)).cpu().numpy(), masks_used=masks.shape[0]
    )
