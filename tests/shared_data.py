"""The offline copies of the housing data in `../shared/data` (never committed here)."""

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CALIFORNIA = DATA / "california_housing.csv.gz"
BOSTON = DATA / "boston_housing.csv.gz"


def data_file(path):
    """`path` as a string, or skips the test with the reason when the copy is absent."""
    if not path.exists():
        pytest.skip(
            f"{DATA} absent: this test needs the offline copy {path.name} "
            "(see shared/data/README.md)"
        )
    return str(path)
