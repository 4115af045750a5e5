"""spell_core.common.guards: the fused finiteness check and the rollback of an update to non-finite weights."""
import math

import pytest
import torch

from spell_core.common.guards import NonFiniteUpdatesError, UpdateGuard, all_finite, non_finite


def test_non_finite_names_every_tensor_with_a_nan_or_inf_and_huge_finite_values_pass():
    tensors = {"a": torch.ones(3), "b": torch.tensor([1.0, math.nan]), "c": torch.full((2, 2), 3e38),
               "d": torch.tensor([-math.inf], dtype=torch.bfloat16), "e": torch.arange(3)}
    assert non_finite(tensors) == ["b", "d"]  # 3e38 squared would overflow an L2 norm: not flagged
    assert not all_finite(tensors.values()) and all_finite([tensors["a"], tensors["c"], tensors["e"]])


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, list(model.parameters()), optimizer


def _step(model, optimizer):
    optimizer.zero_grad()
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()


def test_a_step_to_non_finite_weights_is_rolled_back_exactly_and_the_third_in_a_row_stops():
    model, params, optimizer = _setup()
    guard = UpdateGuard(params, optimizer, max_rollbacks=3)
    guard.snapshot()
    _step(model, optimizer)  # a good first step: the optimizer state now exists
    assert guard.check() and guard.consecutive == 0
    weights = [p.detach().clone() for p in params]
    state = {i: {k: v.clone() for k, v in optimizer.state[p].items()} for i, p in enumerate(params)}
    for attempt in (1, 2):
        guard.snapshot()
        _step(model, optimizer)
        with torch.no_grad():
            params[0][1, 2] = math.nan
        assert not guard.check() and guard.consecutive == attempt
        assert all(torch.equal(p, w) for p, w in zip(params, weights))
        for i, p in enumerate(params):
            assert optimizer.state[p].keys() == state[i].keys()
            assert all(torch.equal(optimizer.state[p][k], state[i][k]) for k in state[i])
    guard.snapshot()
    _step(model, optimizer)
    with torch.no_grad():
        params[1][0] = math.inf
    with pytest.raises(NonFiniteUpdatesError, match="3 optimizer steps in a row gave NaN/Inf weights"):
        guard.check()
    assert all(torch.equal(p, w) for p, w in zip(params, weights))  # rolled back before stopping


def test_rolling_back_the_first_step_leaves_no_optimizer_state():
    model, params, optimizer = _setup()
    weights = [p.detach().clone() for p in params]
    guard = UpdateGuard(params, optimizer)
    guard.snapshot()
    _step(model, optimizer)
    with torch.no_grad():
        params[0].fill_(math.nan)
    assert not guard.check()
    assert all(torch.equal(p, w) for p, w in zip(params, weights)) and len(optimizer.state) == 0
    guard.snapshot()
    _step(model, optimizer)  # a good step after a rollback resets the count
    assert guard.check() and guard.consecutive == 0


def test_without_a_snapshot_the_first_non_finite_step_raises_and_nothing_is_copied():
    model, params, optimizer = _setup()
    guard = UpdateGuard(params, optimizer, max_rollbacks=3, keep_snapshot=False)
    guard.snapshot()
    _step(model, optimizer)
    assert guard.check() and guard._buffers == {}  # no copy of 3 x the weights
    guard.snapshot()
    _step(model, optimizer)
    with torch.no_grad():
        params[0][0, 0] = math.nan
    with pytest.raises(NonFiniteUpdatesError, match="no copy of the weights from before it was kept") as info:
        guard.check()
    assert info.value.restored is False and math.isnan(params[0][0, 0].item())  # left as it is: not saved
