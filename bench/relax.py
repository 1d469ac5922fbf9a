"""RELAX speed: ``ctsearch.relax.relax`` against the reference's per-mask update loop.

Same encoder, same masks, same machine, one run; prints explanations per second of both, their
ratio, and the largest difference between the maps. On CUDA: seconds per explanation of a
3000-mask ResNet50 explanation of a 224 px slice.

    python bench/relax.py                      # CPU: tiny backbone, 64 px, 1000 masks, 4 slices
    python bench/relax.py --device cuda        # GPU: resnet50, 224 px, 3000 masks, bf16
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ctsearch.model import ModelConfig, build_encoder
from ctsearch.preprocess import eval_transform
from ctsearch.relax import _Accumulator, make_masks, relax, relax_per_mask


def phantom_slices(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random HU slices [n, size, size]: an ellipse of soft tissue with blobs, air outside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    out = np.full((n, size, size), -1000, np.int16)
    for i in range(n):
        body = (xx / 0.9) ** 2 + (yy / 0.7) ** 2 < 1
        img = np.where(body, 40.0, -1000.0)
        for _ in range(5):
            cx, cy, r = rng.uniform(-0.5, 0.5), rng.uniform(-0.4, 0.4), rng.uniform(0.08, 0.3)
            img = np.where(body & ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2), rng.uniform(-100, 250), img)
        out[i] = (img + rng.normal(0, 10, img.shape) * body).astype(np.int16)
    return out


def min_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest Pearson correlation between corresponding maps of [n, S, S] stacks."""
    return float(min(np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b)))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, object]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backbone", default=None, help="default: tiny on cpu, resnet50 on cuda")
    ap.add_argument("--size", type=int, default=None, help="image size in px (default 64 cpu, 224 cuda)")
    ap.add_argument(
        "--masks", type=int, default=None, help="masks per explanation (default 1000 cpu, 3000 cuda)"
    )
    ap.add_argument("--images", type=int, default=None, help="slices explained (default 4 cpu, 8 cuda)")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="relax() forward batch, all slices together (default 100 cpu, 1024 cuda)",
    )
    ap.add_argument(
        "--precision",
        default="auto",
        help="relax()'s arithmetic: auto | float32 | bf16 (the reference stays float32)",
    )
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile the encoder for relax() (not the reference)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per method; the fastest counts")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    cuda = a.device == "cuda"
    backbone = a.backbone or ("resnet50" if cuda else "tiny")
    size = a.size or (224 if cuda else 64)
    n_masks = a.masks or (3000 if cuda else 1000)
    n_img = a.images or (8 if cuda else 4)
    bs = a.batch_size or (1024 if cuda else 100)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = cuda  # as the explain job's actors do

    cfg = ModelConfig(backbone=backbone, image_size=size)
    enc = build_encoder(cfg).eval()
    # Spread BN statistics so masked representations move (an untrained net is nearly constant).
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_mean.uniform_(-0.1, 0.1)
    enc = enc.to(a.device)
    if cuda:
        enc = enc.to(memory_format=torch.channels_last)
    x = eval_transform(phantom_slices(n_img, max(size, 96)), cfg).to(a.device)
    ours_enc = torch.compile(enc) if a.compile else enc
    masks = make_masks(n_masks, size, seed=1).to(a.device)

    # Warm-up (oneDNN / cuDNN plan selection) on a few masks, untimed.
    warm = masks if a.compile else masks[:64]  # compiling sees every batch shape once
    t_warm, _ = timed(lambda: relax(ours_enc, x, masks=warm, batch_size=bs, precision=a.precision), a.device)
    relax_per_mask(enc, x[0], masks[:64])

    t_ours, t_ref = [], []
    ours = ref = None
    for _ in range(a.repeats):  # interleaved: a shared machine's load hits both alike
        dt, ours = timed(
            lambda: relax(ours_enc, x, masks=masks, batch_size=bs, precision=a.precision), a.device
        )
        t_ours.append(dt)
        dt, ref = timed(lambda: [relax_per_mask(enc, x[i], masks) for i in range(n_img)], a.device)
        t_ref.append(dt)
    imp_ref = np.stack([r.importance for r in ref])
    unc_ref = np.stack([r.uncertainty for r in ref])
    to, tr = min(t_ours), min(t_ref)

    # Where the time goes: encoder forward alone (plain batches of 100, as the reference), and the
    # map update alone (per-mask loop vs batched accumulation) on the same similarities.
    def forward_only():
        with torch.no_grad():
            for i in range(n_img):
                for s in range(0, n_masks, 100):
                    relax_forward(enc, x[i : i + 1] * masks[s : s + 100, None])

    def relax_forward(e, xm):
        if cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return e(xm)
        return e(xm)

    t_fwd, _ = timed(forward_only, a.device)
    sims = torch.rand(n_img, n_masks, device=a.device) * 0.2 + 0.8

    def update_loop():
        for i in range(n_img):
            r = torch.zeros(size, size, device=a.device)
            u = torch.zeros_like(r)
            w = torch.full_like(r, 1e-10)
            for s, mi in zip(sims[i], masks):
                w += mi
                rp = r.clone()
                r = r + mi * (s - r) / w
                u = u + (s - r) * (s - rp) * mi

    def update_batched():
        acc = _Accumulator(n_img, size, torch.device(a.device))
        for s in range(0, n_masks, bs):
            acc.add(sims[:, s : s + bs], masks[s : s + bs])
        acc.importance(), acc.uncertainty()

    t_upd_loop, _ = timed(update_loop, a.device)
    t_upd_ours, _ = timed(update_batched, a.device)

    res = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "backbone": backbone,
        "precision": a.precision,
        "compiled": a.compile,
        "first_call_s": t_warm,
        "image_px": size,
        "masks": n_masks,
        "images": n_img,
        "batch_size": bs,
        "relax_s_per_explanation": to / n_img,
        "reference_loop_s_per_explanation": tr / n_img,
        "relax_explanations_per_s": n_img / to,
        "reference_loop_explanations_per_s": n_img / tr,
        "speedup": tr / to,
        "max_abs_diff_importance": float(np.abs(ours.importance - imp_ref).max()),
        "max_abs_diff_uncertainty": float(np.abs(ours.uncertainty - unc_ref).max()),
        # Agreement with the float32 reference, per slice: what bf16 may change.
        "min_correlation_importance": min_corr(ours.importance, imp_ref),
        "max_diff_over_range_importance": float(
            max(np.abs(o - r).max() / np.ptp(r) for o, r in zip(ours.importance, imp_ref))
        ),
        "plain_forward_s_per_explanation": t_fwd / n_img,
        "update_per_mask_loop_s_per_explanation": t_upd_loop / n_img,
        "update_batched_s_per_explanation": t_upd_ours / n_img,
        "update_speedup": t_upd_loop / t_upd_ours,
    }
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(
        f"device {res['device']} ({res['torch_threads']} threads), {backbone} at {size} px, "
        f"{n_masks} masks, {n_img} slices, relax batch {bs}, relax() precision {a.precision}"
        f"{', torch.compile' if a.compile else ''}; first relax() call {t_warm:.1f} s"
    )
    print(
        f"relax():             {res['relax_s_per_explanation']:.4f} s/explanation  "
        f"({res['relax_explanations_per_s']:.2f} explanations/s)"
    )
    print(
        f"reference loop:      {res['reference_loop_s_per_explanation']:.4f} s/explanation  "
        f"({res['reference_loop_explanations_per_s']:.2f} explanations/s)"
    )
    print(f"speedup:             {res['speedup']:.2f}x")
    print(
        f"max |diff| maps:     importance {res['max_abs_diff_importance']:.2e}, "
        f"uncertainty {res['max_abs_diff_uncertainty']:.2e}; importance: min correlation "
        f"{res['min_correlation_importance']:.5f}, max |diff| / range {res['max_diff_over_range_importance']:.2e}"
    )
    print(
        f"breakdown per explanation: plain forward {res['plain_forward_s_per_explanation']:.4f} s, "
        f"map update per-mask loop {res['update_per_mask_loop_s_per_explanation']:.4f} s vs batched "
        f"{res['update_batched_s_per_explanation']:.4f} s ({res['update_speedup']:.1f}x)"
    )


if __name__ == "__main__":
    main()
