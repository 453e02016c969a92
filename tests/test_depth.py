"""kvfix.depth.DepthEstimator with tiny random-weight depth models built from configs (no download)."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import kvfix
import kvfix.reference

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from kvfix.depth import DepthEstimator, default_processor  # noqa: E402


def tiny_depth_anything(seed=0, **overrides):
    """A tiny Depth-Anything (Dinov2 backbone, patch 14, 56 px). initializer_range 0.2 so that the
    random head gives a non-degenerate map (with 0.02 it is ~1e-7 everywhere)."""
    bb = transformers.Dinov2Config(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=4,
                                   num_attention_heads=2, intermediate_size=64, out_indices=[1, 2, 3, 4],
                                   reshape_hidden_states=False, initializer_range=0.2)
    cfg = transformers.DepthAnythingConfig(backbone_config=bb, reassemble_hidden_size=32,
                                           neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                                           head_hidden_size=8, initializer_range=0.2, **overrides)
    torch.manual_seed(seed)
    m = transformers.DepthAnythingForDepthEstimation(cfg).eval()
    with torch.no_grad():  # lift the head above its final ReLU, or most maps are all zeros
        m.head.conv3.bias.fill_(2.0)
    return m


def tiny_dpt(seed=0):
    cfg = transformers.DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                 image_size=64, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                                 neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                                 use_auxiliary_head=False, initializer_range=0.2)
    torch.manual_seed(seed)
    return transformers.DPTForDepthEstimation(cfg).eval()


def rgb(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model():
    return tiny_depth_anything()


@pytest.fixture(scope="module")
def est(model):
    return DepthEstimator(model, default_processor(model.config))


def assert_close(x, y):
    """Same map up to float32 accumulation order (batched vs single forward passes)."""
    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * float(y.abs().max()) + 1e-7)


def check_maps(maps, sizes):
    assert isinstance(maps, list) and len(maps) == len(sizes)
    for m, hw in zip(maps, sizes):
        assert isinstance(m, torch.Tensor) and m.dtype == torch.float32
        assert tuple(m.shape) == tuple(hw)
        assert torch.isfinite(m).all()


# --------------------------------------------------------------------------------------------

def test_default_processor_matches_depth_anything_settings(model):
    p = default_processor(model.config)
    assert (p.size.height, p.size.width) == (56, 56)  # the backbone's image size
    assert p.keep_aspect_ratio and p.ensure_multiple_of == 14 and not p.do_pad
    np.testing.assert_allclose(p.image_mean, [0.485, 0.456, 0.406])


def test_pil_numpy_tensor_inputs_of_different_sizes(est):
    a, b, c = rgb(37, 91, 0), rgb(64, 48, 1), rgb(20, 20, 2)
    images = [Image.fromarray(a), b, torch.from_numpy(c).permute(2, 0, 1).float() / 255,
              torch.from_numpy(a).permute(2, 0, 1).contiguous(),  # uint8 tensor
              Image.fromarray(b).convert("L")]                     # grey PIL -> RGB
    maps = est(images)
    check_maps(maps, [(37, 91), (64, 48), (20, 20), (37, 91), (64, 48)])
    assert float(maps[0].std()) > 0  # the random model does produce structure
    # the same pixels give the same map whatever the container
    assert_close(maps[3], maps[0])
    assert_close(est(a)[0], maps[0])
    assert_close(est(Image.fromarray(b))[0], maps[1])
    # float [0, 1] input of the same pixels: same map up to resampling rounding
    af = torch.from_numpy(a).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(est(af)[0], maps[0], rtol=1e-3, atol=1e-3 * float(maps[0].abs().max()))


def test_single_image_and_batch_tensor(est):
    one = est(rgb(30, 40))
    check_maps(one, [(30, 40)])
    batch = torch.rand(3, 3, 28, 42)
    maps = est(batch)
    check_maps(maps, [(28, 42)] * 3)
    for i in range(3):
        assert_close(maps[i], est(batch[i])[0])


def test_batching_does_not_change_results(model):
    """Batched and single passes differ only in float32 accumulation order: the batched map must
    be as close to the float64 map as the single pass is (flash-attention's rule: at most 2x the
    error of the same computation run in the same precision, plus a rounding-level slack), a
    tolerance from this model's arithmetic, not from one machine's rounding."""
    import copy
    imgs = [rgb(40, 60, s) for s in range(5)] + [rgb(70, 30, 9)]
    e1 = DepthEstimator(model, default_processor(model.config), batch_size=1)
    e4 = DepthEstimator(model, default_processor(model.config), batch_size=4)
    e64 = DepthEstimator(copy.deepcopy(model), default_processor(model.config), dtype=torch.float64, batch_size=1)
    for x, y, t in zip(e1(imgs), e4(imgs), e64(imgs)):
        err_single = (x.double() - t).abs().max().item()
        err_batched = (y.double() - t).abs().max().item()
        slack = 8 * torch.finfo(torch.float32).eps * t.abs().max().item()
        assert err_batched <= 2 * err_single + slack, (err_batched, err_single, slack)


def test_output_is_upsampled_predicted_depth(est, model):
    a = rgb(33, 50, 3)
    pv = est.processor(images=a, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pred = model(pixel_values=pv).predicted_depth  # [1, h, w]
    want = torch.nn.functional.interpolate(pred[:, None], size=(33, 50), mode="bicubic", align_corners=False)[0, 0]
    torch.testing.assert_close(est(a)[0], want)


def test_patch_depth_on_estimator_output(est):
    maps = est([rgb(37, 91, 4), rgb(48, 64, 5)])
    d = kvfix.patch_depth(maps[0], 3, 7)  # default units: [0, 255]
    assert d.shape == (21,) and d.dtype == torch.float32
    assert float(d.min()) >= 0.0 and float(d.max()) <= 255.0 and torch.isfinite(d).all()
    assert float(d.max()) == 255.0  # non-constant map
    # a batch of same-size maps
    same = est([rgb(48, 64, 6), rgb(48, 64, 5)])
    db = kvfix.patch_depth(torch.stack(same), 24, 24)
    assert db.shape == (2, 576) and float(db.min()) >= 0.0 and float(db.max()) <= 255.0


def test_invert_flips_linearly_and_leaves_dscr_unchanged(model, est):
    a = rgb(37, 91, 7)
    base = est(a)[0]
    flipped = est(a, invert=True)[0]
    torch.testing.assert_close(flipped, base.amax() - base)
    inv_est = DepthEstimator(model, default_processor(model.config), invert=True)
    torch.testing.assert_close(inv_est(a)[0], flipped)
    assert est.larger_is_closer is True  # Depth-Anything relative: disparity
    torch.testing.assert_close(kvfix.patch_depth(flipped, 4, 6), 255 - kvfix.patch_depth(base, 4, 6),
                               rtol=0, atol=255 * 1e-6)
    d, df = kvfix.patch_depth(base, 4, 6, scale=1.0), kvfix.patch_depth(flipped, 4, 6, scale=1.0)
    torch.testing.assert_close(df, 1 - d, rtol=0, atol=1e-6)
    # DSCR uses (d_i - d_j)^2 only: the flip does not change its weights
    coords = kvfix.patch_coords(4, 6)
    w = kvfix.reference.dscr_weights(d, coords)
    wf = kvfix.reference.dscr_weights(df, coords)
    torch.testing.assert_close(w, wf, rtol=0, atol=1e-6)


def test_metric_config_reports_orientation():
    m = tiny_depth_anything(depth_estimation_type="metric", max_depth=20)
    e = DepthEstimator(m, default_processor(m.config))
    assert e.larger_is_closer is False
    check_maps(e(rgb(30, 30)), [(30, 30)])


def test_local_path_round_trip(tmp_path, est, model):
    proc = default_processor(model.config)
    proc.size = {"height": 42, "width": 42}  # distinguishable from the config-built default
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    images = [rgb(37, 91, 8), rgb(25, 25, 9)]
    in_memory = DepthEstimator(model, proc)(images)

    by_str = DepthEstimator(str(tmp_path))
    by_path = DepthEstimator(pathlib.Path(tmp_path), device="cpu", dtype=torch.float32)
    assert by_str.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert by_path.device.type == "cpu"
    for e in (by_str, by_path):
        assert type(e.model).__name__ == "DepthAnythingForDepthEstimation"
        assert (e.processor.size.height, e.processor.size.width) == (42, 42)
        assert e.larger_is_closer is True
        for x, y in zip(e(images), in_memory):
            assert_close(x.cpu(), y)

    # a model object loaded from the directory finds the processor saved beside it
    loaded = transformers.AutoModelForDepthEstimation.from_pretrained(tmp_path)
    e = DepthEstimator(loaded)
    assert (e.processor.size.height, e.processor.size.width) == (42, 42)
    # processor given as a path
    e = DepthEstimator(model, str(tmp_path))
    assert (e.processor.size.height, e.processor.size.width) == (42, 42)


def test_model_object_without_processor_builds_default(model):
    fresh = tiny_depth_anything(seed=1)
    e = DepthEstimator(fresh)
    assert (e.processor.size.height, e.processor.size.width) == (56, 56)
    check_maps(e(rgb(20, 30)), [(20, 30)])


def test_dtype_bfloat16_returns_float32():
    m = tiny_depth_anything(seed=2)
    e = DepthEstimator(m, dtype=torch.bfloat16)
    assert e.dtype == torch.bfloat16
    maps = e([rgb(37, 91), torch.rand(3, 30, 30)])
    check_maps(maps, [(37, 91), (30, 30)])


def test_tiny_dpt_model():
    m = tiny_dpt()
    e = DepthEstimator(m)  # square resize: DPT's neck needs a square patch grid
    assert e.larger_is_closer is True
    check_maps(e([rgb(37, 91), torch.rand(3, 50, 33)]), [(37, 91), (50, 33)])


@pytest.mark.parametrize("images, exc, pattern", [
    ([np.zeros((10, 10, 3), np.uint8), np.zeros((10, 10), np.uint8)], ValueError, r"images\[1\]"),
    (np.zeros((10, 10, 4), np.uint8), ValueError, "images"),
    (torch.rand(10, 10, 3), ValueError, "images"),       # channels-last tensor
    (torch.rand(3, 10, 10) * 2, ValueError, r"\[0, 1\]"),  # float out of range
    (torch.full((3, 4, 4), float("nan")), ValueError, "non-finite"),
    (np.zeros((10, 10, 3), np.int32), TypeError, "images"),
    ([rgb(8, 8), "cat.png"], TypeError, r"images\[1\]"),
    ([], ValueError, "images"),
    (np.zeros((0, 10, 3), np.uint8), ValueError, "empty"),
])
def test_bad_images_name_the_argument(est, images, exc, pattern):
    with pytest.raises(exc, match=pattern):
        est(images)


def test_bad_constructor_arguments(model):
    with pytest.raises(TypeError, match="model"):
        DepthEstimator(42)
    with pytest.raises(ValueError, match="batch_size"):
        DepthEstimator(model, batch_size=0)
    with pytest.raises(ValueError, match="interpolation"):
        DepthEstimator(model, interpolation="lanczos")
    with pytest.raises(TypeError, match="dtype"):
        DepthEstimator(model, dtype="float16")
    with pytest.raises(ValueError, match="processor"):
        default_processor(transformers.GLPNConfig())
    with pytest.raises(TypeError, match="processor"):
        DepthEstimator(model, processor=3)


def test_missing_local_path_raises(tmp_path):
    with pytest.raises(OSError):
        DepthEstimator(str(tmp_path / "no-such-model"), model_kwargs={"local_files_only": True})


def test_kvfix_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import kvfix, kvfix.depth\n"
            "try:\n"
            "    kvfix.depth.DepthEstimator()\n"
            "except ImportError as e:\n"
            "    assert 'transformers' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('no ImportError')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(pathlib.Path(kvfix.__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
