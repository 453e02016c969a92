"""kvfix.patch_coords / kvfix.patch_depth (METHODS §1 helpers, revised units) against hand-computed values."""
import pytest
import torch

import kvfix


# --------------------------------------------------------------------------------------------
# patch_coords: patch units s = (r + 0.5, c + 0.5) (default), or the unit square
# s = ((r + 0.5) / G, (c + 0.5) / G), G = max(gh, gw); row-major

def test_patch_coords_2x3_by_hand():
    # patch units: adjacent patches 1 apart; row centres 0.5, 1.5; column centres 0.5, 1.5, 2.5.
    expected = torch.tensor([[0.5, 0.5], [0.5, 1.5], [0.5, 2.5],
                             [1.5, 0.5], [1.5, 1.5], [1.5, 2.5]], dtype=torch.float64)
    got = kvfix.patch_coords(2, 3, dtype=torch.float64)
    assert got.shape == (6, 2) and got.dtype == torch.float64
    assert torch.equal(got, expected)
    assert torch.equal(kvfix.patch_coords(2, 3, unit="patch", dtype=torch.float64), expected)
    got32 = kvfix.patch_coords(2, 3)
    assert got32.dtype == torch.float32
    assert torch.equal(got32, expected.float())


def test_patch_coords_unit_square_2x3_by_hand():
    # G = 3: row centres 1/6, 1/2; column centres 1/6, 1/2, 5/6; row-major order.
    expected = torch.tensor([[1 / 6, 1 / 6], [1 / 6, 1 / 2], [1 / 6, 5 / 6],
                             [1 / 2, 1 / 6], [1 / 2, 1 / 2], [1 / 2, 5 / 6]], dtype=torch.float64)
    got = kvfix.patch_coords(2, 3, unit="unit_square", dtype=torch.float64)
    assert got.shape == (6, 2) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(kvfix.patch_coords(2, 3, unit="unit_square"), expected.float())


def test_patch_coords_unit_square_tall_grid_shares_one_scale():
    # 3 x 2: G = 3 again, so the columns keep the same spacing as the rows (aspect ratio kept).
    expected = torch.tensor([[1 / 6, 1 / 6], [1 / 6, 1 / 2],
                             [1 / 2, 1 / 6], [1 / 2, 1 / 2],
                             [5 / 6, 1 / 6], [5 / 6, 1 / 2]], dtype=torch.float64)
    torch.testing.assert_close(kvfix.patch_coords(3, 2, unit="unit_square", dtype=torch.float64), expected,
                               rtol=0, atol=1e-15)
    # patch units: the unit-square coordinates times G
    torch.testing.assert_close(kvfix.patch_coords(3, 2, dtype=torch.float64), 3 * expected, rtol=0, atol=1e-15)


def test_patch_coords_single_patch_and_square_grid():
    assert torch.equal(kvfix.patch_coords(1, 1), torch.tensor([[0.5, 0.5]]))
    assert torch.equal(kvfix.patch_coords(1, 1, unit="unit_square"), torch.tensor([[0.5, 0.5]]))
    c = kvfix.patch_coords(24, 24)  # LLaVA-1.5 grid
    assert c.shape == (576, 2)
    assert torch.equal(c[25], torch.tensor([1.5, 1.5]))  # row 1, column 1
    assert float(c.min()) == 0.5 and float(c.max()) == 23.5
    # neighbours 1 apart: row 0, columns 0 and 1; rows 0 and 1
    assert torch.equal(c[1] - c[0], torch.tensor([0.0, 1.0])) and torch.equal(c[24] - c[0], torch.tensor([1.0, 0.0]))
    u = kvfix.patch_coords(24, 24, unit="unit_square")
    torch.testing.assert_close(u[25], torch.tensor([1.5 / 24, 1.5 / 24]))
    assert float(u.min()) == pytest.approx(0.5 / 24) and float(u.max()) == pytest.approx(23.5 / 24)


@pytest.mark.parametrize("gh, gw, name", [(0, 3, "gh"), (2, -1, "gw"), (2.0, 3, "gh"),
                                          (True, 3, "gh"), (2, None, "gw")])
def test_patch_coords_bad_grid(gh, gw, name):
    with pytest.raises(ValueError, match=name):
        kvfix.patch_coords(gh, gw)


@pytest.mark.parametrize("unit", ["pixel", "Patch", None, 1.0])
def test_patch_coords_bad_unit(unit):
    with pytest.raises(ValueError, match="unit"):
        kvfix.patch_coords(2, 2, unit=unit)


# --------------------------------------------------------------------------------------------
# patch_depth: area-average pooling to the grid, then per-image min-max to [0, 1], times scale
# (default 255: the 8-bit depth levels). Most cases check the [0, 1] values with scale=1.0 and
# the default separately: the default is exactly 255 times the scale=1.0 result.

MAP_4x4 = torch.arange(1, 17, dtype=torch.float32).reshape(4, 4)
# 2x2 block means: (1+2+5+6)/4 = 3.5, (3+4+7+8)/4 = 5.5, (9+10+13+14)/4 = 11.5,
# (11+12+15+16)/4 = 13.5; min-max over {3.5, 5.5, 11.5, 13.5} (span 10):
EXPECTED_4x4 = torch.tensor([0.0, 0.2, 0.8, 1.0])


def test_patch_depth_4x4_to_2x2_by_hand():
    got = kvfix.patch_depth(MAP_4x4, 2, 2, scale=1.0)
    assert got.shape == (4,) and got.dtype == torch.float32
    torch.testing.assert_close(got, EXPECTED_4x4, rtol=0, atol=1e-7)
    # default: [0, 255]: 0, 51, 204, 255
    got = kvfix.patch_depth(MAP_4x4, 2, 2)
    assert got.shape == (4,) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([0.0, 51.0, 204.0, 255.0]), rtol=0, atol=255 * 1e-7)
    torch.testing.assert_close(kvfix.patch_depth(MAP_4x4, 2, 2, scale=10), 10 * EXPECTED_4x4, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [0, -1.0, float("inf"), float("nan"), True, "255", None])
def test_patch_depth_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        kvfix.patch_depth(MAP_4x4, 2, 2, scale=scale)


def test_patch_depth_non_square_grid_by_hand():
    # 4 x 6 map pooled to a 2 x 3 grid: 2 x 2 blocks. Rows of the map: r * 6 + c.
    m = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    # block (R, C) mean = ((2R)*6 + 2C) + (0 + 1 + 6 + 7) / 4 = 12 R + 2 C + 3.5
    pooled = torch.tensor([12 * r + 2 * c + 3.5 for r in range(2) for c in range(3)], dtype=torch.float64)
    expected = (pooled - pooled.min()) / (pooled.max() - pooled.min())  # [0, .125, .25, .75, .875, 1]
    torch.testing.assert_close(kvfix.patch_depth(m, 2, 3, scale=1.0), expected.float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(expected, torch.tensor([0, 0.125, 0.25, 0.75, 0.875, 1.0], dtype=torch.float64))
    torch.testing.assert_close(kvfix.patch_depth(m, 2, 3), (255 * expected).float(), rtol=0, atol=255 * 1e-7)


def test_patch_depth_grid_at_map_resolution_is_plain_minmax():
    m = torch.tensor([[2.0, 4.0, 6.0], [8.0, 10.0, 12.0]])
    torch.testing.assert_close(kvfix.patch_depth(m, 2, 3, scale=1.0), torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]))
    torch.testing.assert_close(kvfix.patch_depth(m, 2, 3), torch.tensor([0.0, 51.0, 102.0, 153.0, 204.0, 255.0]))


def test_patch_depth_constant_map_gives_zeros():
    for scale in (255.0, 1.0):
        got = kvfix.patch_depth(torch.full((7, 5), 3.25), 3, 2, scale=scale)
        assert got.shape == (6,) and got.dtype == torch.float32
        assert torch.equal(got, torch.zeros(6))


def test_patch_depth_batch_normalises_each_image():
    maps = torch.stack([MAP_4x4, 2 * MAP_4x4 + 7, torch.full((4, 4), -1.0), -MAP_4x4])
    got = kvfix.patch_depth(maps, 2, 2, scale=1.0)
    assert got.shape == (4, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], EXPECTED_4x4)
    torch.testing.assert_close(got[1], EXPECTED_4x4)  # affine maps normalise alike
    assert torch.equal(got[2], torch.zeros(4))        # constant image: zeros, others unaffected
    torch.testing.assert_close(got[3], 1 - EXPECTED_4x4, rtol=0, atol=1e-7)  # flipped map: 1 - d
    # each item equals the single-image call
    for b in range(4):
        torch.testing.assert_close(got[b], kvfix.patch_depth(maps[b], 2, 2, scale=1.0))
        torch.testing.assert_close(kvfix.patch_depth(maps, 2, 2)[b], kvfix.patch_depth(maps[b], 2, 2))


def test_patch_depth_accepts_integer_and_half_maps_and_leaves_input_alone():
    m_int = torch.arange(1, 17).reshape(4, 4)
    before = m_int.clone()
    torch.testing.assert_close(kvfix.patch_depth(m_int, 2, 2, scale=1.0), EXPECTED_4x4)
    assert torch.equal(m_int, before)
    torch.testing.assert_close(kvfix.patch_depth(MAP_4x4.half(), 2, 2, scale=1.0), EXPECTED_4x4)


def test_patch_depth_range_any_resolution():
    torch.manual_seed(0)
    m = torch.rand(2, 37, 53) * 50 - 10
    for scale in (255.0, 1.0):
        got = kvfix.patch_depth(m, 24, 24, scale=scale)
        assert got.shape == (2, 576)
        assert torch.isfinite(got).all()
        for b in range(2):
            assert float(got[b].min()) == 0.0 and float(got[b].max()) == scale


@pytest.mark.parametrize("bad, exc", [
    ([[1.0, 2.0], [3.0, 4.0]], TypeError),      # not a tensor
    (torch.ones(4), ValueError),                 # 1-D
    (torch.ones(1, 1, 4, 4), ValueError),        # 4-D
    (torch.ones(0, 4), ValueError),              # empty
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError),
    (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), ValueError),
])
def test_patch_depth_bad_map_names_argument(bad, exc):
    with pytest.raises(exc, match="depth_map"):
        kvfix.patch_depth(bad, 2, 2)


@pytest.mark.parametrize("gh, gw, name", [(0, 2, "gh"), (2, 0, "gw"), (2, 1.5, "gw")])
def test_patch_depth_bad_grid_names_argument(gh, gw, name):
    with pytest.raises(ValueError, match=name):
        kvfix.patch_depth(MAP_4x4, gh, gw)


def test_patch_depth_is_an_exact_area_average_when_sizes_do_not_divide():
    # 3x3 -> 2x2: each patch covers 1.5 x 1.5 pixels, so the centre pixel counts a quarter in
    # every patch and the edge pixels half in two. Corner 9, everything else 0: the top-left
    # patch averages (9 * 1) / 2.25 = 4.0 (adaptive pooling's overlapping windows would say 2.25).
    m = torch.zeros(3, 3, dtype=torch.float64)
    m[0, 0] = 9.0
    from kvfix.geometry import _area_weights
    pooled = _area_weights(2, 3, None) @ m @ _area_weights(2, 3, None).T
    torch.testing.assert_close(pooled, torch.tensor([[4.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    # 5 columns -> 2 patches of 2.5 pixels: (0 + 1 + 2 / 2) / 2.5 = 0.8 and (2 / 2 + 3 + 4) / 2.5 = 3.2.
    ramp = torch.arange(5, dtype=torch.float64).repeat(5, 1)  # value = column index
    w = _area_weights(2, 5, None)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(ramp @ w.T, torch.tensor([[0.8, 3.2]] * 5, dtype=torch.float64))
    # End to end: normalised to [0, scale] per image.
    torch.testing.assert_close(kvfix.patch_depth(m, 2, 2, scale=1.0), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(kvfix.patch_depth(m, 2, 2), torch.tensor([255.0, 0.0, 0.0, 0.0]))
