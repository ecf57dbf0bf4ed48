import pytest

from car_maker_pipeline.data.classes import stanford_cars_class_names
from car_maker_pipeline.data.makers import (
    KNOWN_MAKERS,
    UnknownClassNameError,
    makers_for_class_names,
    parse_class_name,
)


def test_every_real_class_name_maps_to_a_known_maker():
    names = stanford_cars_class_names()
    assert len(names) == 196
    makers = makers_for_class_names(names)
    assert sorted(set(makers)) == sorted(KNOWN_MAKERS)
    assert len(set(makers)) == 49
    # The tutorial's first-word rule produced these; none may survive.
    assert not {"AM", "Aston", "Land"} & set(makers)


@pytest.mark.parametrize(
    ("name", "maker", "model", "year"),
    [
        ("AM General Hummer SUV 2000", "AM General", "Hummer SUV", 2000),
        ("Aston Martin V8 Vantage Coupe 2012", "Aston Martin", "V8 Vantage Coupe", 2012),
        ("Land Rover Range Rover SUV 2012", "Land Rover", "Range Rover SUV", 2012),
        ("Mercedes-Benz C-Class Sedan 2012", "Mercedes-Benz", "C-Class Sedan", 2012),
        (
            "Rolls-Royce Phantom Drophead Coupe Convertible 2012",
            "Rolls-Royce",
            "Phantom Drophead Coupe Convertible",
            2012,
        ),
        ("HUMMER H2 SUT Crew Cab 2009", "HUMMER", "H2 SUT Crew Cab", 2009),
        ("Ram C/V Cargo Van Minivan 2012", "Ram", "C/V Cargo Van Minivan", 2012),
        ("smart fortwo Convertible 2012", "smart", "fortwo Convertible", 2012),
    ],
)
def test_parse_class_name(name, maker, model, year):
    parsed = parse_class_name(name)
    assert (parsed.maker, parsed.model, parsed.year) == (maker, model, year)


def test_case_and_whitespace_variants_map_to_the_canonical_maker():
    assert parse_class_name("  aston   MARTIN Virage Coupe 2012 ").maker == "Aston Martin"
    assert parse_class_name("land rover LR2 SUV 2012").maker == "Land Rover"


def test_unknown_class_name_is_a_clear_error_naming_it():
    with pytest.raises(UnknownClassNameError, match="Trabant 601 1980") as error:
        makers_for_class_names(["Audi A5 Coupe 2012", "Trabant 601 1980"])
    assert "KNOWN_MAKERS" in str(error.value)
