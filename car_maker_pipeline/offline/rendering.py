"""Synthetic side views of cars, drawn with PIL, whose maker is recognisable.

Why this look: what identifies the maker must be strong and survive resizing to about 64x64 and,
mostly, grayscale. Each maker has its own body hue family, silhouette (roof shape, body height,
ground clearance, wheel size) and a distinctive accent (spare wheel, racing stripe, kidney grille,
floating two-tone roof, chrome sill, coach line). Classes of one maker differ by a small hue shift and,
so that the class task can be learned, by the body type and year their name gives (`body_styles`:
cabin length and height, windows, roof rails, pickup bed, soft top; lamps and wheel spokes). Nuisance
factors the classifier must ignore vary per image: background gradient, position, scale, slight
rotation, facing direction and pixel noise.
"""

from __future__ import annotations

import colorsys
import math
import zlib
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from car_maker_pipeline.data.classes import stanford_cars_class_names
from car_maker_pipeline.data.makers import maker_of
from car_maker_pipeline.offline.body_styles import BodyShape, YearDetail, body_shape, year_detail

_SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges at almost no cost


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
def classes_by_maker() -> dict[str, tuple[tuple[int, str], ...]]:
    """Maker -> its (real label id, class name) pairs, in label-id order."""
    grouped: dict[str, list[tuple[int, str]]] = {}
    for label, name in enumerate(stanford_cars_class_names()):
        grouped.setdefault(maker_of(name), []).append((label, name))
    return {maker: tuple(classes) for maker, classes in grouped.items()}


@cache
def _class_variant(maker: str, source_class: str) -> tuple[MakerStyle, float, BodyShape, YearDetail]:
    """Per-class changes inside a maker: a small hue shift, and the body type and year of the name
    (`body_styles`). The maker's hue family, roof shape, accent and wheels are kept, so the maker stays
    learnable."""
    names = [name for _, name in classes_by_maker().get(maker, ())]
    if source_class not in names:
        raise ValueError(
            f"{source_class!r} is not a Stanford Cars class made by {maker!r}; "
            f"that maker's classes are: {names or 'none (unknown maker)'}."
        )
    style, shape = _style_for(maker), body_shape(source_class)
    index, count = names.index(source_class), len(names)
    hue_shift = (index - (count - 1) / 2) * min(4.0, 24.0 / max(count, 1))
    style = replace(
        style,
        roof_height=style.roof_height * shape.roof_scale,
        clearance=style.clearance * shape.clearance_scale,
    )
    return style, hue_shift, shape, year_detail(source_class)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _hsv(hue_deg: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((hue_deg % 360) / 360.0, min(max(saturation, 0.0), 1.0), min(max(value, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _shade(color: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * factor))) for c in color)  # type: ignore[return-value]


def _cabin_outline(style: MakerStyle, top: float, shape: BodyShape = BodyShape()) -> list[tuple[float, float]]:
    """The greenhouse (pillars and roof) above the belt line `top`, rear (x=0) to front (x=1): the maker's
    roof shape, stretched to where the body type puts the cabin's rear and front."""
    outline = _maker_cabin(style, top)
    xs = [x for x, _ in outline]
    low, high = min(xs), max(xs)
    rear = low if shape.cabin_rear is None else shape.cabin_rear
    front = high if shape.cabin_front is None else shape.cabin_front
    return [(rear + (x - low) * (front - rear) / (high - low), y) for x, y in outline]


def _maker_cabin(style: MakerStyle, top: float) -> list[tuple[float, float]]:
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
    style, hue_shift, shape, detail = _class_variant(maker, source_class)
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

    # Cabin (drawn first; the body overlaps its bottom edge), shaped by the body type; a soft top is dark.
    cabin = _cabin_outline(style, belt - 0.01, shape)
    roof_colour = body
    if style.accent == "two_tone":
        roof_colour = (238, 232, 212)  # cream floating roof
    elif style.accent == "coachline":
        roof_colour = (22, 20, 24)
    if shape.soft_top:
        roof_colour = (40, 38, 42)
    poly(cabin, roof_colour)
    window = _window_outline(cabin, belt - 0.01, style)
    poly(window, glass)
    xs = [x for x, _ in window]
    if style.accent == "two_tone":  # black pillars under the floating roof
        for x in (min(xs) + 0.01, (min(xs) + max(xs)) / 2, max(xs) - 0.01):
            band(x - 0.012, x + 0.012, belt, belt + 0.8 * style.roof_height, dark)
    for i in range(1, shape.pillars + 1):  # window dividers: none on a coupe, two on a wagon
        x = min(xs) + (max(xs) - min(xs)) * i / (shape.pillars + 1)
        band(x - 0.012, x + 0.012, belt, belt + 0.9 * style.roof_height, roof_colour)
    if shape.rails:
        roof_top = max(y for _, y in cabin)
        band(min(xs), max(xs), roof_top, roof_top + 0.015, dark)
    if shape.bed:  # the open bed's rail behind the cab
        band(0.03, min(x for x, _ in cabin) - 0.02, belt, belt + 0.035, _shade(body, 0.6))

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

    # Lamps by the year: round, square or a thin strip; head lamp at the nose, tail lamp at the back.
    lamp_y = belt - 0.3 * bh
    for x, colour in ((0.975, (250, 244, 205)), (0.025, (205, 35, 35))):
        if detail.lamp == "round":
            disc(x, lamp_y, 0.022, colour)
        elif detail.lamp == "square":
            band(x - 0.02, x + 0.02, lamp_y - 0.025, lamp_y + 0.025, colour)
        else:
            band(x - 0.045, x + 0.02, lamp_y - 0.008, lamp_y + 0.008, colour)

    # Wheels: dark arch, tyre, hub and the year's spokes.
    for x in (rear_x, front_x):
        disc(x, wr, wr * 1.18, dark)
        disc(x, wr, wr, (18, 18, 20))
        disc(x, wr, wr * 0.55, style.hub)
        for k in range(detail.spokes):
            turn = 2 * math.pi * k / detail.spokes
            draw.line(
                [pt(x, wr), pt(x + 0.5 * wr * math.cos(turn), wr + 0.5 * wr * math.sin(turn))],
                dark,
                max(1, int(0.012 * length)),
            )
        disc(x, wr, wr * 0.18, dark)

    # Down-sample (anti-aliasing), then per-pixel noise of a random strength.
    small = np.asarray(image.reduce(ss), dtype=np.float32)
    sigma = rng.uniform(2.0, 7.0)
    small = small + rng.standard_normal(small.shape, dtype=np.float32) * sigma
    return Image.fromarray(np.clip(small + 0.5, 0, 255).astype(np.uint8), "RGB")
