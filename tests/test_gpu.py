"""Tests that need a CUDA device (``-m gpu``; ``laco gpu-check`` runs them on a lent GPU).

Without a GPU, conftest skips every ``gpu``-marked test with the reason "needs a CUDA device" (checked in
the default suite by tests/test_gpu_check.py). This file imports nothing the lent image lacks (no
``hypothesis``, no ``datasets``).
"""

import copy

import pytest
import torch

from laco.bench.flops import Workload
from laco.bench.runner import BenchConfig, make_inputs
from laco.model.testing import tiny_laco_model

pytestmark = pytest.mark.gpu


@pytest.fixture
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _pair(batch: int = 2):
    """The tiny LaCo MLLM on the CPU and a copy on the GPU, with inputs for each."""
    cpu = tiny_laco_model(seed=0)
    gpu = copy.deepcopy(cpu).cuda()
    inputs = make_inputs(cpu, Workload(batch_size=batch, text_tokens=8), torch.device("cpu"), torch.float32,
                         torch.Generator().manual_seed(0))
    return cpu, gpu, inputs, {k: v.cuda() for k, v in inputs.items()}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_forward_cuda_fp32_and_bf16_match_cpu(no_tf32):
    cpu, gpu, x_cpu, x_gpu = _pair()
    with torch.inference_mode():
        ref = cpu(**x_cpu).logits  # (B, seq, vocab)
        fp32 = gpu(**x_gpu).logits.cpu()
        gpu.to(torch.bfloat16)
        bf16 = gpu(**{**x_gpu, "pixel_values": x_gpu["pixel_values"].bfloat16()}).logits.cpu()
    assert fp32.shape == ref.shape
    torch.testing.assert_close(fp32, ref, rtol=1e-4, atol=1e-4)
    # bf16 keeps 8 mantissa bits: ~0.4% per rounding, a few % over a tiny model's layers; a bug is O(1)
    assert _rel_err(bf16, ref) < 0.05


def test_generate_cuda_matches_cpu(no_tf32):
    cpu, gpu, x_cpu, x_gpu = _pair()
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        ref = cpu.generate(**x_cpu, **kw)
        out = gpu.generate(**x_gpu, **kw).cpu()
    assert out.shape == ref.shape == (2, x_cpu["input_ids"].shape[1] + 8)
    assert torch.equal(out, ref)


def test_train_step_cuda_bf16_autocast_matches_cpu_fp32():
    cpu, gpu, x_cpu, x_gpu = _pair()
    cpu.train(), gpu.train()
    loss_cpu = cpu(**x_cpu, labels=x_cpu["input_ids"]).loss
    loss_cpu.backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_gpu = gpu(**x_gpu, labels=x_gpu["input_ids"]).loss
    loss_gpu.backward()
    assert torch.isfinite(loss_gpu) and loss_gpu.item() == pytest.approx(loss_cpu.item(), rel=2e-2)
    grads = {n: p.grad for n, p in gpu.named_parameters() if p.grad is not None}
    ref = dict(cpu.named_parameters())
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    # the projector's gradient (every image token passes through it) agrees with the fp32 one to bf16 accuracy
    name = next(n for n in grads if n.startswith("model.multi_modal_projector") and n.endswith("weight"))
    assert _rel_err(grads[name].cpu(), ref[name].grad) < 0.1


def test_bench_tiny_cuda_bf16(tmp_path):
    """The CUDA path (events, synchronisation, bf16, max_memory_allocated)."""
    from laco.bench.report import write_report
    from laco.bench.runner import run_benchmark

    cfg = BenchConfig(vision="tiny-siglip", llm="tiny-qwen2", methods="post,laco@1/4", device="cuda",
                      work=Workload(text_tokens=8, new_tokens=2), warmup=1, repeats=2)
    result = run_benchmark(cfg, progress=False, command="test").to_dict()
    assert result["config"]["dtype"] == "bfloat16" and result["environment"]["memory_kind"] == "cuda_max_allocated"
    assert all(r["time"]["median"] > 0 and r["memory"]["peak"] > 0 for r in result["measured"])
    assert next(p for p in result["models"]["laco@1/4"]["params"].values())  # built on the GPU
    assert write_report(result, tmp_path)["json"].exists()
