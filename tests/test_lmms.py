"""lmms-eval adapter (``laco.eval.lmms``).

* The adapter's own logic (request parsing, prompts, batched ``generate_until``, ``loglikelihood``, the
  entry-point manifest) always runs: against the real lmms-eval classes where lmms-eval is installed,
  else against minimal stand-ins of ``lmms``, ``Instance``, ``GenerationResult`` and ``ModelManifest``.
* ``test_lmms_eval_end_to_end`` (group ``lmms``) runs lmms-eval's own evaluator with ``--model laco`` on
  two local tasks written by the test (no download); it is skipped where lmms-eval is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

HAVE_LMMS = importlib.util.find_spec("lmms_eval") is not None
#: .ci/run's lmms-eval venv sets LACO_REQUIRE_LMMS=1: there the end-to-end test must run, never skip
REQUIRE_LMMS = os.environ.get("LACO_REQUIRE_LMMS") == "1"
NO_LMMS_REASON = ("lmms-eval is not installed; install it with `pip install lmms-eval==0.7.3 --no-deps` "
                  "and `pip install -e '.[lmms]'` (a plain install pulls a CUDA torch)")


def _stub_lmms_eval() -> dict[str, types.ModuleType]:
    """Stand-ins for the four lmms-eval names the adapter uses, with lmms-eval 0.7.3's signatures."""

    class lmms:  # noqa: N801 - lmms-eval's name
        is_simple = True

        def __init__(self):
            self._rank, self._world_size, self.task_dict = 0, 1, {}
            self.cache_hook = types.SimpleNamespace(add_partial=lambda *a: None)

        @property
        def rank(self):
            return self._rank

        @property
        def world_size(self):
            return self._world_size

    @dataclasses.dataclass
    class Instance:
        request_type: str
        arguments: tuple
        idx: int
        metadata: dict = dataclasses.field(default_factory=dict)

        @property
        def args(self):
            return self.arguments

    @dataclasses.dataclass
    class GenerationResult:
        text: object
        token_counts: object = None

    @dataclasses.dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None
        chat_class_path: str | None = None
        aliases: tuple = ()

    mods = {name: types.ModuleType(name) for name in (
        "lmms_eval", "lmms_eval.api", "lmms_eval.api.model", "lmms_eval.api.instance", "lmms_eval.models",
        "lmms_eval.models.registry_v2")}
    mods["lmms_eval.api.model"].lmms = lmms
    mods["lmms_eval.api.instance"].Instance = Instance
    mods["lmms_eval.api.instance"].GenerationResult = GenerationResult
    mods["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    return mods


@pytest.fixture(scope="module")
def adapter_module():
    """``laco.eval.lmms``, imported against real lmms-eval or the stand-ins (removed again afterwards)."""
    with pytest.MonkeyPatch.context() as mp:
        if not HAVE_LMMS:
            for name, mod in _stub_lmms_eval().items():
                mp.setitem(sys.modules, name, mod)
        sys.modules.pop("laco.eval.lmms", None)
        yield importlib.import_module("laco.eval.lmms")
        if not HAVE_LMMS:
            sys.modules.pop("laco.eval.lmms", None)


@pytest.fixture(scope="module")
def tiny():
    from laco.model.processing import LaCoProcessor
    from laco.model.testing import tiny_laco_model, tiny_tokenizer

    model = tiny_laco_model(seed=1)
    return model, LaCoProcessor.from_model_config(model.config, tiny_tokenizer())


def _image(seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (36, 44, 3), dtype=np.uint8))


DOCS = [
    {"question": "What colour?", "answer": "red", "image": _image(0)},
    {"question": "Which shape?", "answer": "circle", "image": _image(1)},
    {"question": "How many?", "answer": "3", "image": None},
]


def _doc_to_visual(doc):
    return [doc["image"]] if doc["image"] is not None else []


def _instance(mod, request_type: str, args: tuple, doc_id: int):
    instance_cls = sys.modules["lmms_eval.api.instance"].Instance
    return instance_cls(request_type=request_type, arguments=args, idx=0,
                        metadata={"task": "toy", "doc_id": doc_id, "repeats": 1})


def _adapter(mod, tiny, **kw):
    model, processor = tiny
    lm = mod.LaCoLMMS(model=model, processor=processor, **kw)
    lm.task_dict = {"toy": {"test": DOCS}}
    return lm


# ------------------------------------------------------------------------------------ registration


def test_manifest_points_at_the_adapter(adapter_module):
    manifest = adapter_module.lmms_manifest()
    assert manifest.model_id == "laco"
    module_name, cls_name = manifest.simple_class_path.rsplit(".", 1)
    assert getattr(importlib.import_module(module_name), cls_name) is adapter_module.LaCoLMMS
    assert manifest.chat_class_path is None and adapter_module.LaCoLMMS.is_simple


def test_pyproject_entry_point_is_the_manifest_factory():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    # lmms-eval calls a callable entry point with no arguments and expects a ModelManifest back:
    # pointing it at the class itself would try to build a model with no weights
    assert pyproject["project"]["entry-points"]["lmms_eval.models"] == {"laco": "laco.eval.lmms:lmms_manifest"}
    assert not any(dep.split("[")[0].startswith(("torch", "lmms-eval", "lmms_eval", "timm"))
                   for dep in pyproject["project"]["optional-dependencies"]["lmms"])


# ------------------------------------------------------------------------------ adapter behaviour


def test_init_errors(adapter_module, tiny):
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        adapter_module.LaCoLMMS()
    with pytest.raises(TypeError, match="unexpected model_args.*'foo'"):
        adapter_module.LaCoLMMS(model=tiny[0], processor=tiny[1], foo=1)
    with pytest.raises(ValueError, match="needs processor"):
        adapter_module.LaCoLMMS(model=tiny[0])
    lm = adapter_module.LaCoLMMS(model=tiny[0], processor=tiny[1], batch_size="3", max_batch_size=None)
    assert lm.batch_size == 3  # lmms-eval passes CLI values as strings


def test_prompt_places_images_once(adapter_module, tiny):
    lm = _adapter(adapter_module, tiny)
    assert lm._prompt("Q?", 2).count("<image>\n<image>\nQ?") == 1
    assert lm._prompt("<image> Q?", 1).count("<image>") == 1  # the task placed it: not added again
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        lm._prompt("<image> Q?", 2)


def test_generation_args(adapter_module, tiny):
    lm = _adapter(adapter_module, tiny, max_new_tokens=7)
    assert lm._generation_args({}) == ([], 7, {"num_beams": 1})
    until, n, kw = lm._generation_args({"until": "\n", "max_new_tokens": 4, "temperature": 0, "top_p": 1.0,
                                        "do_sample": False})
    assert (until, n, kw) == (["\n"], 4, {"num_beams": 1})
    assert lm._generation_args({"temperature": 0.7, "top_p": 0.9})[2] == {
        "num_beams": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    with pytest.raises(ValueError, match="until"):
        lm._generation_args({"until": 3})


def test_generate_until_matches_builtin_path(adapter_module, tiny):
    from laco.eval.evaluator import generate_texts, render_prompt

    model, processor = tiny
    lm = _adapter(adapter_module, tiny, batch_size=2)
    gen = {"max_new_tokens": 4, "temperature": 0}
    other = {"max_new_tokens": 2, "temperature": 0}
    specs = [(0, gen), (1, gen), (2, other)]  # two batches: gen_kwargs differ for the last
    requests = [_instance(adapter_module, "generate_until",
                          (DOCS[i]["question"], dict(g), _doc_to_visual, i, "toy", "test"), i) for i, g in specs]
    out = lm.generate_until(requests)
    for (i, g), text in zip(specs, out):
        images = _doc_to_visual(DOCS[i])
        prefix = "<image>\n" * len(images)
        prompt = render_prompt(processor, [{"role": "user", "content": prefix + DOCS[i]["question"]}])
        assert text == generate_texts(model, processor, [prompt], images, g["max_new_tokens"])[0]


def test_generate_until_cuts_at_stop_string(adapter_module, tiny):
    lm = _adapter(adapter_module, tiny)
    args = ("What colour?", {"max_new_tokens": 6}, _doc_to_visual, 0, "toy", "test")
    full = lm.generate_until([_instance(adapter_module, "generate_until", args, 0)])[0]
    assert len(full) >= 2, "the tiny model should produce a few characters"
    stop = full[1]
    cut = lm.generate_until([_instance(adapter_module, "generate_until",
                                       (args[0], {**args[1], "until": [stop]}, *args[2:]), 0)])[0]
    assert cut == full.split(stop)[0]


def test_video_visual_is_a_clear_error(adapter_module, tiny):
    lm = _adapter(adapter_module, tiny)
    args = ("Q?", {}, lambda doc: ["/videos/clip.mp4"], 0, "toy", "test")
    with pytest.raises(ValueError, match="images only, got a str visual"):
        lm.generate_until([_instance(adapter_module, "generate_until", args, 0)])
    with pytest.raises(ValueError, match="unknown document toy/test/9"):
        lm.generate_until([_instance(adapter_module, "generate_until", ("Q?", {}, _doc_to_visual, 9, "toy", "test"), 9)])


@torch.inference_mode()
def _manual_loglikelihood(model, processor, prompt: str, continuation: str, images) -> tuple[float, bool]:
    """Reference: one forward over prompt + continuation; mean -log p over the continuation tokens, greedy flag."""
    n_ctx = len(processor(text=[prompt], images=images or None)["input_ids"][0])
    full = processor(text=[prompt + continuation], images=images or None, return_tensors="pt")
    logits = model(**full).logits[0]
    ids = full["input_ids"][0]
    nll, greedy = [], True
    for pos in range(n_ctx, len(ids)):
        row = torch.log_softmax(logits[pos - 1].float(), -1)
        nll.append(-row[ids[pos]].item())
        greedy &= bool(row.argmax() == ids[pos])
    return sum(nll) / len(nll), greedy


def test_loglikelihood_matches_manual_computation(adapter_module, tiny):
    from laco.eval.evaluator import render_prompt

    model, processor = tiny
    lm = _adapter(adapter_module, tiny)
    requests = [
        _instance(adapter_module, "loglikelihood", ("What colour?", "red", _doc_to_visual, 0, "toy", "test"), 0),
        _instance(adapter_module, "loglikelihood", ("How many?", lambda d: d["answer"], _doc_to_visual, 2, "toy", "test"), 2),
    ]
    results = [r.text for r in lm.loglikelihood(requests)]  # (loss, is_greedy) inside GenerationResult.text
    for (i, cont), (loss, greedy) in zip([(0, "red"), (2, "3")], results):
        images = _doc_to_visual(DOCS[i])
        prompt = render_prompt(processor, [{"role": "user", "content": "<image>\n" * len(images) + DOCS[i]["question"]}])
        ref_loss, ref_greedy = _manual_loglikelihood(model, processor, prompt, cont, images)
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-4) and loss > 0
        assert greedy == ref_greedy


def test_multi_round_is_not_implemented(adapter_module, tiny):
    with pytest.raises(NotImplementedError, match="history"):
        _adapter(adapter_module, tiny).generate_until_multi_round([])


# ------------------------------------------------------------------------ lmms-eval, end to end


TASK_UTILS = '''
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]

def doc_to_text(doc):
    return doc["question"]

def process_results(doc, results):
    return {"laco_exact": float(results[0].strip().lower() == doc["answer"])}
'''

GEN_TASK = """task: laco_toy_vqa
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: laco_exact
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

MC_TASK = """task: laco_toy_mc
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: ["red", "circle", "3"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""


@pytest.mark.lmms
@pytest.mark.skipif(not HAVE_LMMS and not REQUIRE_LMMS, reason=NO_LMMS_REASON)
def test_lmms_eval_end_to_end(tmp_path, tiny, monkeypatch):
    """`--model laco` resolves through the entry point, and lmms-eval's evaluator scores two local tasks."""
    import datasets
    from lmms_eval import models
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from laco.eval.evaluator import generate_texts, render_prompt
    from laco.eval.lmms import LaCoLMMS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert models.get_model("laco") is LaCoLMMS, "entry point not installed: run `pip install -e . --no-deps`"

    model, processor = tiny
    docs = [d for d in DOCS if d["image"] is not None]
    ds = datasets.Dataset.from_dict({"question": [d["question"] for d in docs], "answer": [d["answer"] for d in docs],
                                     "image": [d["image"] for d in docs]}).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "data"))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "utils.py").write_text(TASK_UTILS)
    (tmp_path / "tasks" / "laco_toy_vqa.yaml").write_text(GEN_TASK.format(data=tmp_path / "data"))
    (tmp_path / "tasks" / "laco_toy_mc.yaml").write_text(MC_TASK.format(data=tmp_path / "data"))
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")

    out = simple_evaluate(model="laco", model_args=f"pretrained={tmp_path / 'model'},device=cpu",
                          tasks=["laco_toy_vqa", "laco_toy_mc"], batch_size=2,
                          task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    # generation: the answers lmms-eval recorded are the built-in evaluator's answers for the same prompts
    samples = sorted(out["samples"]["laco_toy_vqa"], key=lambda s: s["doc_id"])
    for sample, doc in zip(samples, docs):
        prompt = render_prompt(processor, [{"role": "user", "content": "<image>\n" + doc["question"]}])
        expected = generate_texts(model, processor, [prompt], [doc["image"].convert("RGB")], 4)[0]
        assert sample["resps"][0][0] == expected.split("\n\n")[0]
    assert out["results"]["laco_toy_vqa"]["laco_exact,none"] == pytest.approx(
        sum(s["laco_exact"] for s in samples) / len(samples))
    # multiple choice via loglikelihood: lmms-eval picks the choice with the lowest loss (" " + choice)
    correct = 0
    for doc in docs:
        prompt = render_prompt(processor, [{"role": "user", "content": "<image>\n" + doc["question"]}])
        losses = [_manual_loglikelihood(model, processor, prompt, " " + c, [doc["image"].convert("RGB")])[0]
                  for c in ["red", "circle", "3"]]
        correct += ["red", "circle", "3"][min(range(3), key=losses.__getitem__)] == doc["answer"]
    assert out["results"]["laco_toy_mc"]["acc,none"] == pytest.approx(correct / len(docs))
