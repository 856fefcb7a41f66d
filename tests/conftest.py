"""Test configuration: the repository's scripts are importable, slow end-to-end tests are marked."""

import os
import sys

# import train, model, ...
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-second end-to-end tests (still run in CI)")
    config.addinivalue_line("filterwarnings", "ignore::FutureWarning")
