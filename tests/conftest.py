import os

# Before torch or triton is imported anywhere: Triton kernels run in the interpreter on the CPU,
# and OpenMP must not spin on the 2 vCPUs of the test machines.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Importing rlhf turns huge pages on for every process started after it, so the tests that measure RSS
# (to 4 KiB) would see 2 MiB steps or not depending on which tests ran first: off for the whole suite,
# and tests/test_memory.py checks the import's effect in processes of its own.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "0")

import pytest  # noqa: E402

DEVICES = ("cpu", "cuda")


def pytest_addoption(parser):
    parser.addoption("--device", choices=DEVICES, default="cpu",
                     help="cuda: run the tests marked any_device with every tensor made without a device on the "
                          "GPU (Triton compiled, not interpreted), and the tests marked cuda; deselect the rest")


def pytest_configure(config):
    config.addinivalue_line("markers", "any_device: runs on --device cuda too, tensors on the GPU by default")
    config.addinivalue_line("markers", "cpu_only: a CPU fact (C++ kernels, the interpreter): skipped on --device cuda")
    config.addinivalue_line("markers", "cuda: needs a GPU: skipped without CUDA, run by plain pytest where there is one")
    if config.getoption("--device") == "cuda":
        os.environ["TRITON_INTERPRET"] = "0"  # read when the kernels are decorated, at their first import


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device") == "cpu":
        return
    selected = [i for i in items if i.get_closest_marker("any_device") or i.get_closest_marker("cuda")]
    config.hook.pytest_deselected(items=[i for i in items if i not in selected])
    items[:] = selected


@pytest.fixture(autouse=True)
def default_device(request):
    """Under --device cuda, an any_device test makes its tensors on the GPU unless it names a device."""
    device = request.config.getoption("--device")
    if device == "cpu" or not request.node.get_closest_marker("any_device"):
        yield
        return
    if request.node.get_closest_marker("cpu_only"):
        pytest.skip("a CPU fact: not run on --device cuda")
    import torch

    if not torch.cuda.is_available():
        pytest.fail("--device cuda: torch sees no CUDA device")
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(None)


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
