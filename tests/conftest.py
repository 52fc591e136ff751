import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory):
    """Every test session compiles into its own cache, so a stale library can never pass a test."""
    path = tmp_path_factory.mktemp("qigen-cache")
    old = os.environ.get("QIGEN_CACHE_DIR")
    os.environ["QIGEN_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        del os.environ["QIGEN_CACHE_DIR"]
    else:
        os.environ["QIGEN_CACHE_DIR"] = old
