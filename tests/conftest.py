"""Shared test settings."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _no_shared_fitness_cache(monkeypatch):
    # Runs must not reuse each other's results through ~/.cache (tests compare tables of
    # separate runs); the cache's own tests point GP_LOSS_CACHE at a temporary file.
    monkeypatch.setenv("GP_LOSS_CACHE", "off")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # One thread, as search workers use: tiny models and probe batches run several times
    # faster so on 2 cores, and the serial executor would change it for the process anyway.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
