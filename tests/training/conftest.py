import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): the
    tiny model's tensors gain nothing from threads, and on a busy 2-core machine OpenMP threads waiting
    for a core made test_methods.py 30x slower (measured: 1 s against 38 s per run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
