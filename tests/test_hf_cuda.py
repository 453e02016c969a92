"""The transformers integration on a GPU (skipped without one): each method switched on for the
same tiny random-weight model and prompt gives, step by step, close logits and the same greedy
tokens on CUDA as on the CPU (the CPU path is checked against the references by the other
tests/test_hf_*.py modules). Random tiny models have near-ties: where the greedy tokens part,
the CPU's top two logits must be within the tolerance, and the comparison stops there."""
import copy

import pytest
import torch

import kvfix
import kvfix.hf
from kvfix.hf import testing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in kvfix.build_info()["devices"],
                                reason="needs a GPU and the CUDA build")

METHODS = {
    "DSCR": lambda: kvfix.hf.DSCR(),
    "KVSmooth": lambda: kvfix.hf.KVSmooth(),
    "SCR": lambda: kvfix.hf.SCR(),
    "CMAC": lambda: kvfix.hf.CMAC(),
    "DSCR+KVSmooth": lambda: [kvfix.hf.DSCR(), kvfix.hf.KVSmooth()],
}


def _prompt(family, model):
    """(inputs, one depth map per image)."""
    if family == "llava":
        inputs, spans = testing.llava_prompt(model, [1, 1])  # CMAC: one image per item
    else:
        inputs, spans = testing.qwen_prompt(model, [[(4, 6)], [(6, 4)]])
    g = torch.Generator().manual_seed(0)
    return inputs, [torch.rand(9 + i, 13 - i, generator=g) for i in range(len(spans))]


def _generate(model, inputs, depths, method, device):
    inputs = {k: v.to(device) for k, v in inputs.items()}
    methods = method()
    methods = methods if isinstance(methods, list) else [methods]
    with kvfix.hf.enable(model, *methods) as h, h.images(depth_maps=[d.to(device) for d in depths]):
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    return out.sequences.cpu(), torch.stack([s.float().cpu() for s in out.logits])


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_cuda_generate_matches_cpu(family, method, llava, qwen):
    cpu_model = llava if family == "llava" else qwen
    inputs, depths = _prompt(family, cpu_model)
    seq_cpu, logits_cpu = _generate(cpu_model, inputs, depths, METHODS[method], "cpu")
    gpu_model = copy.deepcopy(cpu_model).to("cuda")
    seq_gpu, logits_gpu = _generate(gpu_model, inputs, depths, METHODS[method], "cuda")
    prompt = inputs["input_ids"].shape[1]
    new_cpu, new_gpu = seq_cpu[:, prompt:], seq_gpu[:, prompt:]
    steps = min(new_cpu.shape[1], new_gpu.shape[1])
    parted = (new_gpu[:, :steps] != new_cpu[:, :steps]).any(0).nonzero()
    last = steps if parted.numel() == 0 else int(parted[0]) + 1  # steps compared, the parting one too
    atol = 1e-3
    torch.testing.assert_close(logits_gpu[:last], logits_cpu[:last], rtol=0, atol=atol)
    if parted.numel():
        top2 = logits_cpu[last - 1].topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min().item() <= 2 * atol, "greedy tokens part without a near-tie"
    else:
        assert new_cpu.shape == new_gpu.shape


def test_cuda_depth_maps_read_back_once_per_prompt(llava):
    """Depth maps on the GPU (a depth estimator's output) are pooled there and read back
    together: DSCR's depth handling synchronises once for the prompt's two images (torch's sync
    debug mode warns at each synchronising call)."""
    import warnings
    inputs, depths = _prompt("llava", llava)
    model = copy.deepcopy(llava).to("cuda")
    dscr = kvfix.hf.DSCR()
    orig, syncs = dscr._token_depths, []

    def counted(images, maps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = orig(images, maps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
        return out

    dscr._token_depths = counted
    with kvfix.hf.enable(model, dscr) as h, h.images(depth_maps=[d.cuda() for d in depths]):
        model.generate(**{k: v.cuda() for k, v in inputs.items()}, max_new_tokens=1, do_sample=False)
    assert len(depths) == 2 and syncs == [1]
