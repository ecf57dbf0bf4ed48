"""An offline demo source shaped exactly like the Hub dataset `tanganke/stanford_cars`.

Why it exists: the pipeline (and its tests and benchmarks) must run without network access and
without the 4 GB real dataset. `generate_demo_source` writes a folder that the real loading code
reads unchanged with `datasets.load_dataset(str(out_dir))`:

    out_dir/README.md                                  dataset card; YAML declares features and splits
    out_dir/data/train-00000-of-00001.parquet
    out_dir/data/test-00000-of-00001.parquet
    out_dir/data/<corruption>-00000-of-00001.parquet   corrupted copies of test (same rows, same order)

Features are exactly those of the real source: an `image` column of encoded bytes and a `label`
ClassLabel carrying all 196 real Stanford Cars class names, so label ids, class names and the
maker mapping behave as they do on the real data; only classes of the chosen makers get rows.

The images are synthetic side views of cars drawn with PIL. What identifies the maker is deliberately
strong and survives resizing to about 64x64 and, mostly, grayscale: each maker has its own body hue
family, silhouette (roof shape, body height, ground clearance, wheel size) and a distinctive accent
(spare wheel, racing stripe, kidney grille, floating two-tone roof, chrome sill, coach line). Classes of
one maker differ only slightly (hue shift, proportions, a soft top on convertibles), and nuisance
factors the classifier must ignore vary per image: background gradient, position, scale, slight
rotation, facing direction, pixel noise and the file format (mostly JPEG, some PNG, a few grayscale,
CMYK and RGBA files, as in the real data, which is what the pipeline's image normalisation must handle).

Everything is derived from `seed` through per-image random generators, so the same arguments give
byte-identical parquet files, and the folder appears atomically (built in a hidden sibling, then
renamed), so a crash never leaves a half-written source that looks complete.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import datasets
import numpy as np
import yaml
from PIL import Image, ImageDraw

from car_maker_pipeline.data.classes import stanford_cars_class_names
from car_maker_pipeline.data.makers import maker_of
from car_maker_pipeline.storage import remove_stale_temporaries, temporary_prefix

# Six makers with very different looks and 1 to 13 classes each (AM General has a single class,
# BMW thirteen), so maker-level class imbalance inside a maker is exercised too.
DEMO_MAKERS: tuple[str, ...] = ("AM General", "Aston Martin", "BMW", "Land Rover", "Mercedes-Benz", "Rolls-Royce")

# The corrupted test splits of `tanganke/stanford_cars`, in the order the Hub lists them.
ALL_CORRUPTIONS: tuple[str, ...] = (
    "contrast",
    "gaussian_noise",
    "impulse_noise",
    "jpeg_compression",
    "motion_blur",
    "pixelate",
    "spatter",
)

# Written (hidden, so content fingerprints of the folder ignore it) to recognise a folder this module
# made: only such a folder is ever replaced; any other existing non-empty folder is left alone.
MARKER_FILE = ".car_maker_demo_source.json"

_SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges at almost no cost

# File formats with their share of images, roughly as in the real data: mostly JPEG, some PNG,
# a few grayscale JPEG, CMYK JPEG and RGBA PNG files.
_FORMATS: tuple[tuple[str, float], ...] = (
    ("jpeg", 0.80),
    ("png", 0.12),
    ("jpeg_l", 0.03),
    ("jpeg_cmyk", 0.025),
    ("png_rgba", 0.025),
)
_FORMAT_CUMULATIVE = np.cumsum([share for _, share in _FORMATS])


# --------------------------------------------------------------------------------------------------
# Maker styles
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MakerStyle:
    """How one maker's cars look. Lengths are in units of the car length; y is up from the ground."""

    hue: float  # body hue centre, degrees
    saturation: tuple[float, float]
    value: tuple[float, float]
    body_height: float  # lower body, from its bottom to the belt line
    clearance: float  # ground to the bottom of the body
    wheel_radius: float
    roof: str  # "box", "fastback", "notch", "dome" or "formal"
    roof_height: float
    nose: float  # 0: upright front; 1: front top drops by half the body height (wedge)
    accent: str  # "spare_wheel", "stripe", "kidney", "two_tone", "chrome", "coachline" or "none"
    hub: tuple[int, int, int] = (200, 200, 205)


_MAKER_STYLES: dict[str, MakerStyle] = {
    # Tall box on huge wheels, olive/khaki, flat roof, spare wheel on the tail.
    "AM General": MakerStyle(
        72, (0.35, 0.6), (0.35, 0.6), 0.26, 0.13, 0.14, "box", 0.19, 0.0, "spare_wheel", (60, 60, 50)
    ),
    # Low wedge with a long fastback, racing green, light side stripe and a side vent.
    "Aston Martin": MakerStyle(150, (0.55, 0.85), (0.3, 0.55), 0.13, 0.035, 0.085, "fastback", 0.13, 1.0, "stripe"),
    # Mid-height notchback sedan, saturated blue, twin dark kidney grille and a dark sill.
    "BMW": MakerStyle(218, (0.65, 0.95), (0.55, 0.9), 0.17, 0.06, 0.095, "notch", 0.14, 0.5, "kidney"),
    # Tall SUV, amber/orange, cream floating roof on black pillars, black lower cladding.
    "Land Rover": MakerStyle(28, (0.6, 0.9), (0.65, 0.95), 0.22, 0.1, 0.11, "box", 0.17, 0.15, "two_tone"),
    # Rounded dome cabin, colourless silver, bright chrome sill and a round emblem at the nose.
    "Mercedes-Benz": MakerStyle(210, (0.0, 0.07), (0.55, 0.85), 0.16, 0.06, 0.09, "dome", 0.17, 0.4, "chrome"),
    # Long upright limousine, burgundy with a black upper body and roof, gold coach line, tall grille.
    "Rolls-Royce": MakerStyle(338, (0.5, 0.8), (0.3, 0.5), 0.2, 0.06, 0.085, "formal", 0.15, 0.0, "coachline"),
}

_ROOFS = ("box", "fastback", "notch", "dome", "formal")


@cache
def _style_for(maker: str) -> MakerStyle:
    """A curated style for the demo makers; any other maker gets a stable style derived from its name."""
    if maker in _MAKER_STYLES:
        return _MAKER_STYLES[maker]
    h = zlib.crc32(maker.encode())
    return MakerStyle(
        hue=float(h % 360),
        saturation=(0.45, 0.85),
        value=(0.4, 0.85),
        body_height=0.14 + 0.02 * ((h >> 9) % 5),
        clearance=0.04 + 0.02 * ((h >> 12) % 4),
        wheel_radius=0.08 + 0.012 * ((h >> 14) % 4),
        roof=_ROOFS[(h >> 16) % len(_ROOFS)],
        roof_height=0.12 + 0.015 * ((h >> 19) % 4),
        nose=0.25 * ((h >> 21) % 5),
        accent="stripe" if (h >> 24) % 2 else "none",
    )


@cache
def _classes_by_maker() -> dict[str, tuple[tuple[int, str], ...]]:
    """Maker -> its (real label id, class name) pairs, in label-id order."""
    grouped: dict[str, list[tuple[int, str]]] = {}
    for label, name in enumerate(stanford_cars_class_names()):
        grouped.setdefault(maker_of(name), []).append((label, name))
    return {maker: tuple(classes) for maker, classes in grouped.items()}


@cache
def _class_variant(maker: str, source_class: str) -> tuple[MakerStyle, float, bool]:
    """Small per-class changes inside a maker: a hue shift, slightly different proportions, soft tops.

    The shifts are kept well below the differences between makers, so the maker stays learnable.
    """
    names = [name for _, name in _classes_by_maker().get(maker, ())]
    if source_class not in names:
        raise ValueError(
            f"{source_class!r} is not a Stanford Cars class made by {maker!r}; "
            f"that maker's classes are: {names or 'none (unknown maker)'}."
        )
    style = _style_for(maker)
    index, count = names.index(source_class), len(names)
    hue_shift = (index - (count - 1) / 2) * min(4.0, 24.0 / max(count, 1))
    wobble = ((index % 3) - 1) * 0.04
    style = replace(
        style,
        body_height=style.body_height * (1 + wobble),
        roof_height=style.roof_height * (1 - wobble / 2),
        clearance=style.clearance * (1.1 if " SUV " in f" {source_class} " else 1.0),
    )
    convertible = "Convertible" in source_class
    return style, hue_shift, convertible


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _hsv(hue_deg: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((hue_deg % 360) / 360.0, min(max(saturation, 0.0), 1.0), min(max(value, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _shade(color: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * factor))) for c in color)  # type: ignore[return-value]


def _cabin_outline(style: MakerStyle, top: float) -> list[tuple[float, float]]:
    """The greenhouse (pillars and roof) above the belt line `top`, rear (x=0) to front (x=1)."""
    h = style.roof_height
    if style.roof == "box":
        return [(0.06, top), (0.08, top + h), (0.64, top + h), (0.72, top)]
    if style.roof == "fastback":
        return [(0.08, top), (0.44, top + h), (0.55, top + h), (0.72, top)]
    if style.roof == "notch":
        return [(0.2, top), (0.31, top + h), (0.57, top + h), (0.71, top)]
    if style.roof == "formal":
        return [(0.14, top), (0.15, top + h), (0.5, top + h), (0.6, top)]
    # dome: half an ellipse
    angles = np.linspace(0.0, math.pi, 13)
    return [(0.48 + 0.26 * math.cos(a), top + h * math.sin(a)) for a in angles]


def _window_outline(cabin: list[tuple[float, float]], top: float, style: MakerStyle) -> list[tuple[float, float]]:
    """The glass: the cabin shrunk towards its centre, sitting a little above the belt line."""
    xs = [x for x, _ in cabin]
    cx = (min(xs) + max(xs)) / 2
    h = style.roof_height
    return [(cx + (x - cx) * 0.84, top + 0.12 * h + (y - top) * 0.7) for x, y in cabin]


def render_car(
    maker: str, source_class: str, rng: np.random.Generator, image_size: tuple[int, int] = (128, 96)
) -> Image.Image:
    """Draw one synthetic side view of a `source_class` car by `maker` as an RGB image of `image_size` (w, h).

    Maker cues (hue family, silhouette, wheels, accent) are strong; per-class changes are small; the
    background, placement, scale, rotation, facing direction and pixel noise come from `rng`, so
    the same generator state always gives the same picture.
    """
    width, height = int(image_size[0]), int(image_size[1])
    if width < 16 or height < 16:
        raise ValueError(f"image_size must be at least 16x16 pixels, got {image_size!r}.")
    style, hue_shift, convertible = _class_variant(maker, source_class)
    ss = _SUPERSAMPLE
    W, H = width * ss, height * ss

    # Background: a vertical gradient between two random muted colours, with a darker ground band.
    top_col = np.array(_hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.35), rng.uniform(0.55, 0.98)), np.float32)
    bottom_col = np.array(_hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.35), rng.uniform(0.35, 0.9)), np.float32)
    ground_frac = rng.uniform(0.74, 0.88)
    t = np.linspace(0.0, 1.0, H, dtype=np.float32)[:, None]
    column = top_col * (1 - t) + bottom_col * t
    road = np.array(_hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.2), rng.uniform(0.25, 0.6)), np.float32)
    column = np.where(t > ground_frac, road, column)
    # One pixel wide, stretched sideways by PIL: much cheaper than filling an (H, W, 3) array.
    image = Image.fromarray(column[:, None, :].astype(np.uint8), "RGB").resize((W, H), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)

    # Placement: the car's length in pixels, limited so its full height fits above the ground line.
    total_height = (
        style.clearance + style.body_height + style.roof_height + (0.06 if style.accent == "coachline" else 0.0)
    )
    ground_y = ground_frac * H + rng.uniform(-0.02, 0.03) * H
    length = min(W * rng.uniform(0.62, 0.88), (ground_y - 0.05 * H) / total_height)
    cx = W / 2 + rng.uniform(-0.08, 0.08) * W
    facing = 1.0 if rng.random() < 0.5 else -1.0  # front to the right or to the left
    angle = math.radians(rng.uniform(-5.0, 5.0))
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    pivot_y = ground_y - 0.2 * length

    def pt(x: float, y: float) -> tuple[float, float]:
        px, py = cx + facing * (x - 0.5) * length, ground_y - y * length
        dx, dy = px - cx, py - pivot_y
        return cx + dx * cos_a - dy * sin_a, pivot_y + dx * sin_a + dy * cos_a

    def poly(points: list[tuple[float, float]], fill: tuple[int, int, int]) -> None:
        draw.polygon([pt(x, y) for x, y in points], fill=fill)

    def disc(x: float, y: float, r: float, fill: tuple[int, int, int]) -> None:
        px, py = pt(x, y)
        rr = r * length
        draw.ellipse((px - rr, py - rr, px + rr, py + rr), fill=fill)

    def band(x0: float, x1: float, y0: float, y1: float, fill: tuple[int, int, int]) -> None:
        poly([(x0, y0), (x0, y1), (x1, y1), (x1, y0)], fill)

    body = _hsv(style.hue + hue_shift + rng.uniform(-6, 6), rng.uniform(*style.saturation), rng.uniform(*style.value))
    dark = (25, 25, 30)
    glass = _hsv(205 + rng.uniform(-10, 10), 0.35, rng.uniform(0.22, 0.4))
    clr, bh = style.clearance, style.body_height
    belt = clr + bh
    wr = style.wheel_radius
    rear_x, front_x = 0.17, 0.82

    # Shadow on the ground under the car.
    sx0, sy0 = pt(0.02, 0.0)
    sx1, sy1 = pt(0.98, 0.0)
    draw.ellipse(
        (min(sx0, sx1), min(sy0, sy1) - 0.02 * length, max(sx0, sx1), max(sy0, sy1) + 0.02 * length),
        fill=_shade(tuple(int(c) for c in road), 0.55),
    )

    # Cabin (drawn first; the body overlaps its bottom edge). Convertibles get a lower dark soft top.
    roof_style = replace(style, roof_height=style.roof_height * (0.8 if convertible else 1.0))
    cabin = _cabin_outline(roof_style, belt - 0.01)
    roof_colour = body
    if style.accent == "two_tone":
        roof_colour = (238, 232, 212)  # cream floating roof
    elif style.accent == "coachline":
        roof_colour = (22, 20, 24)
    if convertible:
        roof_colour = (40, 38, 42)
    poly(cabin, roof_colour)
    window = _window_outline(cabin, belt - 0.01, roof_style)
    poly(window, glass)
    if style.accent == "two_tone":  # black pillars under the floating roof
        xs = [x for x, _ in window]
        for x in (min(xs) + 0.01, (min(xs) + max(xs)) / 2, max(xs) - 0.01):
            band(x - 0.012, x + 0.012, belt, belt + 0.8 * roof_style.roof_height, dark)
    else:  # B-pillar
        xs = [x for x, _ in window]
        mid = (min(xs) + max(xs)) / 2
        band(mid - 0.012, mid + 0.012, belt, belt + 0.9 * roof_style.roof_height, roof_colour)

    # Lower body: rear corner rounded, front top dropped by `nose` (a wedge for sports cars).
    front_top = belt - 0.5 * bh * style.nose
    poly(
        [
            (0.0, clr + 0.15 * bh),
            (0.0, belt - 0.1 * bh),
            (0.03, belt),
            (0.7, belt),
            (0.97, front_top),
            (1.0, front_top - 0.1 * bh),
            (1.0, clr + 0.15 * bh),
            (0.97, clr),
            (0.03, clr),
        ],
        body,
    )

    # Accents that identify the maker.
    if style.accent == "spare_wheel":
        disc(-0.03, clr + 0.55 * bh, 0.075, dark)
        disc(-0.03, clr + 0.55 * bh, 0.035, _shade(body, 0.8))
        for i in range(4):  # slatted grille at the nose
            x = 0.9 + 0.022 * i
            band(x, x + 0.01, clr + 0.45 * bh, belt - 0.12 * bh, dark)
    elif style.accent == "stripe":
        band(0.02, 0.98, clr + 0.5 * bh, clr + 0.62 * bh, (235, 235, 225))
        poly([(0.68, clr + 0.25 * bh), (0.72, clr + 0.25 * bh), (0.75, clr + 0.45 * bh), (0.71, clr + 0.45 * bh)], dark)
    elif style.accent == "kidney":
        band(0.955, 0.975, clr + 0.45 * bh, front_top - 0.1 * bh, dark)
        band(0.98, 0.997, clr + 0.45 * bh, front_top - 0.1 * bh, dark)
        band(0.05, 0.95, clr, clr + 0.18 * bh, _shade(body, 0.45))
    elif style.accent == "two_tone":
        band(0.0, 1.0, clr, clr + 0.3 * bh, dark)
    elif style.accent == "chrome":
        band(0.04, 0.96, clr + 0.12 * bh, clr + 0.26 * bh, (245, 245, 250))
        disc(0.95, belt - 0.35 * bh, 0.03, (245, 245, 250))
        disc(0.95, belt - 0.35 * bh, 0.015, dark)
    elif style.accent == "coachline":
        poly([(0.03, clr + 0.55 * bh), (0.03, belt), (0.97, belt), (0.97, clr + 0.55 * bh)], (22, 20, 24))
        band(0.03, 0.97, clr + 0.5 * bh, clr + 0.56 * bh, (222, 186, 80))
        band(0.955, 1.0, clr + 0.2 * bh, belt + 0.015, (232, 232, 236))  # tall upright grille

    # Wheels: dark arch, tyre, hub.
    for x in (rear_x, front_x):
        disc(x, wr, wr * 1.18, dark)
        disc(x, wr, wr, (18, 18, 20))
        disc(x, wr, wr * 0.55, style.hub)
        disc(x, wr, wr * 0.18, dark)

    # Down-sample (anti-aliasing), then per-pixel noise of a random strength.
    small = np.asarray(image.reduce(ss), dtype=np.float32)
    sigma = rng.uniform(2.0, 7.0)
    small = small + rng.standard_normal(small.shape, dtype=np.float32) * sigma
    return Image.fromarray(np.clip(small + 0.5, 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------------
# Encoding and corruptions
# --------------------------------------------------------------------------------------------------


def _pick_format(rng: np.random.Generator) -> tuple[str, int]:
    kind = _FORMATS[int(np.searchsorted(_FORMAT_CUMULATIVE, rng.random() * _FORMAT_CUMULATIVE[-1], side="right"))][0]
    return kind, int(rng.integers(72, 96))


def _encode(image: Image.Image, kind: str, quality: int) -> bytes:
    """Encode an RGB image as `kind` (see `_FORMATS`); PIL's encoders are deterministic."""
    buffer = io.BytesIO()
    if kind == "jpeg":
        image.save(buffer, "JPEG", quality=quality)
    elif kind == "png":
        image.save(buffer, "PNG", compress_level=3)
    elif kind == "jpeg_l":
        image.convert("L").save(buffer, "JPEG", quality=quality)
    elif kind == "jpeg_cmyk":
        image.convert("CMYK").save(buffer, "JPEG", quality=quality)
    elif kind == "png_rgba":
        rgba = image.convert("RGBA")  # fully opaque: converting back to RGB loses nothing
        rgba.save(buffer, "PNG", compress_level=3)
    else:  # pragma: no cover - internal
        raise AssertionError(kind)
    return buffer.getvalue()


def _contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mean = x.mean()
    return (x - mean) * 0.3 + mean


def _gaussian_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x + rng.standard_normal(x.shape, dtype=np.float32) * 0.12 * 255


def _impulse_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    u = rng.random(x.shape, dtype=np.float32)
    out = x.copy()
    out[u < 0.03] = 0.0
    out[u > 0.97] = 255.0
    return out


def _jpeg_compression(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8), "RGB").save(buffer, "JPEG", quality=12)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.float32)


def _motion_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Average of shifted copies along a random direction (a line kernel), edges replicated."""
    h, w = x.shape[:2]
    length = max(3, round(min(h, w) * 0.08)) | 1
    theta = rng.uniform(0, math.pi)
    steps = np.linspace(-(length // 2), length // 2, length)
    pad = length // 2 + 1
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    out = np.zeros_like(x)
    for s in steps:
        dx, dy = int(round(s * math.cos(theta))), int(round(s * math.sin(theta)))
        out += padded[pad + dy : pad + dy + h, pad + dx : pad + dx + w]
    return out / len(steps)


def _pixelate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[:2]
    image = Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8), "RGB")
    small = image.resize((max(1, round(w * 0.3)), max(1, round(h * 0.3))), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST), dtype=np.float32)


def _spatter(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blobs of mud or water: smooth low-resolution noise, thresholded to cover about a sixth of the image."""
    h, w = x.shape[:2]
    coarse = rng.standard_normal((max(2, h // 8), max(2, w // 8))).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse, "F").resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    threshold = np.quantile(field, 0.83)
    mask = np.clip((field - threshold) * 4.0, 0.0, 1.0)[..., None] * 0.85
    colour = np.array((70, 50, 30) if rng.random() < 0.5 else (150, 170, 185), np.float32)
    return x * (1 - mask) + colour * mask


_CORRUPTIONS = {
    "contrast": _contrast,
    "gaussian_noise": _gaussian_noise,
    "impulse_noise": _impulse_noise,
    "jpeg_compression": _jpeg_compression,
    "motion_blur": _motion_blur,
    "pixelate": _pixelate,
    "spatter": _spatter,
}
assert tuple(_CORRUPTIONS) == ALL_CORRUPTIONS


def corrupt_image(image: Image.Image, corruption: str, rng: np.random.Generator) -> Image.Image:
    """Apply one named corruption at moderate severity; returns an RGB image of the same size."""
    if corruption not in _CORRUPTIONS:
        raise ValueError(f"Unknown corruption {corruption!r}; valid corruptions are {', '.join(ALL_CORRUPTIONS)}.")
    x = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = _CORRUPTIONS[corruption](x, rng)
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------------
# The dataset folder
# --------------------------------------------------------------------------------------------------


def _features() -> datasets.Features:
    return datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(stanford_cars_class_names()))}
    )


def _stream_id(name: str) -> int:
    """A stable integer per split name, mixed into the per-image seeds so every split draws differently."""
    return zlib.crc32(name.encode())


def _image_rng(seed: int, stream: str, index: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, _stream_id(stream), index, attempt])


def _split_plan(makers: Sequence[str], per_maker: int, seed: int, split: str) -> list[tuple[str, int, str]]:
    """(maker, label, class name) per row: each maker's classes in a shuffled round robin, rows shuffled."""
    rng = np.random.default_rng([seed, _stream_id(split), 0x5EED])
    rows: list[tuple[str, int, str]] = []
    for maker in makers:
        classes = _classes_by_maker()[maker]
        order = rng.permutation(len(classes))
        rows.extend((maker, *classes[order[i % len(classes)]]) for i in range(per_maker))
    return [rows[i] for i in rng.permutation(len(rows))]


class _Uniqueness:
    """Content hashes of every image written so far: no two rows, in any split, share image bytes."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def add(self, data: bytes) -> bool:
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest in self.seen:
            return False
        self.seen.add(digest)
        return True


def _render_split(
    split: str, plan: list[tuple[str, int, str]], image_size: tuple[int, int], seed: int, unique: _Uniqueness
) -> tuple[list[bytes], list[tuple[str, int]]]:
    images: list[bytes] = []
    encodings: list[tuple[str, int]] = []
    for index, (maker, _label, name) in enumerate(plan):
        for attempt in range(100):
            rng = _image_rng(seed, split, index, attempt)
            picture = render_car(maker, name, rng, image_size)
            kind, quality = _pick_format(rng)
            data = _encode(picture, kind, quality)
            if unique.add(data):
                break
        else:  # pragma: no cover - would need 100 hash collisions
            raise RuntimeError(f"Could not render a unique image for row {index} of split {split!r}.")
        images.append(data)
        encodings.append((kind, quality))
    return images, encodings


def _corrupt_split(
    corruption: str, test_images: list[bytes], encodings: list[tuple[str, int]], seed: int, unique: _Uniqueness
) -> list[bytes]:
    """The test images, decoded as stored, corrupted, and re-encoded in their original format and mode."""
    images: list[bytes] = []
    for index, (data, (kind, quality)) in enumerate(zip(test_images, encodings)):
        with Image.open(io.BytesIO(data)) as stored:
            original = stored.convert("RGB")
        for attempt in range(100):
            corrupted = corrupt_image(original, corruption, _image_rng(seed, corruption, index, attempt))
            out = _encode(corrupted, kind, quality)
            if unique.add(out):
                break
        else:  # pragma: no cover
            raise RuntimeError(f"Could not make a unique {corruption!r} image for test row {index}.")
        images.append(out)
    return images


def _write_parquet(path: Path, images: list[bytes], labels: list[int], features: datasets.Features) -> int:
    """Write one split with `Dataset.to_parquet`, which also stores the features in the schema metadata."""
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": data, "path": None} for data in images], "label": labels}, features=features
    )
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per split file is noise in pipeline logs
    try:
        table.to_parquet(str(path))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    return int(table.data.nbytes)


def _dataset_card(class_names: Sequence[str], splits: dict[str, tuple[int, int]], settings: dict) -> str:
    """README.md with Hub-style YAML front matter: features (with all class names), splits, data files.

    The YAML is what `load_dataset` reads first for a local folder: `configs` maps split names to
    files, `dataset_info` gives the features (so ClassLabel names survive even without parquet
    metadata) and the expected row counts, which `load_dataset` checks against the files.
    """
    card = {
        "dataset_info": {
            "features": [
                {"name": "image", "dtype": "image"},
                {"name": "label", "dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(class_names)}}}},
            ],
            "splits": [
                {"name": name, "num_bytes": nbytes, "num_examples": rows} for name, (rows, nbytes) in splits.items()
            ],
            "dataset_size": sum(nbytes for _, nbytes in splits.values()),
        },
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": name, "path": f"data/{name}-*"} for name in splits],
            }
        ],
        "task_categories": ["image-classification"],
        "tags": ["synthetic", "stanford-cars-shaped"],
    }
    front = yaml.safe_dump(card, sort_keys=False, allow_unicode=True)
    body = (
        "# Synthetic Stanford Cars demo source\n\n"
        "Generated offline by `car_maker_pipeline.data.synthetic.generate_demo_source`; shaped like "
        "`tanganke/stanford_cars` (same features, all 196 class names, parquet files under `data/`), "
        "with synthetic car drawings instead of photographs. Not real data: use it for demos and tests.\n\n"
        "Generation settings:\n\n```json\n" + json.dumps(settings, indent=2) + "\n```\n"
    )
    return f"---\n{front}---\n\n{body}"


def _validated(
    makers: Sequence[str],
    corruptions: Sequence[str],
    train_per_maker: int,
    test_per_maker: int,
    image_size: tuple[int, int],
) -> tuple[list[str], list[str]]:
    if isinstance(makers, str) or isinstance(corruptions, str):
        raise ValueError("makers and corruptions must be sequences of names, not a single string.")
    known = _classes_by_maker()
    makers, corruptions = list(makers), list(corruptions)
    bad_makers = [m for m in makers if m not in known]
    if bad_makers:
        raise ValueError(
            f"Unknown maker(s) {bad_makers}: no Stanford Cars class is made by them. "
            f"Valid makers are: {', '.join(sorted(known))}."
        )
    if not makers:
        raise ValueError(f"makers is empty; pick at least one of: {', '.join(sorted(known))}.")
    if len(set(makers)) != len(makers):
        raise ValueError(f"makers lists a maker twice: {makers}.")
    bad_corruptions = [c for c in corruptions if c not in ALL_CORRUPTIONS]
    if bad_corruptions:
        raise ValueError(
            f"Unknown corruption(s) {bad_corruptions}; valid corruptions are: {', '.join(ALL_CORRUPTIONS)}."
        )
    if len(set(corruptions)) != len(corruptions):
        raise ValueError(f"corruptions lists a corruption twice: {corruptions}.")
    if train_per_maker < 1 or test_per_maker < 1:
        raise ValueError(
            f"train_per_maker and test_per_maker must be at least 1 (got {train_per_maker}, {test_per_maker})."
        )
    if len(image_size) != 2 or min(image_size) < 16:
        raise ValueError(f"image_size must be (width, height) of at least 16 pixels each, got {image_size!r}.")
    return makers, corruptions


def _make_room(out_dir: Path) -> None:
    """Refuse to replace an existing non-empty folder unless this module made it."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a folder; choose another out_dir for the demo source.")
        if any(out_dir.iterdir()) and not (out_dir / MARKER_FILE).exists():
            raise FileExistsError(
                f"{out_dir} exists, is not empty and was not made by generate_demo_source; refusing to replace it. "
                "Delete it or choose another out_dir."
            )


def generate_demo_source(
    out_dir: str | Path,
    *,
    makers: Sequence[str] = DEMO_MAKERS,
    train_per_maker: int = 60,
    test_per_maker: int = 30,
    corruptions: Sequence[str] = ("contrast", "gaussian_noise", "motion_blur"),
    image_size: tuple[int, int] = (128, 96),
    seed: int = 0,
) -> Path:
    """Write a synthetic, Stanford-Cars-shaped source to `out_dir` and return `out_dir` as a Path.

    Splits: `train` and `test` with `*_per_maker` rows per maker, plus one corrupted copy of `test`
    per name in `corruptions` (same rows, labels and order). Labels are the real class ids of the
    makers' classes. Same arguments give byte-identical parquet files. An existing folder is replaced
    only if an earlier call made it; the new folder appears in one rename, never half-written.
    """
    makers, corruptions = _validated(makers, corruptions, train_per_maker, test_per_maker, image_size)
    image_size = (int(image_size[0]), int(image_size[1]))
    out_dir = Path(out_dir).expanduser().absolute()
    _make_room(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    features = _features()
    settings = {
        "makers": makers,
        "train_per_maker": train_per_maker,
        "test_per_maker": test_per_maker,
        "corruptions": corruptions,
        "image_size": list(image_size),
        "seed": seed,
    }
    remove_stale_temporaries(out_dir.parent)  # a generation killed mid-write leaves its folder behind
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=temporary_prefix(out_dir.name)))
    try:
        (tmp / "data").mkdir()
        unique = _Uniqueness()
        splits: dict[str, tuple[int, int]] = {}

        def write(split: str, images: list[bytes], labels: list[int]) -> None:
            nbytes = _write_parquet(tmp / "data" / f"{split}-00000-of-00001.parquet", images, labels, features)
            splits[split] = (len(images), nbytes)

        train_plan = _split_plan(makers, train_per_maker, seed, "train")
        train_images, _ = _render_split("train", train_plan, image_size, seed, unique)
        write("train", train_images, [label for _, label, _ in train_plan])
        del train_images

        test_plan = _split_plan(makers, test_per_maker, seed, "test")
        test_labels = [label for _, label, _ in test_plan]
        test_images, encodings = _render_split("test", test_plan, image_size, seed, unique)
        write("test", test_images, test_labels)
        for corruption in corruptions:
            write(corruption, _corrupt_split(corruption, test_images, encodings, seed, unique), test_labels)

        (tmp / "README.md").write_text(_dataset_card(stanford_cars_class_names(), splits, settings))
        (tmp / MARKER_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the finished source should be readable like any folder

        if out_dir.exists():  # made by us (checked above): swap it out, then drop the old copy
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old / "source")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, out_dir)
            except OSError:
                # Another process finished the same folder first. Same settings mean byte-identical
                # content, so theirs is as good as ours; anything else is a real conflict.
                marker = out_dir / MARKER_FILE
                if not (marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(settings))):
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
