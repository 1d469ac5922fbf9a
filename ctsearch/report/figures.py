"""Figures: CT slices with RELAX heat maps on top (as in the paper's figs 8-11), as PNG.

Pillow only. Heat maps use a jet-like colour map (blue = unimportant, red = important) that is
defined here, so no plotting library is needed. Used by the explain job (per-slice panels), by
``ctsearch explain INDEX QUERY`` (the query figure) and by the HTML report.

Example:
    >>> import numpy as np
    >>> hu = np.zeros((64, 64), np.int16); imp = np.random.default_rng(0).random((32, 32))
    >>> explanation_panel(hu, imp).size
    (512, 256)
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from ctsearch.hu import WIDE, Window, apply_window

# (position, r, g, b): dark blue -> blue -> cyan -> yellow -> red -> dark red.
_HEAT_ANCHORS = np.array(
    [
        (0.00, 0, 0, 128),
        (0.12, 0, 0, 255),
        (0.37, 0, 255, 255),
        (0.62, 255, 255, 0),
        (0.87, 255, 0, 0),
        (1.00, 128, 0, 0),
    ],
    dtype=np.float64,
)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB [..., 3] on the jet-like heat scale."""
    v = np.clip(np.asarray(values, np.float64), 0.0, 1.0)
    rgb = [np.interp(v, _HEAT_ANCHORS[:, 0], _HEAT_ANCHORS[:, c]) for c in (1, 2, 3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def normalise(values: np.ndarray) -> np.ndarray:
    """Min-max scale a map to [0, 1] (a constant map becomes 0)."""
    v = np.asarray(values, np.float64)
    lo, hi = float(np.min(v)), float(np.max(v))
    return (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)


def centre_square(a: np.ndarray) -> np.ndarray:
    """The centred square [.., m, m] (m = short side) of [.., h, w]: what eval_transform keeps."""
    h, w = a.shape[-2:]
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    return a[..., top : top + m, left : left + m]


def window_grey(hu: np.ndarray, window: Window = WIDE) -> np.ndarray:
    """HU slice [h, w] -> uint8 grey [h, w], the window stretched over 0..255."""
    g = np.asarray(apply_window(np.asarray(hu, np.float32), window, "own"))
    return (np.clip(g, 0, 1) * 255).round().astype(np.uint8)


def _resize(a: np.ndarray, size: int, resample=Image.BILINEAR) -> np.ndarray:
    img = Image.fromarray(a if a.dtype == np.uint8 else a.astype(np.float32), mode=None)
    return np.asarray(img.resize((size, size), resample))


def slice_rgb(hu: np.ndarray, size: int) -> np.ndarray:
    """The slice's centre square in the wide window as uint8 RGB [size, size, 3]."""
    grey = _resize(centre_square(window_grey(hu)), size)
    return np.repeat(grey[..., None], 3, axis=-1)


def overlay(
    hu: np.ndarray, importance: np.ndarray, size: int | None = None, alpha: float = 0.5
) -> np.ndarray:
    """The slice (wide window, centre square) with the min-max scaled importance map blended on top.

    hu [h, w] HU, importance [s, s] (any resolution: resized bilinearly). Returns uint8 RGB [size, size, 3].
    """
    grey = centre_square(window_grey(hu))
    size = size or grey.shape[0]
    grey = _resize(grey, size)
    heat = heat_colors(normalise(_resize(np.asarray(importance, np.float32), size)))
    base = np.repeat(grey[..., None], 3, axis=-1).astype(np.float64)
    return ((1 - alpha) * base + alpha * heat).round().astype(np.uint8)


def explanation_panel(
    hu: np.ndarray,
    importance: np.ndarray,
    uncertainty: np.ndarray | None = None,
    size: int = 256,
    title: str | None = None,
) -> Image.Image:
    """Side by side: the slice in the wide window | importance overlay | (uncertainty heat map)."""
    tiles = [slice_rgb(hu, size), overlay(hu, importance, size)]
    labels = ["slice (wide window)", "RELAX importance"]
    if uncertainty is not None:
        tiles.append(heat_colors(normalise(_resize(np.asarray(uncertainty, np.float32), size))))
        labels.append("RELAX uncertainty")
    img = Image.fromarray(np.concatenate(tiles, axis=1))
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(labels):
        draw.text((i * size + 4, size - 14), text, fill=(255, 255, 255))
    if title:
        draw.text((4, 4), title, fill=(255, 255, 255))
    return img


def grid(rows: list[list[np.ndarray]], captions: list[list[str]] | None = None, gap: int = 4) -> Image.Image:
    """Tiles (uint8 RGB, equal size) arranged in rows, with an optional caption in each tile."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    canvas = Image.new("RGB", (ncol * (w + gap) - gap, len(rows) * (h + gap) - gap), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            x, y = j * (w + gap), i * (h + gap)
            canvas.paste(Image.fromarray(tile), (x, y))
            if captions and captions[i][j]:
                draw.text((x + 4, y + 4), captions[i][j], fill=(255, 255, 255))
    return canvas


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def query_figure(
    hus: list[np.ndarray], hits: list[dict], maps: dict[str, np.ndarray], size: int
) -> Image.Image:
    """The figure of ``ctsearch explain INDEX QUERY``: one column per slice (query first, then the hits).

    Rows: the slices; their own RELAX maps; with hits, the query's map toward each hit and each
    hit's map toward the query. ``hus``: HU slices [h, w], query first; ``hits``: their search
    hits (rank, score); ``maps``: as in maps.npz; ``size``: tile size in px.
    """
    n = len(hits)
    slices = [slice_rgb(a, size) for a in hus]
    rows = [slices, [overlay(a, maps["importance"][i], size) for i, a in enumerate(hus)]]
    caps = [["query"] + [f"#{h['rank']} {h['score']:.3f}" for h in hits], ["query RELAX"] + ["hit RELAX"] * n]
    if n:
        blank = np.zeros_like(slices[0])
        rows.append([blank] + [overlay(hus[0], maps["pair_query_importance"][j], size) for j in range(n)])
        rows.append([blank] + [overlay(hus[j + 1], maps["pair_hit_importance"][j], size) for j in range(n)])
        caps += [["", *["query -> this hit"] * n], ["", *["this hit -> query"] * n]]
    return grid(rows, caps)


def crossexam_figure(query: np.ndarray, other: np.ndarray, example: dict, size: int = 128) -> Image.Image:
    """The report's cross-exam example: top row the query slice, then the coherent run in the earlier
    exam along z (inferior to superior); bottom row the true matching slice, then plain top-k by score.

    ``query``: HU [h, w]; ``other``: the earlier exam, HU [n, h, w]; ``example``: evaluate's
    ``crossexam.example`` (slice indices into ``other``, ``anatomical_mm`` per slice of ``other``).
    Each caption gives the slice and its distance from the true position (mm, + = superior).
    """
    anat, truth = example["anatomical_mm"], example["query"]["anatomical_mm"]
    label = lambda j: f"{j}: {anat[j] - truth:+.0f} mm"  # noqa: E731
    best = example["coherent"]["best"]
    run, plain = example["coherent"]["run"], example["plain"]
    rows = [
        [slice_rgb(query, size)] + [slice_rgb(other[j], size) for j in run],
        [slice_rgb(other[example["true_slice"]], size)] + [slice_rgb(other[j], size) for j in plain],
    ]
    caps = [
        ["query"] + [("best " if j == best else "") + label(j) for j in run],
        [f"truth {label(example['true_slice'])}"] + [f"#{r + 1} {label(j)}" for r, j in enumerate(plain)],
    ]
    return grid(rows, caps)
