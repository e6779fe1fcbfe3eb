"""Shared test set-up: no network, no wandb, and a summary of the figures tests measure."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

_MEASURED: list[str] = []


@pytest.fixture(scope="module")
def one_thread():
    """Runs a test module with one torch thread (module scope: covers its module fixtures)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def report():
    """Call ``report("text")`` to print a measured figure in the session's closing summary."""
    return _MEASURED.append


def pytest_terminal_summary(terminalreporter):
    if _MEASURED:
        terminalreporter.section("measured figures")
        for line in _MEASURED:
            terminalreporter.write_line(line)
