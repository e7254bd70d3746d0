"""Phase 1 splits blocks into Ray tasks of about equal measured cost."""
from eta.bound import bind, splits_for
from eta.phases.pretrain import block_costs, plan_groups
from eta.space import parse_space

from .conftest import tiny_space_dict


def test_groups_cover_every_block_once_and_balance_cost():
    costs = {0: 10.0, 1: 9.0, 2: 3.0, 3: 3.0, 4: 2.0, 5: 2.0, 6: 1.0}
    groups = plan_groups(list(costs), 2, costs)
    assert sorted(b for g in groups for b in g) == list(costs)
    loads = [sum(costs[b] for b in g) for g in groups]
    assert max(loads) == 15.0  # the optimum for these costs; contiguous halves [0..3] / [4..6] would give 25
    assert plan_groups([3, 5], 4) == [[3], [5]]  # never more groups than blocks
    assert plan_groups([1, 2, 3], 1) == [[1, 2, 3]]


def test_block_costs_are_measured_for_every_block():
    space = parse_space(tiny_space_dict(), "test")
    bound = bind(space, splits_for(space))
    blocks = list(range(bound.num_blocks))
    costs = block_costs(bound, blocks, batch=8, reps=1)
    assert set(costs) == set(blocks)
    assert all((costs[b] > 0) == bool(bound.trainable_specs(b)) for b in blocks)  # blocks with nothing to train cost nothing
