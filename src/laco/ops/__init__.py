"""Token-grid operations: space-to-channel, its inverse, pooling, padding, prefix handling."""

from laco.ops.grid import (
    LAYOUT,
    LAYOUTS,
    PAD_POLICIES,
    Grid,
    PadPolicy,
    channel_average,
    channel_to_space,
    check_ratio,
    check_tokens,
    convert_layout,
    join_prefix,
    map_to_tokens,
    merged_grid,
    pad_grid,
    padded_grid,
    pool_tokens,
    space_to_channel,
    split_prefix,
    tokens_to_map,
)

__all__ = [
    "LAYOUT", "LAYOUTS", "PAD_POLICIES", "Grid", "PadPolicy", "channel_average", "channel_to_space", "check_ratio",
    "check_tokens", "convert_layout", "join_prefix", "map_to_tokens", "merged_grid", "pad_grid",
    "padded_grid", "pool_tokens", "space_to_channel", "split_prefix", "tokens_to_map",
]
