import pytest
import torch


@pytest.fixture(autouse=True)
def poison_empty():
    """Fill every torch.empty allocation with NaN during the test.

    The kernels allocate their outputs with torch.empty and promise to write
    every element; with deterministic algorithms on, torch fills uninitialised
    memory with NaN, so an element left unwritten shows up as NaN in the asserts.
    """
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
