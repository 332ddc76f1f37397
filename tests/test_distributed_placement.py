"""Placement of CQIL groups over ranks: pure, no processes."""

import json

import pytest

from cqil_kernels import CQILPlan
from cqil_kernels.distributed import Placement, place


def test_pairs_on_two_ranks_paper_plan():
    p = place(CQILPlan.contiguous(12, 30, 2), world_size=2, num_layers=32)
    assert p.num_split_groups == 9
    assert [p.shard(g, 0) for g in range(9)] == [(12 + 2 * g,) for g in range(9)]
    assert [p.shard(g, 1) for g in range(9)] == [(13 + 2 * g,) for g in range(9)]
    assert p.replicated_layers == tuple(range(12)) + (30, 31)
    # every layer held by exactly the ranks that compute it
    for layer in range(32):
        holders = [r for r in range(2) if layer in p.layers_of(r)]
        assert holders == ([0, 1] if layer in p.replicated_layers else [p.owner(layer)])


def test_contiguous_blocks_p4_on_two_and_four_ranks():
    plan = CQILPlan([[2, 3, 4, 5]], bypass=1)
    two = place(plan, 2, 8)
    assert two.shard(0, 0) == (2, 3) and two.shard(0, 1) == (4, 5)
    assert list(two.local_positions(0, 1)) == [2, 3]
    assert two.owner(3) == 0 and two.owner(4) == 1 and two.owner(0) is None
    four = place(plan, 4, 8)
    assert [four.shard(0, r) for r in range(4)] == [(2,), (3,), (4,), (5,)]
    assert four.layers_of(2) == (0, 1, 4, 6, 7)
    assert four.bypass == 1


def test_one_rank_holds_everything_and_size_one_groups_are_replicated():
    plan = CQILPlan([[0], [2, 3]])
    one = place(plan, 1, 5)
    assert one.layers_of(0) == tuple(range(5)) and one.num_split_groups == 0
    assert one.shard(1, 0) == (2, 3)
    # a group of one layer is fine on any world size and stays replicated
    p = place(CQILPlan([[1], [2, 3]]), 2, 5)
    assert p.owner(1) is None and not p.is_split(0) and p.is_split(1)


@pytest.mark.parametrize("groups, world, fragment", [
    ([[0, 1, 2]], 2, "group 0 [0, 1, 2] of 3 layers cannot be split over 2 ranks"),
    ([[0, 1], [4, 5, 6, 7]], 4, "group 0 [0, 1] of 2 layers cannot be split over 4 ranks"),
    ([[0, 1, 2, 3], [4, 5]], 4, "group 1 [4, 5] of 2 layers cannot be split over 4 ranks"),
])
def test_unplaceable_plans_are_refused_naming_the_group(groups, world, fragment):
    with pytest.raises(ValueError) as e:
        place(CQILPlan(groups), world, 8)
    assert fragment in str(e.value)


@pytest.mark.parametrize("world, layers", [(0, 8), (-1, 8), (2, 0), (True, 8), (2.0, 8)])
def test_bad_world_size_or_layer_count(world, layers):
    with pytest.raises(ValueError):
        place(CQILPlan([[0, 1]]), world, layers)


def test_plan_out_of_range_and_bad_rank():
    with pytest.raises(ValueError, match="out of range"):
        place(CQILPlan([[6, 7]]), 2, 7)
    p = place(CQILPlan([[0, 1]]), 2, 4)
    with pytest.raises(ValueError, match="rank must be"):
        p.shard(0, 2)
    with pytest.raises(ValueError, match="out of range"):
        p.owner(9)


def test_json_round_trip_and_report_shape():
    p = place(CQILPlan([[1, 2], [3, 4, 5, 6]]), 2, 8)
    data = json.loads(p.to_json())
    assert data["world_size"] == 2 and data["num_layers"] == 8
    assert data["ranks"][0] == {"rank": 0, "layers": [0, 1, 3, 4, 7], "group_layers": [[1], [3, 4]]}
    assert data["ranks"][1]["layers"] == [0, 2, 5, 6, 7]
    assert data["replicated"] == [0, 7]
    assert Placement.from_dict(data) == p
    with pytest.raises(ValueError):
        Placement.from_dict({"world_size": 2})
