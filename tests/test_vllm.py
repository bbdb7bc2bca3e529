"""LaCo on vLLM (``laco.serve``): offline greedy generation equals transformers token for token, and
``vllm serve`` answers the OpenAI chat API, with clear 4xx errors for bad requests.

Needs vLLM next to laco (the vLLM venv of ``.ci/run``; see docs/serving.md), so it is marked ``vllm`` and
left out of the default run: ``python -m pytest -q -m vllm tests/test_vllm.py``. Engine starts are the cost
(tens of seconds each): every model gets one engine, all in one subprocess (``vllm_generate.py``), and one
``vllm serve`` is shared by the server tests.

Tiny models built in code (float32): SigLIP / CLIP towers with the merge at 1/4, "post" or twice; text
head size 64 (vLLM's CPU attention kernels reject 16). The PMLs and projector get random (non-zero)
weights so that a weight that failed to load, or an image routed to the wrong prompt, changes the tokens.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from laco.model.testing import tiny_laco_model, tiny_laco_processor  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

MAX_TOKENS = 8
#: text config with head size 64 (hidden 128, 2 heads, 1 KV head)
TEXT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=2, image_size=64, patch_size=8)
MODELS = {  # name -> LaCoConfig overrides; tokens per image in the comment
    "siglip-1_4": dict(compression={"method": "laco", "layer": "1/4", "ratio": 2}),  # 8x8 -> 4x4: 16
    "siglip-post": dict(compression={"method": "laco", "layer": "post", "ratio": 2}),  # 16
    "siglip-two-merges": dict(compression={"method": "laco", "layer": ["1/4", "3/4"], "ratio": 2}),  # 2x2: 4
    "clip-cls": dict(vision_config=CLIP, vision_feature_select_strategy="full"),  # 4x4 + CLS: 17
}
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENGINE = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True}


def build_model(overrides: dict):
    model = tiny_laco_model(seed=0, text=TEXT, **overrides)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero PML projections, a projector whose output the LLM notices
        for name, p in model.named_parameters():
            if name.startswith(("vision_tower.compressors", "projector")) and p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def chat(proc, question: str, n_images: int) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def hf_greedy(model, proc, prompt: str, images: list) -> tuple[list[int], list[int]]:
    """(prompt ids, MAX_TOKENS greedy ids) from transformers, one request at a time, EOS not stopping."""
    inputs = proc(text=[prompt], images=images or None)
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos
    out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
    n = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), out[0, n:].tolist()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vllm")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64 + 16 * i, 64, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    for name, overrides in MODELS.items():
        model = build_model(overrides)
        model.save_pretrained(root / name)
        tiny_laco_processor(model.config).save_pretrained(root / name)
    write_llava_layout(root / "siglip-1_4", root / "llava-layout")
    convert_tiny_llava(root / "llava-src", root / "converted")
    # AnyRes is not served yet: must fail at load, naming it
    model = build_model({"image_grid_pinpoints": [[64, 64], [64, 128]], "use_image_newline": True})
    model.save_pretrained(root / "anyres")
    tiny_laco_processor(model.config).save_pretrained(root / "anyres")
    return root


def write_llava_layout(src: Path, dst: Path) -> None:
    """A copy of ``src`` whose weights use the LLaVA layout (base model + lm_head) instead of laco's first one."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    renames = {"vision_tower.": "model.vision_tower.", "projector.": "model.multi_modal_projector.",
               "language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head."}
    state = load_file(src / "model.safetensors")
    out = {}
    for key, value in state.items():
        old = next(p for p in renames if key.startswith(p))
        out[renames[old] + key[len(old):]] = value
    assert any(k.startswith("model.language_model.layers.") for k in out)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})


def convert_tiny_llava(src: Path, out: Path) -> None:
    """A tiny HF LLaVA-1.5-style checkpoint (CLIP read at -2, CLS dropped) turned into LaCo by `laco convert`."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config
    from typer.testing import CliRunner

    from laco.cli import app
    from laco.model.testing import TINY_IMAGE_TOKEN_ID, tiny_text_config, tiny_tokenizer

    vision = {k: v for k, v in CLIP.items() if k != "model_type"}
    text = {k: v for k, v in tiny_text_config(**TEXT).items() if k != "model_type"}
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=Qwen2Config(**text),
                         image_token_index=TINY_IMAGE_TOKEN_ID, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", multimodal_projector_bias=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        LlavaForConditionalGeneration(config).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    result = CliRunner().invoke(app, ["convert", str(src), str(out), "--layer", "1", "--ratio", "2"])
    assert result.exit_code == 0, result.output


def requests_for(root: Path, proc) -> list[dict]:
    """One batch: two images with the same question, two images in one prompt, text only, the chat form."""
    q = "what is in the picture?"
    return [
        {"prompt": chat(proc, q, 1), "images": [str(root / "img0.png")]},
        {"prompt": chat(proc, q, 1), "images": [str(root / "img1.png")]},
        {"prompt": chat(proc, "compare them", 2), "images": [str(root / "img2.png"), str(root / "img0.png")]},
        {"prompt": chat(proc, q, 0), "images": []},
    ]


@pytest.fixture(scope="module")
def offline(workdir):
    """{model name: (requests, vLLM results)}, all models through vllm.LLM in one subprocess."""
    runs = []
    for name in MODELS:
        proc = tiny_laco_processor(build_model(MODELS[name]).config)
        runs.append({"model": str(workdir / name), "max_tokens": MAX_TOKENS, "requests": requests_for(workdir, proc)})
    runs.append({**runs[0], "model": str(workdir / "llava-layout")})
    runs.append({"model": str(workdir / "anyres"), "expect_error": True})
    converted = AutoProcessor.from_pretrained(workdir / "converted")
    runs.append({"model": str(workdir / "converted"), "max_tokens": MAX_TOKENS,
                 "requests": requests_for(workdir, converted)})
    job, out = workdir / "job.json", workdir / "out.json"
    job.write_text(json.dumps({"runs": runs, "engine": ENGINE}))
    env = {**ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # engine core in-process: one start-up less per model
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_generate.py")), str(job), str(out)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    results = json.loads(out.read_text())
    named = {name: (run["requests"], got) for name, run, got in zip(MODELS, runs, results)}
    named["llava-layout"] = (runs[-3]["requests"], results[-3])
    named["anyres"] = (None, results[-2])
    named["converted"] = (runs[-1]["requests"], results[-1])
    return named


@pytest.mark.parametrize("name", list(MODELS))
def test_offline_greedy_equals_transformers(workdir, offline, name):
    model = build_model(MODELS[name])
    proc = tiny_laco_processor(model.config)
    requests, got = offline[name]
    image_id = model.config.image_token_id
    answers = []
    for req, res in zip(requests, got):
        images = [Image.open(p).convert("RGB") for p in req["images"]]
        prompt_ids, ids = hf_greedy(model, proc, req["prompt"], images)
        # placeholder count per image comes from the compression config
        assert res["prompt_token_ids"].count(image_id) == len(images) * model.num_image_tokens
        assert res["prompt_token_ids"] == prompt_ids
        assert res["token_ids"] == ids, f"{name}: {req}"
        answers.append(ids)
    assert answers[0] != answers[1], "the two images gave the same tokens: the test would miss an image mix-up"


def test_converted_llava_serves_like_transformers(workdir, offline):
    """A `laco convert` output folder (HF LLaVA -> LaCo, merge after layer 1) loads in vLLM as saved and
    generates the tokens transformers generates from the same folder."""
    model = AutoModelForImageTextToText.from_pretrained(workdir / "converted").eval()
    proc = AutoProcessor.from_pretrained(workdir / "converted")
    requests, got = offline["converted"]
    answers = []
    for req, res in zip(requests, got):
        images = [Image.open(p).convert("RGB") for p in req["images"]]
        prompt_ids, ids = hf_greedy(model, proc, req["prompt"], images)
        assert res["prompt_token_ids"].count(model.config.image_token_id) == len(images) * model.num_image_tokens
        assert res["prompt_token_ids"] == prompt_ids
        assert res["token_ids"] == ids, req
        answers.append(ids)
    assert model.num_image_tokens == 16  # CLIP 8x8 patches pooled 2x2 after layer 1, CLS dropped ("default")
    assert answers[0] != answers[1], "the two images gave the same tokens: the test would miss an image mix-up"


def test_llava_weight_layout_loads_the_same(offline):
    assert offline["llava-layout"][1] == offline["siglip-1_4"][1]


def test_unsupported_configs_fail_at_load(offline):
    error = offline["anyres"][1]["error"]
    assert error is not None and "AnyRes" in error and "not supported yet" in error, error


def test_check_config_names_what_is_unsupported():
    from types import SimpleNamespace

    from laco.serve.vllm_model import UnsupportedLaCoConfig, check_config

    config = build_model({}).config
    check_config(config)  # served as is
    parallel = SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=2, pipeline_parallel_size=1))
    with pytest.raises(UnsupportedLaCoConfig, match="tensor_parallel_size=2"):
        check_config(config, parallel)
    config.image_token = "<img>"
    with pytest.raises(UnsupportedLaCoConfig, match="'<img>'"):
        check_config(config)


# -- vllm serve + the openai client ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(workdir):
    """`vllm serve` of the 1/4 model on a free local port; stopped (and its log kept) at the end."""
    port, log = free_port(), open(workdir / "server.log", "w")
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", str(workdir / "siglip-1_4"),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
           "--enforce-eager", "--limit-mm-per-prompt", '{"image": 2}', "--served-model-name", "laco-tiny"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{(workdir / 'server.log').read_text()[-6000:]}")
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("vllm serve did not answer within 600 s")
            time.sleep(2)
    yield client
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
    log.close()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def png_bytes(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return buf.getvalue()


def ask(client, images: list[bytes], question: str = "what is in the picture?", model: str = "laco-tiny"):
    content = [{"type": "image_url", "image_url": {"url": data_url(b)}} for b in images]
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": [*content, {"type": "text", "text": question}]}],
        temperature=0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})


def test_server_chat_equals_offline_greedy(workdir, offline, server):
    proc = tiny_laco_processor(build_model(MODELS["siglip-1_4"]).config)
    requests, got = offline["siglip-1_4"]
    assert requests[0]["images"] == [str(workdir / "img0.png")]
    expected = proc.tokenizer.decode(got[0]["token_ids"], skip_special_tokens=True)
    reply = ask(server, [png_bytes(workdir / "img0.png")])  # openai raises on any non-2xx status
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens == MAX_TOKENS
    assert reply.usage.prompt_tokens == len(got[0]["prompt_token_ids"])


def test_server_bad_requests_are_clear_4xx_and_it_keeps_serving(workdir, server):
    import openai

    good = png_bytes(workdir / "img0.png")
    first = ask(server, [good]).choices[0].message.content
    cases = [
        ("too many images", dict(images=[good] * 3), openai.BadRequestError, "At most 2 image"),
        ("corrupt image", dict(images=[b"\x89PNG\r\n\x1a\n this is not an image"]), openai.BadRequestError, "image"),
        ("unknown model", dict(images=[good], model="no-such-model"), openai.NotFoundError, "no-such-model"),
    ]
    for what, kwargs, error, text in cases:
        with pytest.raises(error) as info:
            ask(server, **kwargs)
        assert 400 <= info.value.status_code < 500, what
        assert text in str(info.value), f"{what}: {info.value}"
        assert ask(server, [good]).choices[0].message.content == first, f"server broken after {what}"


# -- the serving benchmark (slow: one engine start per method) ----------------------------------------
@pytest.mark.slow
def test_serve_bench_runs_every_cell(tmp_path):
    code = f"""
import json
from laco.serve.bench import ServeBenchConfig, run_serve_bench, write_serve_report
if __name__ == "__main__":
    cfg = ServeBenchConfig(vision="tiny-siglip", methods="none,post,laco@1/4", output_lens=(1, 4), concurrency=(1, 2),
                           requests=3, dtype="float32", max_model_len=512, enforce_eager=True,
                           llm_overrides=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1))
    write_serve_report(run_serve_bench(cfg, progress=False), {str(tmp_path)!r}, plot_png=False)
"""
    script = tmp_path / "bench.py"
    script.write_text(code)
    res = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-6000:]
    result = json.loads((tmp_path / "tiny-siglip_qwen2-0.5b.json").read_text())
    tokens = {m: v["image_tokens"] for m, v in result["methods"].items()}
    assert tokens == {"none": 64, "laco@post": 16, "laco@1/4": 16}  # 8x8 patches, r = 2
    for m in result["methods"].values():
        cells = {(c["output_len"], c["concurrency"]) for c in m["cells"]}
        assert cells == {(1, 1), (1, 2), (4, 1), (4, 2)}
        assert all(c["output_tokens_per_s"] == pytest.approx(c["requests_per_s"] * c["output_len"]) for c in m["cells"])
