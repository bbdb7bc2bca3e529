"""Ecosystem fit: what must hold on every supported transformers (CI runs this file, marker ``compat``, in
the newest and the oldest supported version's venv): light imports, build, forward with labels, generate,
save -> Auto load -> identical tokens.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.compat

ROOT = Path(__file__).resolve().parents[1]
#: optional or heavy parts that the light imports must not pull in
OPTIONAL = ("datasets", "peft", "matplotlib", "lmms_eval", "tensorboard")


def _loaded_after(code: str, watch: tuple[str, ...]) -> list[str]:
    """Run ``code`` in a fresh interpreter; which of ``watch`` ended up in ``sys.modules``."""
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {watch!r} if sys.modules.get(m) is not None))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_import_laco_imports_nothing_heavy():
    assert _loaded_after("import laco", ("torch", "transformers", *OPTIONAL)) == []


def test_cli_help_imports_no_torch():
    code = ("from typer.testing import CliRunner\nfrom laco.cli import app\n"
            "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0 and 'compare' in r.output, r.output")
    assert _loaded_after(code, ("torch", "transformers", *OPTIONAL)) == []


@pytest.mark.parametrize("module", ["laco.ops", "laco.compressors", "laco.encoders"])
def test_core_packages_import_without_the_optional_stack(module):
    """They import where datasets/peft/matplotlib/lmms_eval/tensorboard are not installed (``sys.modules[m] =
    None``: ``import m`` fails and ``find_spec(m)`` is None, as for a missing package)."""
    code = f"import sys\nfor m in {OPTIONAL!r}: sys.modules[m] = None\nimport {module}"
    assert _loaded_after(code, OPTIONAL) == []


def test_lazy_names_resolve():
    import laco

    assert laco.list_compressors() and callable(laco.compress_encoder)
    assert laco.LaCoConfig.model_type == "laco"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        laco.nope  # noqa: B018


def test_version_matches_pyproject_and_cli():
    from typer.testing import CliRunner

    import laco
    from laco.cli import app

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert laco.__version__ == version
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"laco {version}"


# -- the model on this transformers version -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from laco.model.testing import tiny_laco_model, tiny_laco_processor

    model = tiny_laco_model(seed=0)
    return model, tiny_laco_processor(model.config)


def _image(h: int = 50, w: int = 70, seed: int = 0):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


def _inputs(processor, question: str = "What is in the image?"):
    text = processor.apply_chat_template([{"role": "user", "content": f"<image>\n{question}"}],
                                         add_generation_prompt=True)
    return processor(text=[text], images=[_image()])


def test_build_and_forward_with_labels(tiny):
    model, processor = tiny
    inputs = _inputs(processor)
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())
    model.zero_grad(set_to_none=True)


def test_generate_with_cache_equals_without(tiny):
    model, processor = tiny
    inputs = _inputs(processor)
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, inputs["input_ids"].shape[1] + 6)
    assert torch.equal(cached, uncached)


def test_save_auto_load_generates_identical_tokens(tiny, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    proc = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and type(proc) is type(processor)
    inputs = _inputs(processor)
    assert torch.equal(_inputs(proc)["input_ids"], inputs["input_ids"])
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(loaded.generate(**inputs, max_new_tokens=6, do_sample=False), expected)


def test_chat_template_tokenize_equals_manual_path(tiny):
    """HF convention: apply_chat_template(tokenize=True, return_dict=True) with PIL image items gives the
    manual path's inputs (pixel values included) and the same generated tokens."""
    model, processor = tiny
    image = _image(40, 90, seed=3)
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is in the image?"}]}]
    auto = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.count("<image>") == 1
    manual = processor(text=[text], images=[image])
    assert set(auto.keys()) == set(manual.keys()) == {"input_ids", "attention_mask", "pixel_values"}
    assert all(torch.equal(auto[k], manual[k]) for k in manual)
    assert int((auto["input_ids"] == model.config.image_token_id).sum()) == model.num_image_tokens
    expected = model.generate(**manual, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**auto, max_new_tokens=6, do_sample=False), expected)


def test_num_multimodal_tokens_hook(tiny):
    """``_get_num_multimodal_tokens`` (vLLM / transformers size placeholders with it) agrees with __call__."""
    from laco.model.processing import LaCoProcessor

    model, processor = tiny
    sizes = [(40, 90), (30, 30), (200, 60)]
    assert processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens == [model.num_image_tokens] * 3
    import copy

    config = copy.deepcopy(model.config)  # LLaVA-OneVision's AnyRes layout: base + tiles, unpadded, newlines
    s = config.image_size
    config.image_grid_pinpoints, config.use_image_newline = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]], True
    anyres = LaCoProcessor.from_model_config(config, processor.tokenizer)
    hook = anyres._get_num_multimodal_tokens(image_sizes=sizes)
    for (h, w), n, tiles in zip(sizes, hook.num_image_tokens, hook.num_image_patches):
        batch = anyres(text="<image>", images=[_image(h, w)])
        assert int((batch["input_ids"] == model.config.image_token_id).sum()) == n
        assert batch["pixel_values"].shape[0] == tiles


def test_convert_keeps_the_source_image_processor(tmp_path):
    """A converted tiny LLaVA (CLIP tower, CLIP resize-shortest-edge + centre-crop processor) keeps its source's
    preprocessing: pixel values equal the source processor's for a non-square image (not a squash resize)."""
    from transformers import AutoProcessor, CLIPImageProcessorPil

    from laco.model.convert import convert_checkpoint
    from test_convert import save_source  # tests/ is on sys.path (pytest's default import mode)

    save_source(tmp_path / "src", "llava")
    source_ip = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                      do_center_crop=True)
    source_ip.save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "out", layer=1, ratio=2)
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    image = _image(48, 100, seed=4)  # wide: the crop keeps the centre, a squash would not
    got = processor(text="<image>", images=[image])["pixel_values"]
    expected = source_ip(images=[image], return_tensors="pt")["pixel_values"]
    assert got.shape == expected.shape == (1, 3, 64, 64)
    assert torch.equal(got, expected)
    assert type(processor.image_processor) is type(source_ip) and processor.image_processor.do_center_crop


def test_save_pretrained_writes_a_model_card(tmp_path):
    """README.md names the parts, compression and measured figures of *this* model, and how to load it."""
    import laco
    from laco.model.testing import tiny_laco_model

    model = tiny_laco_model(compression={"method": "pixel_shuffle", "layer": 2, "ratio": 2})
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "| compression method | `pixel_shuffle` |" in card
    assert "| merge after layer(s) | 2 -> [2] of 4 |" in card
    assert f"| tokens per image | {model.num_image_tokens} |" in card
    assert f"| encoder FLOPs vs uncompressed | {laco.encoder_cost(model.vision_tower).flop_ratio:.3f} |" in card
    assert "siglip_vision_model" in card and "qwen2" in card and "AutoModelForImageTextToText" in card


def test_module_tree_is_llava_s_and_the_disk_keys_stay_laco_0_1_s(tmp_path):
    """In memory, LLaVA's tree: a base ``LaCoModel`` holding tower, projector, decoder and image_newline, with
    ``lm_head`` beside it. On disk, laco 0.1's keys (renamed on load, back on save), every tensor restored; a folder
    with the tree's own names loads as well."""
    from transformers import AutoModelForImageTextToText

    from laco.model import LaCoModel
    from laco.model.testing import tiny_onevision

    model, _ = tiny_onevision()

    def top(key: str, base: str) -> str:  # "model.vision_tower.x.y" -> "model.vision_tower"
        return ".".join(key.split(".")[:2]) if key.startswith(base + ".") else key.split(".")[0]

    sd = model.state_dict()
    assert {top(k, "model") for k in sd} == {"model.vision_tower", "model.multi_modal_projector",
                                             "model.language_model", "model.image_newline", "lm_head"}
    assert isinstance(model.model, LaCoModel) and model.get_decoder() is model.model.language_model
    assert model.vision_tower is model.model.vision_tower and model.image_newline is model.model.image_newline
    projector = torch.nn.Sequential(*model.projector)
    model.projector = projector  # laco's names write through to the base model
    assert model.model.multi_modal_projector is projector and "projector" not in dict(model.named_children())
    model.save_pretrained(tmp_path)
    disk = load_file(tmp_path / "model.safetensors")
    assert {top(k, "language_model") for k in disk} == {"vision_tower", "projector", "language_model.model",
                                                        "language_model.lm_head", "image_newline"}
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # no missing / unexpected / mismatched key
    assert loaded.state_dict().keys() == sd.keys()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    # a folder whose keys are the tree's own names (LLaVA's layout) loads too: the renamings match laco 0.1's only
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text((tmp_path / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "llava" / "model.safetensors",
              metadata={"format": "pt"})
    as_llava, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "llava", output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert all(torch.equal(v, sd[k]) for k, v in as_llava.state_dict().items())


def test_auto_model_gives_the_base_model(tmp_path):
    """``AutoModel`` gives the base ``LaCoModel`` (as for LLaVA): every base weight in place, ``lm_head`` left over."""
    from transformers import AutoModel

    from laco.model import LaCoModel
    from laco.model.testing import tiny_laco_model

    model = tiny_laco_model()
    model.save_pretrained(tmp_path)
    base, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(base, LaCoModel)
    assert {k: v for k, v in info.items() if v} == {"unexpected_keys": {"lm_head.weight"}}
    sd = model.model.state_dict()
    assert base.state_dict().keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in base.state_dict().items())
    # the top model is lm_head on the base model's hidden states
    ids = torch.tensor([[1, *[model.config.image_token_id] * model.num_image_tokens, 10, 11]])
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = base.eval()(input_ids=ids, pixel_values=pixels).last_hidden_state  # (1, L, D)
        torch.testing.assert_close(model.lm_head(hidden), model(input_ids=ids, pixel_values=pixels).logits)
