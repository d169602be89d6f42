"""round_to: the widths it allows each layer group, and the groups it keeps whole."""

from edgeprune.pruning import LayerGroup
from edgeprune.rounding import allowed_widths, kept_whole_by_rounding, rounding_warning


def group(name: str, channels: int) -> LayerGroup:
    return LayerGroup(name, channels, (name,), False)


def test_allowed_widths_are_the_multiples_below_the_width_and_the_width_itself():
    assert allowed_widths(64, 16) == [16, 32, 48, 64]
    assert allowed_widths(24, 16) == [16, 24]
    assert allowed_widths(16, 16) == [16]
    assert allowed_widths(8, 16) == [8]
    assert allowed_widths(4, 1) == [1, 2, 3, 4]


def test_groups_no_multiple_fits_below_are_kept_whole_and_named_in_one_line():
    groups = [group("conv1", 16), group("layer1.0.conv1", 16), group("layer2.0.conv1", 32), group("head", 12)]
    kept = kept_whole_by_rounding(groups, 16)
    assert [item.layer for item in kept] == ["conv1", "layer1.0.conv1", "head"]
    assert kept[0].reason == "16 channels: prune.round_to = 16 allows no narrower width"
    assert kept_whole_by_rounding(groups, 8) == []
    warning = rounding_warning(kept, 16)
    assert "\n" not in warning
    assert "3 layer groups of 12-16 channels are kept whole by prune.round_to = 16 (conv1, layer1.0.conv1, head)" in warning
    assert "prune.drop_block_count" in warning
