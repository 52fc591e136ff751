import os
import sys

import pytest

# The real default model, fetched once into the user's cache before the tests point the cache elsewhere.
if not os.environ.get("QIGEN_TEST_GGUF"):
    from runtime.checkpoint import default_model

    os.environ["QIGEN_TEST_GGUF"] = str(default_model(lambda s: print(s, file=sys.stderr)))


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
