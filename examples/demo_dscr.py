"""DSCR on a tiny random LLaVA: generate with DSCR off and on, show how the image-span cache changed.

    python examples/demo_dscr.py

Runs on the CPU in a few seconds and downloads nothing: the model is built from a config with
random weights (so the tokens are meaningless; the point is the mechanics). With a real model:

    handle = kvfix.hf.enable(model, kvfix.hf.DSCR())
    depths = kvfix.depth.DepthEstimator()(images)     # or any [H, W] depth map per image
    with handle.images(depth_maps=depths):
        out = model.generate(**processor(images=images, text=prompts, return_tensors="pt"))
"""
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import kvfix  # noqa: E402
import kvfix.hf  # noqa: E402
from kvfix.hf import testing  # noqa: E402


def synthetic_depth(h: int = 96, w: int = 96) -> torch.Tensor:
    """A floor receding to the top of the image with a near object in the lower left."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    floor = 1.0 + 9.0 * (1.0 - yy)
    blob = torch.exp(-((yy - 0.7) ** 2 + (xx - 0.3) ** 2) / 0.02)
    return floor * (1.0 - 0.8 * blob)


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
    depth = synthetic_depth()
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
    main()
