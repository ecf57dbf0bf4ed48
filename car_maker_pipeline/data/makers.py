"""Collapse Stanford Cars make/model/year class names to car makers.

Class names look like "Aston Martin V8 Vantage Coupe 2012": a maker, a model, a year. Taking the
first word (what the tutorial did) yields "Aston", "Land" and "AM", so makers are matched against
a known list, longest first, which handles multi-word makers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Every maker in Stanford Cars, spelled as the dataset spells it. Multi-word makers are why a
# prefix match is needed at all.
KNOWN_MAKERS: tuple[str, ...] = (
    "AM General",
    "Acura",
    "Aston Martin",
    "Audi",
    "BMW",
    "Bentley",
    "Bugatti",
    "Buick",
    "Cadillac",
    "Chevrolet",
    "Chrysler",
    "Daewoo",
    "Dodge",
    "Eagle",
    "FIAT",
    "Ferrari",
    "Fisker",
    "Ford",
    "GMC",
    "Geo",
    "HUMMER",
    "Honda",
    "Hyundai",
    "Infiniti",
    "Isuzu",
    "Jaguar",
    "Jeep",
    "Lamborghini",
    "Land Rover",
    "Lincoln",
    "MINI",
    "Maybach",
    "Mazda",
    "McLaren",
    "Mercedes-Benz",
    "Mitsubishi",
    "Nissan",
    "Plymouth",
    "Porsche",
    "Ram",
    "Rolls-Royce",
    "Scion",
    "Spyker",
    "Suzuki",
    "Tesla",
    "Toyota",
    "Volkswagen",
    "Volvo",
    "smart",
)

# Longest first, so "Land Rover" wins over a hypothetical "Land".
_MAKERS_BY_LENGTH = sorted(KNOWN_MAKERS, key=len, reverse=True)
_YEAR = re.compile(r"^(19|20)\d\d$")


class UnknownClassNameError(ValueError):
    """A class name that no maker rule covers."""


@dataclass(frozen=True)
class ParsedClass:
    source_class: str
    maker: str
    model: str
    year: int | None


def normalize_class_name(name: str) -> str:
    """Collapse runs of whitespace and strip the ends; case is kept for display."""
    return " ".join(str(name).split())


def parse_class_name(name: str) -> ParsedClass:
    """Split a class name into maker, model and year.

    Matching ignores case and surrounding or repeated whitespace, so "aston  martin V8 ..." maps to
    the canonical "Aston Martin". A name that starts with no known maker raises
    `UnknownClassNameError` naming it.
    """
    clean = normalize_class_name(name)
    folded = clean.casefold()
    for maker in _MAKERS_BY_LENGTH:
        key = maker.casefold()
        if folded == key or folded.startswith(key + " "):
            rest = clean[len(maker) :].strip()
            tokens = rest.split()
            year = int(tokens[-1]) if tokens and _YEAR.match(tokens[-1]) else None
            model = " ".join(tokens[:-1] if year is not None else tokens)
            return ParsedClass(source_class=str(name), maker=maker, model=model, year=year)
    raise UnknownClassNameError(
        f"Class name {name!r} does not start with any known car maker. Add its maker to "
        "KNOWN_MAKERS in car_maker_pipeline/data/makers.py, or fix the class name in the source."
    )


def maker_of(name: str) -> str:
    return parse_class_name(name).maker


def makers_for_class_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """Maker of each class name, in order. Every unknown name is reported at once."""
    makers, unknown = [], []
    for name in names:
        try:
            makers.append(maker_of(name))
        except UnknownClassNameError:
            unknown.append(name)
    if unknown:
        raise UnknownClassNameError(
            f"{len(unknown)} class name(s) match no known car maker: {unknown!r}. Add the maker to "
            "KNOWN_MAKERS in car_maker_pipeline/data/makers.py, or fix the class names in the source."
        )
    return makers
