"""Test configuration: the repository's scripts are importable, slow end-to-end tests are marked."""

import os
import socket
import sys

import pytest

# import train, model, ...
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-second end-to-end tests (still run in CI)")
    config.addinivalue_line("filterwarnings", "ignore::FutureWarning")


LOCAL = ("localhost", "127.0.0.1", "::1", "")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """No test reaches the network (CI has none): a lookup or connection off this machine fails
    at once, so a download a test forgot to stub is an error here, not a hang there. The gloo
    rendezvous of the two-rank tests is local and not affected."""
    lookup, connect = socket.getaddrinfo, socket.socket.connect

    def local_lookup(host, *args, **kwargs):
        if host not in LOCAL:
            raise socket.gaierror(f"tests never use the network (looked up {host!r})")
        return lookup(host, *args, **kwargs)

    def local_connect(self, address):
        if isinstance(address, tuple) and address[0] not in LOCAL:
            raise OSError(f"tests never use the network (connected to {address})")
        return connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", local_lookup)
    monkeypatch.setattr(socket.socket, "connect", local_connect)
