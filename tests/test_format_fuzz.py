"""Property-based: whatever is wrong in quantization_config or in a tensor's dtype and shape, loading either
accepts it or refuses it with a ValueError that names the key or the tensor, never another exception."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitsmoe_vllm.format import QuantConfig, check_tensors
from tests.helpers import random_checkpoint

CHECKPOINT = random_checkpoint(64, 64, 4, (64, 40, 64), 32)
CONFIG = CHECKPOINT[0].to_dict()

JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-300, 300), max_size=6),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def key_paths(value, path=()):
    """Every path to a value in nested dicts and lists."""
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from key_paths(child, (*path, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from key_paths(child, (*path, i))


PATHS = [p for p in key_paths(CONFIG) if p]


@st.composite
def broken_configs(draw):
    """The valid config with 1-3 values replaced by arbitrary JSON, or deleted."""
    d = copy.deepcopy(CONFIG)
    for path in draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=3)):
        parent = d
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()) and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(JSON_VALUES)
        except (KeyError, IndexError, TypeError):  # an earlier edit removed or replaced this path
            continue
    return d


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(broken_configs())
def test_any_config_is_loaded_or_refused_naming_a_key(d):
    try:
        cfg = QuantConfig.from_dict(d)
    except ValueError as err:
        assert str(err).startswith("quantization_config"), err
        return
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg  # what loads is self-consistent


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool]


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(CHECKPOINT[1])),
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 300), min_size=0, max_size=3),
)
def test_any_tensor_dtype_and_shape_is_loaded_or_refused_naming_it(name, dtype, shape):
    cfg, tensors = CHECKPOINT
    tensors = {**tensors, name: torch.zeros(shape, dtype=dtype)}
    expected = CHECKPOINT[1][name]
    try:
        check_tensors(cfg, tensors)
    except ValueError as err:
        assert f"'{name}'" in str(err), err
        return
    assert dtype == expected.dtype and list(shape) == list(expected.shape)  # only the right metadata loads


@pytest.mark.parametrize("value", [-1, 0, 10**9, 2.5, "64", None])
def test_absurd_rank_is_refused_naming_the_key(value):
    d = copy.deepcopy(CONFIG)
    module = next(iter(d["layers"]))
    d["layers"][module]["up"]["rank"] = value
    with pytest.raises(ValueError) as err:
        QuantConfig.from_dict(d)
    assert str(err.value).startswith("quantization_config.layers") and ".up.rank: expected" in str(err.value), err.value
