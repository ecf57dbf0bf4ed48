"""What tells the demo's classes of one maker apart: the body type the class names, and its year.

The class task (make, model and year) is only learnable on the demo if two classes of one maker look
different. The real names say how: nearly every Stanford Cars class ends in a body type and a year
("BMW X6 SUV 2012", "Chevrolet Silverado 1500 Extended Cab 2012"). So:

- the body type changes the drawn silhouette within the maker's own style: roof height, clearance,
  how far the cabin reaches back, how many windows, roof rails, an open pickup bed, a soft top;
- the year changes the lamps: round before 2000, square from 2000 to 2008, a thin strip from 2009 on,
  and the wheels: 3 to 6 spokes by the year's remainder modulo 4, so two years of one model differ too.

The rule, in order of the first word that matches in the name: Minivan, Van, Convertible, Cab, SUV,
Hatchback, Wagon, Coupe, Sedan; a name with none of them is drawn as a sedan. Maker cues (hue family,
roof shape, accent, wheel size) stay as `rendering.MakerStyle` says, so the maker stays the strongest
signal and the maker task keeps what it learned from.
"""

from __future__ import annotations

from dataclasses import dataclass

from car_maker_pipeline.data.makers import parse_class_name

# First match wins: "Minivan" before "Van", and "Cab" covers Crew, Extended, Regular, Club and Quad Cab.
BODY_TYPES = ("Minivan", "Van", "Convertible", "Cab", "SUV", "Hatchback", "Wagon", "Coupe", "Sedan")
DEFAULT_BODY = "Sedan"


@dataclass(frozen=True)
class BodyShape:
    """Changes to the maker's silhouette. Lengths in units of the car length, like `MakerStyle`."""

    roof_scale: float = 1.0  # times the maker's roof height
    clearance_scale: float = 1.0
    cabin_rear: float | None = None  # where the cabin starts at the back (x); None keeps the maker's
    cabin_front: float | None = None  # where the windscreen meets the bonnet; None keeps the maker's
    pillars: int = 1  # dividers between side windows: 0 a coupe's single window, 2 a wagon's three
    rails: bool = False  # roof rails
    bed: bool = False  # an open pickup bed behind a short cabin
    soft_top: bool = False  # a low dark fabric roof


SHAPES: dict[str, BodyShape] = {
    "Sedan": BodyShape(),
    "Coupe": BodyShape(roof_scale=0.85, pillars=0),
    "Convertible": BodyShape(roof_scale=0.8, pillars=0, soft_top=True),
    "SUV": BodyShape(roof_scale=1.15, clearance_scale=1.35, cabin_rear=0.05, pillars=2, rails=True),
    "Hatchback": BodyShape(roof_scale=1.05, cabin_rear=0.03),
    "Wagon": BodyShape(cabin_rear=0.02, pillars=2),
    "Cab": BodyShape(roof_scale=1.1, clearance_scale=1.3, cabin_rear=0.4, cabin_front=0.72, bed=True),
    "Van": BodyShape(roof_scale=1.6, clearance_scale=1.1, cabin_rear=0.02, cabin_front=0.8, pillars=2),
    "Minivan": BodyShape(roof_scale=1.35, cabin_rear=0.03, cabin_front=0.78, pillars=2),
}


@dataclass(frozen=True)
class YearDetail:
    lamp: str  # "round" (before 2000), "square" (2000-2008) or "strip" (2009 on)
    spokes: int  # 3 to 6


def body_type(source_class: str) -> str:
    words = set(source_class.replace("-", " ").split())
    return next((body for body in BODY_TYPES if body in words), DEFAULT_BODY)


def year_detail(source_class: str) -> YearDetail:
    """The lamps and wheel spokes of the class's year (a name without a year draws as 2012)."""
    year = parse_class_name(source_class).year or 2012
    lamp = "round" if year < 2000 else "square" if year < 2009 else "strip"
    return YearDetail(lamp, 3 + year % 4)


def body_shape(source_class: str) -> BodyShape:
    return SHAPES[body_type(source_class)]
