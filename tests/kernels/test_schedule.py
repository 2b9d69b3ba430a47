"""The device-side tile schedule and the token reduction: exact equality with plain-Python twins.

Shapes: M = rows, G = groups, BLOCK_M = rows per tile, R = permuted rows, T = tokens, d = model dim.
"""

import pytest
import torch
from kernel_testing import DEVICE

from moe_kernels.permute import sum_rows_by_token
from moe_kernels.schedule import max_row_tiles, tile_map, tile_map_reference


def _tiles(offs, num_rows, block_m):
    """The tiles the kernels will compute: every entry with group <= G, in order."""
    table = tile_map(torch.tensor(offs, dtype=torch.int32, device=DEVICE), num_rows, block_m).tolist()
    return [tuple(row) for row in table if row[0] <= len(offs)]


def test_worked_example_of_the_docstring():
    assert _tiles([3, 3, 9], 10, 4) == [(0, 0, 3), (2, 3, 9), (2, 7, 9), (3, 9, 10)]
    assert max_row_tiles(10, 3, 4) == 7


@pytest.mark.parametrize(
    "offs, num_rows, block_m",
    [
        ([0, 0, 5], 5, 4),  # empty groups first, no tail
        ([4, 4, 4, 4], 4, 4),  # exactly one full tile, empty groups last
        ([1], 1, 16),  # a single row
        ([0, 17, 17, 40, 40], 45, 8),  # empty first, middle, last, and a tail
        ([64], 64, 16),  # all rows in one group, whole tiles
        ([0], 3, 16),  # only a tail
    ],
)
def test_tile_map_matches_reference(offs, num_rows, block_m):
    assert _tiles(offs, num_rows, block_m) == tile_map_reference(offs, num_rows, block_m)


def test_grid_bound_holds_for_random_offsets():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        g, m, block_m = 7, int(torch.randint(1, 90, (1,), generator=gen)), 8
        cuts = torch.randint(0, m + 1, (g,), generator=gen).sort().values.tolist()
        tiles = tile_map_reference(cuts, m, block_m)
        assert len(tiles) <= max_row_tiles(m, g, block_m)
        assert _tiles(cuts, m, block_m) == tiles


def test_sum_rows_by_token_is_exact():
    # small integers: every fp32 sum is exact, so equality is the right check
    gen = torch.Generator().manual_seed(1)
    num_tokens, r, d = 7, 20, 45
    row_token = torch.randint(0, num_tokens - 1, (r,), generator=gen)  # the last token has no rows
    rows = torch.randint(-8, 8, (r, d), generator=gen).float()
    expected = torch.zeros(num_tokens, d).index_add_(0, row_token, rows)
    out = sum_rows_by_token(rows.to(DEVICE), row_token.to(DEVICE), num_tokens)
    assert torch.equal(out.cpu(), expected)
