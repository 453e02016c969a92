"""DSCR on a tiny random LLaVA: generate with DSCR off and on, show how the image-span cache changed;
then what the units do to DSCR's weights on a 24 x 24 grid (METHODS §1, docs/DSCR_UNITS.md).

    python examples/demo_dscr.py [--png docs/img/dscr_weights.png]

Runs on the CPU in a few seconds and downloads nothing: the model is built from a config with
random weights (so the tokens are meaningless; the point is the mechanics). --png also draws the
weight maps (needs matplotlib: pip install "kvfix[viz]"). With a real model:

    handle = kvfix.hf.enable(model, kvfix.hf.DSCR())
    depths = kvfix.depth.DepthEstimator()(images)     # or any [H, W] depth map per image
    with handle.images(depth_maps=depths):
        out = model.generate(**processor(images=images, text=prompts, return_tensors="pt"))
"""
import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import kvfix  # noqa: E402
import kvfix.hf  # noqa: E402
from kvfix.hf import testing  # noqa: E402


def floor_and_object(gh: int = 24, gw: int = 24, px: int = 14):
    """A depth map (gh * px x gw * px pixels) of a floor receding to the top (depth 5 at the
    bottom, 20 at the top) with a near square object (depth 2) on the middle third of the
    grid, and the object's tokens as a bool [gh, gw] mask (8 x 8 of 24 x 24: 11%)."""
    H, W = gh * px, gw * px
    m = (20.0 - 15.0 * torch.arange(H, dtype=torch.float64) / (H - 1))[:, None].repeat(1, W)
    region = torch.zeros(gh, gw, dtype=torch.bool)
    region[gh // 3:gh - gh // 3, gw // 3:gw - gw // 3] = True
    m[gh // 3 * px:(gh - gh // 3) * px, gw // 3 * px:(gw - gw // 3) * px] = 2.0
    return m, region


UNITS = {"default units (patch coordinates, depth [0, 255])": {},
         "earlier units (unit square, depth [0, 1])": {"grid_unit": "unit_square", "depth_scale": 1.0}}


def units_report(png: str | None):
    m, region = floor_and_object()
    print("\nDSCR weights on a 24 x 24 grid, near object (8 x 8 patches, 11% of the tokens) on a receding floor:")
    for name, kw in UNITS.items():
        s = kvfix.dscr_weight_stats(24, 24, m, region=region, **kw).summary()
        print(f"  {name}: object tokens draw {100 * s['region_share_mean']:.1f}% of their weight from the object; "
              f"contributors per token (1 / sum w^2) median {s['contributors_median']:.1f} "
              f"[{s['contributors_min']:.1f}, {s['contributors_max']:.1f}]; 8-neighbour share median "
              f"{100 * s['neighbour_share_median']:.1f}%")
    depth = kvfix.patch_depth(m, 24, 24)
    print(f"  plan at the default units: {kvfix.dscr_plan(24, 24, depth).algorithm} "
          f"({kvfix.dscr_plan(24, 24, depth).reason})")
    if png:
        kvfix.dscr_weight_map_png(png, 24, 24, m, [(11, 11), (20, 5)], region=region, settings=list(UNITS.values()),
                                  dpi=80)
        print(f"  weight maps written to {png}")


def image_span_change(cache_on, cache_off, spans):
    rows = []
    for li, (a, b) in enumerate(zip(cache_on.layers, cache_off.layers)):
        dk = dv = nk = nv = 0.0
        for bi, s, gh, gw in spans:
            e = s + gh * gw
            dk += (a.keys[bi, :, s:e] - b.keys[bi, :, s:e]).norm().item() ** 2
            dv += (a.values[bi, :, s:e] - b.values[bi, :, s:e]).norm().item() ** 2
            nk += b.keys[bi, :, s:e].norm().item() ** 2
            nv += b.values[bi, :, s:e].norm().item() ** 2
        rows.append((li, (dk / nk) ** 0.5, (dv / nv) ** 0.5))
    return rows


def main():
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = testing.tiny_llava(num_layers=8, image_size=48, patch_size=8)  # 6x6 patch grid
    inputs, spans = testing.llava_prompt(model, [1])
    depth = floor_and_object(6, 6, 16)[0]
    kw = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_scores=True)
    T = inputs["input_ids"].shape[1]
    print(f"kvfix {kvfix.__version__} | tiny LLaVA: {model.config.text_config.num_hidden_layers} text layers, "
          f"prompt {T} tokens, image span {spans[0][1]}..{spans[0][1] + spans[0][2] * spans[0][3] - 1} "
          f"({spans[0][2]}x{spans[0][3]} patches)")

    off = model.generate(**inputs, **kw)
    with kvfix.hf.enable(model, kvfix.hf.DSCR()) as handle:
        dscr = handle.method("dscr")
        with handle.images(depth_maps=[depth]):
            on = model.generate(**inputs, **kw)
        print(f"DSCR: layers {dscr.selected_layers[0]}..{dscr.selected_layers[-1]}, refined "
              f"{dscr.refine_calls} image(s) in the prefill (the tokens after the image read it refined)")
    print("tokens, DSCR off:", off.sequences[0, T:].tolist())
    print("tokens, DSCR on: ", on.sequences[0, T:].tolist())
    dlogit = [(a - b).abs().max().item() for a, b in zip(on.scores, off.scores)]
    print("max |logit change| per step:", " ".join(f"{x:.3f}" for x in dlogit),
          "(step 0 comes from the prefill, which already reads the refined image)")
    print("image-span cache change ||on - off|| / ||off|| (decoding left the spans as refined):")
    for li, rk, rv in image_span_change(on.past_key_values, off.past_key_values, spans):
        tag = "refined" if li in dscr.selected_layers else "untouched"
        print(f"  layer {li}: K {rk:.4f}  V {rv:.4f}  ({tag})")
    print(f"done in {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--png", help="also write the weight maps of two tokens, default and earlier units, to this PNG")
    args = ap.parse_args()
    main()
    units_report(args.png)
