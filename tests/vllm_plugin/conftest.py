import pytest


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory):
    """One folder for the checkpoints of every vLLM plugin test (fixtures.py builds each family once)."""
    return tmp_path_factory.mktemp("vllm")
