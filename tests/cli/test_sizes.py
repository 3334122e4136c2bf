"""Human sizes: Docker's go-units HumanSize (decimal units, four significant digits)."""

from __future__ import annotations

import pytest

from aufs.cli.sizes import human_size


@pytest.mark.parametrize(("size", "shown"), [
    (0, "0B"),
    (1, "1B"),
    (999, "999B"),
    (1000, "1kB"),  # the first unit boundary: 1000, not 1024
    (1001, "1.001kB"),
    (1024, "1.024kB"),
    (123456, "123.5kB"),  # four significant digits, rounded
    (999499, "999.5kB"),
    (999949, "999.9kB"),
    (999950, "1000kB"),  # rounds up after the unit was chosen, as Docker prints it
    (1000000, "1MB"),
    (1048576, "1.049MB"),
    (198900834, "198.9MB"),
    (999999999, "1000MB"),
    (10**9, "1GB"),
    (3_420_000_000, "3.42GB"),
    (5_372_000_000_000, "5.372TB"),
    (10**15, "1PB"),
    (10**24, "1YB"),
    (10**28, "1e+04YB"),  # no unit above YB: go-units prints the exponent
    (2.5, "2.5B"),
])
def test_human_size_matches_go_units(size: float, shown: str) -> None:
    assert human_size(size) == shown
