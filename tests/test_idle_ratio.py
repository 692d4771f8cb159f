import math

import pytest
import timm

from repa_ssl.layers import linear_idle_ratios, num_active_channels, resolve_idle_ratios


def test_active_channels_are_the_ceiling_of_the_active_share():
    assert num_active_channels(1536, 0.75) == 384  # 1536 * 0.25 exactly, despite float noise
    assert num_active_channels(1536, 0.5) == 768
    assert num_active_channels(10, 0.75) == 3  # ceil(2.5)
    assert num_active_channels(1536, 1.0) == 0
    assert num_active_channels(1536, 0.0) == 1536


def test_linear_schedule_follows_the_authors_formula():
    ratios = linear_idle_ratios(0.75, 12)
    assert len(ratios) == 12 and ratios[-1] == 0.0
    for i, r in enumerate(ratios[:-1]):
        assert r == pytest.approx(0.5 + 0.5 / 11 * (i + 1))
    assert ratios[-2] == pytest.approx(1.0)


def test_linear_schedule_builds_per_layer_blocks():
    model = timm.create_model("test_repa_vit", depth=4, idle_ratio=0.75, idle_schedule="linear")
    hidden = 4 * 64
    expected = [math.ceil(round(hidden * (1 - r), 6)) for r in linear_idle_ratios(0.75, 4)]
    assert [b.mlp.num_active for b in model.blocks] == expected
    assert model.blocks[-1].mlp.num_active == hidden


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_idle_ratio_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        timm.create_model("test_repa_vit", idle_ratio=bad)


def test_per_layer_list_of_wrong_length_is_refused():
    with pytest.raises(ValueError, match="3 per-layer values but the model has 2 blocks"):
        timm.create_model("test_repa_vit", idle_ratio=[0.5, 0.5, 0.5])


def test_bad_value_inside_a_per_layer_list_is_named():
    with pytest.raises(ValueError, match=r"idle_ratio\[1\]=2"):
        resolve_idle_ratios([0.5, 2], depth=2)


def test_linear_schedule_below_one_half_is_refused():
    with pytest.raises(ValueError, match="'linear' idle schedule needs"):
        resolve_idle_ratios(0.25, depth=12, idle_schedule="linear")
