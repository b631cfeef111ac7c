import pytest

from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """arch -> directory of a tiny random checkpoint of that architecture, built once per session."""
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(arch))
        return built[arch]

    return get
