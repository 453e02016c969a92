"""kvfix.dscr_weight_stats / kvfix.dscr_weight_map_png: hand-computed small grids, the units' effect
on a near object over a receding floor (the numbers in docs/DSCR_UNITS.md), the PNG."""
import math
import sys

import pytest
import torch

import kvfix

CS = 0.8 / (2 * 0.6 ** 2)  # default beta / (2 sigma_s^2) = 10 / 9
E = {n: math.exp(-CS * n) for n in range(9)}  # spatial term at squared distance n (patch units)


def test_two_tokens_take_each_other():
    st = kvfix.dscr_weight_stats(1, 2, torch.zeros(2))
    assert torch.equal(st.contributors, torch.ones(2, dtype=torch.float64))
    assert torch.equal(st.neighbour_share, torch.ones(2, dtype=torch.float64))
    assert st.region_share is None and st.region is None and "region_share_mean" not in st.summary()


def test_row_of_three_by_hand():
    # uniform depth: wt = 1 + exp(-cs d^2); token 0 sees a = 1 + e^-cs (d = 1), b = 1 + e^-4cs (d = 2)
    st = kvfix.dscr_weight_stats(1, 3, torch.zeros(3))
    a, b = 1 + E[1], 1 + E[4]
    edge = (a + b) ** 2 / (a * a + b * b)
    torch.testing.assert_close(st.contributors, torch.tensor([edge, 2.0, edge], dtype=torch.float64),
                               rtol=0, atol=1e-13)
    torch.testing.assert_close(st.neighbour_share, torch.tensor([a / (a + b), 1.0, a / (a + b)], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    # the unit square (G = 3): distances 1/3 and 2/3
    st = kvfix.dscr_weight_stats(1, 3, torch.zeros(3), grid_unit="unit_square")
    a, b = 1 + math.exp(-CS / 9), 1 + math.exp(-4 * CS / 9)
    assert float(st.neighbour_share[0]) == pytest.approx(a / (a + b), abs=1e-15)


def test_corner_of_three_by_three_by_hand():
    # uniform depth: the corner's 8-neighbourhood is (0, 1), (1, 0), (1, 1); squared distances
    # of all others: 4 (x2), 5 (x2), 8.
    st = kvfix.dscr_weight_stats(3, 3, torch.zeros(9))
    near = 2 * (1 + E[1]) + (1 + E[2])
    total = near + 2 * (1 + E[4]) + 2 * (1 + E[5]) + (1 + E[8])
    assert float(st.neighbour_share[0]) == pytest.approx(near / total, abs=1e-15)
    assert float(st.neighbour_share[4]) == pytest.approx(1.0, abs=1e-15)  # the centre: all 8 others
    w = torch.tensor([0, 1 + E[1], 1 + E[4], 1 + E[1], 1 + E[2], 1 + E[5], 1 + E[4], 1 + E[5], 1 + E[8]],
                     dtype=torch.float64) / total
    assert float(st.contributors[0]) == pytest.approx(1 / float((w * w).sum()), abs=1e-12)


def test_region_share_by_hand():
    # 2 x 2, top row at depth 0, bottom row 255 levels away (depth term 0 across):
    # token 0 gets 1 + e1 from token 1, e1 from token 2 (below), e2 from token 3 (diagonal).
    region = torch.tensor([[True, True], [False, False]])
    st = kvfix.dscr_weight_stats(2, 2, torch.tensor([0.0, 0.0, 255.0, 255.0]), region=region)
    share = (1 + E[1]) / (1 + 2 * E[1] + E[2])  # = 1 / (1 + e1)
    torch.testing.assert_close(st.region_share, torch.tensor([share, share, 1 - share, 1 - share],
                                                             dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.equal(st.neighbour_share, torch.ones(4, dtype=torch.float64))  # all are 8-neighbours
    s = st.summary()
    assert s["region_share_mean"] == pytest.approx(1 / (1 + E[1]), abs=1e-15) and s["region_fraction"] == 0.5
    assert s["tokens"] == 4


def test_single_token_has_no_contributors():
    st = kvfix.dscr_weight_stats(1, 1, torch.zeros(1))
    assert torch.equal(st.contributors, torch.zeros(1, dtype=torch.float64))
    assert torch.equal(st.neighbour_share, torch.zeros(1, dtype=torch.float64))


def test_depth_map_goes_through_patch_depth():
    m = torch.arange(48.0).reshape(6, 8) ** 2
    for scale in (255.0, 1.0):
        st = kvfix.dscr_weight_stats(3, 4, m, depth_scale=scale)
        torch.testing.assert_close(st.depth, kvfix.patch_depth(m, 3, 4, scale=scale).double())
    d = torch.linspace(0, 3, 12)
    assert torch.equal(kvfix.dscr_weight_stats(3, 4, d).depth, d.double())  # per token: as given


def floor_and_object(gh=24, gw=24, px=14):
    """A floor receding to the top (depth 5 at the bottom row of pixels, 20 at the top) with a
    near square object (depth 2) on the middle third of the grid: 8 x 8 of 24 x 24 patches."""
    H, W = gh * px, gw * px
    m = (20.0 - 15.0 * torch.arange(H, dtype=torch.float64) / (H - 1))[:, None].repeat(1, W)
    region = torch.zeros(gh, gw, dtype=torch.bool)
    region[gh // 3:gh - gh // 3, gw // 3:gw - gw // 3] = True
    m[gh // 3 * px:(gh - gh // 3) * px, gw // 3 * px:(gw - gw // 3) * px] = 2.0
    return m, region


def test_units_on_a_near_object_over_a_floor():
    """The numbers quoted in kvfix/geometry.py and docs/DSCR_UNITS.md."""
    m, region = floor_and_object()
    new = kvfix.dscr_weight_stats(24, 24, m, region=region).summary()
    old = kvfix.dscr_weight_stats(24, 24, m, region=region, grid_unit="unit_square", depth_scale=1.0).summary()
    assert new["region_fraction"] == pytest.approx(64 / 576)
    assert new["region_share_mean"] == pytest.approx(0.9955, abs=5e-4)
    assert new["contributors_median"] == pytest.approx(24.8, abs=0.1)
    assert new["neighbour_share_median"] == pytest.approx(0.151, abs=1e-3)
    assert old["region_share_mean"] == pytest.approx(0.136, abs=1e-3)
    assert old["contributors_median"] == pytest.approx(561.0, abs=0.5)
    assert old["neighbour_share_median"] == pytest.approx(0.0169, abs=1e-4)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(depth=torch.zeros(5)), ValueError, "gh \\* gw = 6"),
    (dict(depth=torch.zeros(1, 2, 3)), ValueError, "depth must be"),
    (dict(depth=[0.0] * 6), TypeError, "depth must be a tensor"),
    (dict(depth=torch.tensor([0, 1, 2, 3, 4, float("nan")])), ValueError, "non-finite"),
    (dict(grid_unit="pixel"), ValueError, "unit must be one of"),
    (dict(depth_scale=0.0), ValueError, "depth_scale"),
    (dict(region=torch.ones(6)), ValueError, "region must be a bool"),
    (dict(region=torch.ones(5, dtype=torch.bool)), ValueError, "region must be a bool"),
    (dict(sigma_d=0.0), ValueError, "sigma_d"),
])
def test_bad_input(kw, exc, match):
    args = dict(depth=torch.zeros(6))
    args.update(kw)
    with pytest.raises(exc, match=match):
        kvfix.dscr_weight_stats(2, 3, args.pop("depth"), **args)


def test_png(tmp_path):
    pytest.importorskip("matplotlib")
    m, region = floor_and_object(12, 12, 4)
    path = tmp_path / "w.png"
    out = kvfix.dscr_weight_map_png(path, 12, 12, m, [(6, 6), 20], region=region,
                                    settings=[{}, {"grid_unit": "unit_square", "depth_scale": 1.0}])
    assert out == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    kvfix.dscr_weight_map_png(tmp_path / "one.png", 12, 12, m.flatten()[:144], 5)  # per-token depth, one token
    assert (tmp_path / "one.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("tokens, settings, match", [
    (144, ({},), "tokens must be"), ((12, 0), ({},), "tokens must be"), ([], ({},), "tokens is empty"),
    (0, ({"sigma": 1.0},), "settings must be"), (0, (), "settings must be")])
def test_png_bad_input(tmp_path, tokens, settings, match):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match=match):
        kvfix.dscr_weight_map_png(tmp_path / "x.png", 12, 12, torch.zeros(144), tokens, settings=settings)


def test_png_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"kvfix\[viz\]"):
        kvfix.dscr_weight_map_png(tmp_path / "x.png", 2, 2, torch.zeros(4), 0)
