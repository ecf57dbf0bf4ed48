"""The demo draws the classes of one maker apart (offline/body_styles.py), so the class task is learnable.

| class name                                        | body type   | lamp   | spokes |
|---------------------------------------------------|-------------|--------|--------|
| BMW X6 SUV 2012                                   | SUV         | strip  | 3      |
| Chevrolet Express Cargo Van 2007                  | Van         | square | 6      |
| Chrysler Town and Country Minivan 2012            | Minivan     | strip  | 3      |
| Chevrolet Silverado 1500 Extended Cab 2012        | Cab         | strip  | 3      |
| Mercedes-Benz 300-Class Convertible 1993          | Convertible | round  | 4      |
| Audi TT Hatchback 2011                            | Hatchback   | strip  | 6      |
| Audi S4 Sedan 2007                                | Sedan       | square | 6      |
| Bugatti Veyron 16.4 Coupe 2009                    | Coupe       | strip  | 4      |
| Chevrolet Corvette ZR1 2012 (no body type)        | Sedan       | strip  | 3      |
| Dodge Magnum Wagon 2008                           | Wagon       | square | 3      |

Drawn with the same nuisance draw, two classes of one maker differ in more than 0.5% of the pixels (by
over 40 grey levels) when their body type or year differ; with the same body and year only the small hue
shift tells them apart (Mercedes-Benz C-Class and E-Class Sedan 2012).
"""

from __future__ import annotations

import numpy as np
import pytest

from car_maker_pipeline.data.classes import stanford_cars_class_names
from car_maker_pipeline.data.makers import maker_of
from car_maker_pipeline.offline.body_styles import BODY_TYPES, body_type, year_detail
from car_maker_pipeline.offline.rendering import render_car


@pytest.mark.parametrize(
    ("name", "body", "lamp", "spokes"),
    [
        ("BMW X6 SUV 2012", "SUV", "strip", 3),
        ("Chevrolet Express Cargo Van 2007", "Van", "square", 6),
        ("Chrysler Town and Country Minivan 2012", "Minivan", "strip", 3),
        ("Chevrolet Silverado 1500 Extended Cab 2012", "Cab", "strip", 3),
        ("Mercedes-Benz 300-Class Convertible 1993", "Convertible", "round", 4),
        ("Audi TT Hatchback 2011", "Hatchback", "strip", 6),
        ("Audi S4 Sedan 2007", "Sedan", "square", 6),
        ("Bugatti Veyron 16.4 Coupe 2009", "Coupe", "strip", 4),
        ("Chevrolet Corvette ZR1 2012", "Sedan", "strip", 3),
        ("Dodge Magnum Wagon 2008", "Wagon", "square", 3),
    ],
)
def test_body_type_and_year_detail_follow_the_name(name, body, lamp, spokes):
    assert body_type(name) == body
    assert (year_detail(name).lamp, year_detail(name).spokes) == (lamp, spokes)


def test_every_body_type_occurs_among_the_real_classes():
    bodies = {body_type(name) for name in stanford_cars_class_names()}
    assert bodies == set(BODY_TYPES)


def _changed_share(maker: str, first: str, second: str, draws: int = 12) -> float:
    """Median over nuisance draws of the share of pixels that differ by more than 40 grey levels between the
    two classes drawn with the same draw (same background, placement, facing and noise)."""
    shares = []
    for i in range(draws):
        a, b = (
            np.asarray(render_car(maker, name, np.random.default_rng([5, i]), (128, 96)), np.float32)
            for name in (first, second)
        )
        shares.append(float((np.abs(a - b).max(axis=2) > 40).mean()))
    return float(np.median(shares))


@pytest.mark.parametrize(
    ("first", "second", "differs"),
    [
        ("BMW 3 Series Sedan 2012", "BMW 3 Series Wagon 2012", True),  # body: a longer cabin, two dividers
        ("BMW 3 Series Sedan 2012", "BMW 1 Series Coupe 2012", True),  # body: lower roof, one window
        ("BMW 1 Series Convertible 2012", "BMW X3 SUV 2012", True),
        ("BMW X5 SUV 2007", "BMW X6 SUV 2012", True),  # year: lamps and spokes
        ("Mercedes-Benz C-Class Sedan 2012", "Mercedes-Benz Sprinter Van 2012", True),
        ("Mercedes-Benz C-Class Sedan 2012", "Mercedes-Benz E-Class Sedan 2012", False),  # a hue shift alone
    ],
)
def test_classes_of_one_maker_differ_by_body_and_year(first, second, differs):
    share = _changed_share(maker_of(first), first, second)
    assert (share > 0.005) == differs, share
