"""How many demo images each maker gets, and at what size: the knobs that make the demo look like the real data.

Maker balance. Stanford Cars has about 41 training images per class (8,144 over 196 classes), so a
maker's share of the data follows its number of classes, and those are very unequal. Counted from
the 196 class names (`classes_by_maker`):

    22 Chevrolet; 15 Dodge; 14 Audi; 13 BMW; 12 Ford; 11 Hyundai;
    6 Acura, Bentley, Chrysler, Mercedes-Benz; 5 GMC, Jeep;
    4 Aston Martin, Buick, Ferrari, Honda, Lamborghini, Nissan, Suzuki, Toyota;
    3 Cadillac, Rolls-Royce, Volkswagen, Volvo; 2 Bugatti, FIAT, HUMMER, Infiniti, Land Rover, Spyker;
    1 each: AM General, Daewoo, Eagle, Fisker, Geo, Isuzu, Jaguar, Lincoln, MINI, Maybach, Mazda,
      McLaren, Mitsubishi, Plymouth, Porsche, Ram, Scion, Tesla, smart.

`balance="stanford"` gives each chosen maker images in proportion to its real class count (the
demo's six makers: BMW 13 : Mercedes-Benz 6 : Aston Martin 4 : Rolls-Royce 3 : Land Rover 2 :
AM General 1), keeping the total of `per_maker` x makers; `balance="uniform"` gives every maker
the same number. The demo profile's source draws the real proportions (`StanfordCarsSource.demo_balance`
defaults to stanford), since a classifier trained on equal shares hides what rare makers cost;
`generate_demo_source` called directly stays uniform unless asked, so its folders keep their bytes.
At the profile's default 60 train / 30 test per maker, the rarest maker (AM General) gets 12 train
images (11 after the validation split carves one out) and 6 test images; no maker gets fewer than
MIN_IMAGES_PER_MAKER.

Image sizes. The default demo draws every picture at 128x96 (fast, and enough for the tiny models).
Real Stanford Cars photos run from about 100 px to several thousand px wide, and LFM2-VL's processor
turns them into 70 (300x200) to 2,000+ image tokens (1600x1200: 1,770 in 6 tiles + thumbnail;
4000x500: 2,273 in 1x8 tiles). `image_sizes="realistic"` samples each image's size from a mixture
chosen to exercise exactly those regimes, since the evaluator's padding and batching behaviour
depends on the spread of token counts, not on the mean:

    75%  photos: width log-normal around 640 px (sigma 0.45, 160..2,000), aspect 1.2..1.9
    10%  large photos: 2,000..5,616 px wide (the largest real camera frames), aspect 1.33..1.6
     7%  wide crops: aspect 2.5..8 (banner-like strips, 1x4 to 1x8 tiles), 600..4,000 px wide
     8%  small thumbnails: 90..200 px wide, aspect 1.2..1.8

The picture is drawn at no more than 256 px wide and resized up, so a 5,616 px image costs an
upscale and a JPEG encode, not a 5,616 px drawing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAKER_BALANCES = ("uniform", "stanford")
IMAGE_SIZE_MODES = ("demo", "realistic")
MIN_IMAGES_PER_MAKER = 2  # a stratified validation split needs two training images of every maker
DRAW_WIDTH_LIMIT = 256


def images_per_maker(
    makers: Sequence[str], per_maker: int, balance: str, class_counts: dict[str, int], total: int | None = None
) -> dict[str, int]:
    """Rows per maker for one split: equal (uniform) or shares of the real class counts (stanford).

    The split holds `total` rows (default `per_maker` x makers), so a source can match the real
    dataset's 8,144 train and 8,041 test images exactly.
    """
    if balance not in MAKER_BALANCES:
        raise ValueError(f"Unknown maker balance {balance!r}; use one of {', '.join(MAKER_BALANCES)}.")
    if balance == "uniform" and total is None:
        return {maker: per_maker for maker in makers}
    total = per_maker * len(makers) if total is None else total
    if balance == "uniform":
        weights = np.ones(len(makers))
    else:
        weights = np.array([class_counts[maker] for maker in makers], dtype=float)
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(int)
    # Largest remainders first, so the split holds exactly `total` rows whatever the rounding.
    for index in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[index] += 1
    return {maker: max(int(count), MIN_IMAGES_PER_MAKER) for maker, count in zip(makers, counts)}


def realistic_image_size(rng: np.random.Generator) -> tuple[int, int]:
    """One (width, height) from the mixture in the module docstring."""
    kind = rng.random()
    if kind < 0.75:
        width = float(np.clip(640 * np.exp(rng.normal(0.0, 0.45)), 160, 2000))
        aspect = rng.uniform(1.2, 1.9)
    elif kind < 0.85:
        width, aspect = rng.uniform(2000, 5616), rng.uniform(1.33, 1.6)
    elif kind < 0.92:
        width, aspect = rng.uniform(600, 4000), rng.uniform(2.5, 8.0)
    else:
        width, aspect = rng.uniform(90, 200), rng.uniform(1.2, 1.8)
    return int(width), max(16, int(width / aspect))


def drawing_size(final_size: tuple[int, int]) -> tuple[int, int]:
    """The size to draw at before resizing to `final_size`: at most DRAW_WIDTH_LIMIT wide, same aspect."""
    width, height = final_size
    if width <= DRAW_WIDTH_LIMIT:
        return width, max(16, height)
    scale = DRAW_WIDTH_LIMIT / width
    return DRAW_WIDTH_LIMIT, max(16, round(height * scale))
