"""A run's cost files read a kind at a time: the same tensors as the layers' costs concatenated."""

import pytest
import torch

from bitsmoe_vllm.offline.cost_files import CostFiles
from bitsmoe_vllm.offline.rundir import RunDir


@pytest.fixture
def layers(tmp_path):
    run = RunDir(tmp_path / "out", {}, False, False)
    g = torch.Generator().manual_seed(0)
    saved = []
    for i, units in enumerate((5, 3, 7)):
        costs = {
            "loss-identity": torch.rand(units, 4, generator=g, dtype=torch.float64),
            "basis_loss-int8": torch.rand(units, generator=g, dtype=torch.float64),
            "routed_tokens": torch.tensor([i, i + 1]),
        }
        run.save(f"layer-{i:05d}", costs)
        saved.append(costs)
    return CostFiles([run.path(f"layer-{i:05d}") for i in range(3)]), saved


def test_a_kind_is_every_layers_costs_in_order(layers):
    costs, saved = layers
    assert costs.kinds == ["basis_loss-int8", "loss-identity"]
    assert "loss-identity" in costs and "nearest-identity" not in costs and "routed_tokens" not in costs
    whole = torch.cat([s["loss-identity"] for s in saved])
    assert torch.equal(costs["loss-identity"], whole)
    assert torch.equal(costs["basis_loss-int8"], torch.cat([s["basis_loss-int8"] for s in saved]))
    assert torch.equal(costs.column("loss-identity", 2), whole[:, 2])
    choice = torch.randint(0, 4, (len(whole),), generator=torch.Generator().manual_seed(1))
    assert torch.equal(costs.chosen("loss-identity", choice), whole.gather(1, choice[:, None])[:, 0])
    assert costs.stacked("routed_tokens").tolist() == [[0, 1], [1, 2], [2, 3]]


def test_a_missing_kind_names_those_there(layers):
    costs, _ = layers
    with pytest.raises(
        KeyError, match=r"'nearest-int8': the run's cost files hold \['basis_loss-int8', 'loss-identity'\]"
    ):
        costs["nearest-int8"]
