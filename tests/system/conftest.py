"""The lab fixture, for the tests that run the daemons from the image in the lab."""
from tests.lab.conftest import lab  # noqa: F401
