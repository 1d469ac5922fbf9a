"""SimSiam training views for a whole batch at once, on the batch's device (CPU or CUDA).

The same augmentation as ``ctsearch.views.augmentation`` (torchvision v2, one image at a time on
one CPU thread): RandomResizedCrop(S, scale=(crop_scale, 1)) -> ColorJitter(0.4, 0.4, sat, 0.1)
with p 0.8, brightness/contrast/saturation/hue in a random order per image -> RandomGrayscale
(p 0.2) -> RandomHorizontalFlip (p 0.5). That per-image loop made a GPU worker wait on one CPU
core (~110 images/s against the bf16 step's 1,000-2,300, docs/benchmarks.md); here the HU
batch moves to the device as int16 and every step runs on the whole batch:

- Parameters are drawn on the CPU from torch's global generator, vectorised, with torchvision's
  distributions (crop area and log aspect ratio uniform, 10 attempts, centre-crop fallback;
  uniform jitter factors; a uniformly random order of the four jitter ops). They are a few
  numbers per image, and drawing them on the CPU keeps the device free of host syncs.
- Crop + antialiased bilinear resize + horizontal flip is one pair of batched matmuls
  ``Wy @ image @ Wx^T``: each row of Wy/Wx holds the weights that ``F.interpolate(...,
  antialias=True)`` gives an output pixel, shifted to the crop's place in the full slice and
  zero outside it; a flip reverses Wx's rows. Antialiased bilinear resizing is separable, so this
  computes the same sums as torchvision's kernel, only in another order (float32 rounding).
- Jitter ops use torchvision's formulas with per-image factors, applied step by step to the
  images whose op at that step it is (index lists known on the CPU, so no device sync).

Agreement with torchvision for the same parameters (tests/test_views_device.py): flip,
grayscale, brightness and the crop boxes exactly; the resize within 2e-6, the jitter within
5e-6 and the whole pipeline within 1e-5 (float32 rounding of the matmul and of the blends).
On pseudo-RGB slices (three equal channels) saturation, hue and grayscale change nothing but
the 1e-4 of grey-weight rounding that torchvision has too (0.2989 + 0.587 + 0.114 = 0.9999);
they are implemented for general RGB and tested on colour images.

Example:
    >>> import torch
    >>> from ctsearch.config import ModelConfig
    >>> views = BatchedTwoViews(ModelConfig(image_size=32))
    >>> x1, x2 = views(torch.zeros(4, 48, 48, dtype=torch.int16))
    >>> tuple(x1.shape), x1.dtype, tuple(x2.shape)
    ((4, 3, 32, 32), torch.float32, (4, 3, 32, 32))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ctsearch.config import ModelConfig
from ctsearch.hu import Window, apply_window
from ctsearch.views import CROP_SCALE, JITTER_SATURATION, view_windows

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect ratios (w / h)
ATTEMPTS = 10  # RandomResizedCrop's tries before it falls back to a centre crop
P_JITTER, P_GRAY, P_FLIP = 0.8, 0.2, 0.5
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # torchvision ColorJitter's fn_idx numbering


def jitter_ranges(jitter: str = "paper") -> torch.Tensor:
    """[4, 2] factor ranges of ColorJitter(0.4, 0.4, saturation, 0.1): brightness, contrast, saturation, hue."""
    s = JITTER_SATURATION[jitter]
    return torch.tensor([[0.6, 1.4], [0.6, 1.4], [1.0 - s, 1.0 + s], [-0.1, 0.1]], dtype=torch.float64)


@dataclass
class ViewParams:
    """What torchvision draws per image, for a batch of n images (CPU tensors).

    ``order[i]`` is image i's permutation of the jitter ops (torchvision's ``fn_idx``);
    ``factors[i, op]`` the op's factor. Both are ignored where ``jitter[i]`` is False.
    """

    top: torch.Tensor  # [n] int64
    left: torch.Tensor  # [n] int64
    height: torch.Tensor  # [n] int64
    width: torch.Tensor  # [n] int64
    jitter: torch.Tensor  # [n] bool
    order: torch.Tensor  # [n, 4] int64
    factors: torch.Tensor  # [n, 4] float64
    grayscale: torch.Tensor  # [n] bool
    flip: torch.Tensor  # [n] bool


def sample_crops(
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float] = RATIO,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop.make_params for n images of sizes (heights, widths), vectorised: (top, left, h, w)."""
    n = len(heights)
    H, W = heights.double()[:, None], widths.double()[:, None]
    # The same arithmetic as torchvision: float32 uniforms, int(round(sqrt(...))) (round half to even).
    area = H * W * torch.empty(n, ATTEMPTS).uniform_(scale[0], scale[1]).double()
    log_ratio = torch.log(torch.tensor(ratio))
    aspect = torch.exp(torch.empty(n, ATTEMPTS).uniform_(float(log_ratio[0]), float(log_ratio[1]))).double()
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.long().argmax(1)  # the first attempt that fits (argmax of 0/1 is the first 1)
    found = ok.any(1)
    w = w.gather(1, first[:, None])[:, 0].long()
    h = h.gather(1, first[:, None])[:, 0].long()
    # Fallback: a centre crop clamped to the ratio range (the whole image when its ratio is inside).
    in_ratio = widths.double() / heights.double()
    fw = torch.where(in_ratio > max(ratio), torch.round(heights.double() * max(ratio)).long(), widths)
    fh = torch.where(in_ratio < min(ratio), torch.round(widths.double() / min(ratio)).long(), heights)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    # randint(0, H - h + 1) for a found crop, (H - h) // 2 for the fallback.
    u = torch.rand(n, 2, dtype=torch.float64)
    top = torch.where(found, (u[:, 0] * (heights - h + 1)).long(), (heights - h) // 2)
    left = torch.where(found, (u[:, 1] * (widths - w + 1)).long(), (widths - w) // 2)
    return top, left, h, w


def sample_params(
    heights: torch.Tensor, widths: torch.Tensor, jitter: str = "paper", crop_scale: float = CROP_SCALE
) -> ViewParams:
    """Draw one view's augmentation for n images from torch's global generator (seed it to reproduce)."""
    n = len(heights)
    top, left, h, w = sample_crops(heights, widths, (crop_scale, 1.0))
    rng = jitter_ranges(jitter)
    u = torch.rand(n, 4, dtype=torch.float64)
    return ViewParams(
        top=top,
        left=left,
        height=h,
        width=w,
        jitter=torch.rand(n) < P_JITTER,
        order=torch.rand(n, 4).argsort(1),  # argsort of iid uniforms: every permutation equally likely
        factors=rng[:, 0] + u * (rng[:, 1] - rng[:, 0]),
        grayscale=torch.rand(n) < P_GRAY,
        flip=torch.rand(n) < P_FLIP,
    )


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor -> device without a host sync: pinned first for CUDA, so the copy is asynchronous."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def resize_weights(start: torch.Tensor, length: torch.Tensor, size_in: int, size_out: int) -> torch.Tensor:
    """[n, size_out, size_in] weights of antialiased bilinear resizing of ``[start, start + length)`` to size_out.

    PyTorch's ``_upsample_bilinear2d_aa`` (align_corners False): output pixel o samples the crop at
    centre ``scale * (o + 0.5)`` with a triangle filter widened by ``scale`` when shrinking, and
    normalises the weights over the crop's pixels. Pixels outside the crop get weight 0.
    """
    device = start.device
    scale = (length.float() / size_out)[:, None, None]  # [n, 1, 1]
    support = scale.clamp(min=1.0)  # the triangle's half-width: 1 pixel, or `scale` when antialiasing
    centre = scale * (torch.arange(size_out, device=device, dtype=torch.float32)[None, :, None] + 0.5)
    pos = (torch.arange(size_in, device=device)[None, :] - start[:, None])[:, None, :]  # crop coordinates
    w = (1.0 - ((pos + 0.5 - centre) / support).abs()).clamp_(min=0.0)
    w = w * ((pos >= 0) & (pos < length[:, None, None]))
    return w / w.sum(-1, keepdim=True)


def crop_resize_flip(images: torch.Tensor, p: ViewParams, size: int) -> torch.Tensor:
    """images [n, C, H, W] float -> [n, C, size, size]: each image's crop box, resized and maybe flipped."""
    n, _, H, W = images.shape
    dev = images.device
    box = to_device(torch.stack([p.top, p.height, p.left, p.width, p.flip.long()]), dev)
    wy = resize_weights(box[0], box[1], H, size)
    wx = resize_weights(box[2], box[3], W, size)
    # Flipping the output columns = reversing the order of wx's rows (exact: the same sums, stored mirrored).
    wx = torch.where(box[4].bool()[:, None, None], wx.flip(1), wx)
    # float32 matmuls: with TF32 allowed (torch.backends.cuda.matmul.allow_tf32) they round to ~1e-3.
    return wy[:, None] @ images.float() @ wx[:, None].transpose(-1, -2)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale (ITU-R 601 weights, the same op order), [m, 1, h, w].

    A 1-channel x stands for pseudo-RGB (three equal channels): the same sum, so the same result.
    """
    r, g, b = x.unbind(dim=-3) if x.shape[-3] == 3 else (x[:, 0],) * 3
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend with per-image ratios f (float64 [m]): x * f + other * (1 - f), clamped to [0, 1]."""
    shape = (-1, 1, 1, 1)
    return x.mul(f.float().view(shape)).add_(other * (1.0 - f).float().view(shape)).clamp_(0.0, 1.0)


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue with per-image shifts f (float64 [m]), through its own HSV conversions."""
    if x.shape[-3] == 1:  # grey has saturation 0 in HSV: a hue shift gives back the same image, exactly
        return x
    # torchvision's own (private) HSV conversions: batched already, and the same numbers by construction.
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

    h, s, v = _rgb_to_hsv(x).unbind(dim=-3)
    h = h.add(f.float().view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def _jitter_op(op: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    if op == BRIGHTNESS:
        return x.mul(f.float().view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    if op == CONTRAST:
        return _blend(x, _grey(x).mean(dim=(-3, -2, -1), keepdim=True), f)
    if op == SATURATION:
        return _blend(x, _grey(x), f)
    return _hue(x, f)


def color_jitter(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """ColorJitter on [n, C, h, w] in [0, 1] (C = 3, or 1 for pseudo-RGB), each image's ops in its order (in place)."""
    # One host->device copy holds every (step, op) group's image indices and the factors (as int64
    # bits); the group sizes stay on the CPU, so slicing it needs no device sync.
    groups = [
        (k, op, torch.nonzero(p.jitter & (p.order[:, k] == op))[:, 0]) for k in range(4) for op in range(4)
    ]
    groups = [g for g in groups if len(g[2])]
    if not groups:
        return x
    flat = torch.cat([g[2] for g in groups] + [p.factors.flatten().view(torch.int64)])
    flat = to_device(flat, x.device)
    factors = flat[-p.factors.numel() :].view(torch.float64).view(-1, 4)
    start = 0
    for _, op, idx in groups:
        dev_idx = flat[start : start + len(idx)]
        start += len(idx)
        x[dev_idx] = _jitter_op(op, x[dev_idx], factors[dev_idx, op])
    return x


def augment(images: torch.Tensor, p: ViewParams, size: int) -> torch.Tensor:
    """[n, C, H, W] float in [0, 1] -> views [n, 3, size, size] with the parameters ``p``.

    C = 3: general RGB. C = 1: pseudo-RGB (a grey slice copied into three channels, as the
    training views are), computed on the one channel (the same numbers as on three equal
    channels, at a third of the work and without the HSV round trip) and returned as a
    3-channel view of it (``expand``; make it contiguous, e.g. channels_last, before the model).
    """
    x = crop_resize_flip(images, p, size).contiguous()
    x = color_jitter(x, p)
    grey = to_device(p.grayscale, x.device)[:, None, None, None]
    x = torch.where(grey, _grey(x).expand_as(x), x)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def stack_hu(slices) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of [y, x] HU slices (sizes may differ) -> (int16 [n, Y, X] zero-padded, sizes [n, 2])."""
    arrays = [np.asarray(s) for s in slices]
    sizes = torch.tensor([a.shape for a in arrays], dtype=torch.int64).view(-1, 2)
    out = torch.zeros(len(arrays), *sizes.max(0).values.tolist(), dtype=torch.int16)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0], : a.shape[1]] = torch.from_numpy(a.astype(np.int16, copy=False))
    return out, sizes


class BatchedTwoViews:
    """HU slices [n, y, x] (int16, on any device) -> two views, each float32 [n, 3, S, S] in [0, 1], on that device.

    The drop-in for ``ctsearch.views.TwoViews``: the same windows and augmentation distribution,
    drawn from torch's global generator, computed on the whole batch where the batch is.
    """

    def __init__(self, config: ModelConfig, jitter: str = "paper", crop_scale: float = CROP_SCALE):
        if jitter not in JITTER_SATURATION:
            raise ValueError(f"jitter must be one of {sorted(JITTER_SATURATION)}, got {jitter!r}")
        if not 0.0 < crop_scale <= 1.0:
            raise ValueError(f"crop_scale must be in (0, 1], got {crop_scale!r}")
        self.windows: tuple[Window, Window] = view_windows(config)
        self.rescale = config.rescale
        self.size, self.jitter, self.crop_scale = config.image_size, jitter, crop_scale

    def __call__(self, hu, sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``hu``: int16 tensor [n, Y, X] (``sizes`` [n, 2] if zero-padded, see ``stack_hu``) or a list of slices."""
        if not isinstance(hu, torch.Tensor):
            hu, sizes = stack_hu(hu)
        n = hu.shape[0]
        if sizes is None:
            sizes = torch.tensor(hu.shape[1:]).expand(n, 2)
        sizes = sizes.cpu()
        # Both views in one batch of 2n: view 1's window on the first n, view 2's on the rest.
        both = torch.cat([apply_window(hu, w, self.rescale) for w in self.windows])[:, None]
        p = sample_params(sizes[:, 0].repeat(2), sizes[:, 1].repeat(2), self.jitter, self.crop_scale)
        x = augment(both, p, self.size)
        return x[:n], x[n:]


def resolve_views_device(choice: str, worker_device: torch.device) -> str | None:
    """``--views-device`` -> where the batched views run, or None for the torchvision CPU path.

    ``auto`` is the worker's device: batched on a GPU worker, torchvision on a CPU worker (today's
    behaviour). ``cpu`` is always torchvision; ``cpu-batched`` the batched code on the CPU.
    """
    if choice == "cpu" or (choice == "auto" and worker_device.type == "cpu"):
        return None
    if choice == "cpu-batched":
        return "cpu"
    if choice in ("auto", "cuda"):
        if worker_device.type != "cuda":
            raise RuntimeError(
                f"--views-device {choice} needs a GPU worker, this one runs on {worker_device}"
            )
        return str(worker_device)
    raise ValueError(f"views device must be auto, cpu, cpu-batched or cuda, got {choice!r}")
