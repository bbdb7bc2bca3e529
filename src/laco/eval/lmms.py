"""lmms-eval model adapter: ``python -m lmms_eval --model laco --model_args pretrained=DIR --tasks mme``.

Discovery. lmms-eval 0.7.x resolves ``--model NAME`` through ``lmms_eval.models.MODEL_REGISTRY_V2``,
which loads the Python entry-point group ``lmms_eval.models``. Each entry point must be a
``ModelManifest`` (or a callable returning one) -- not the model class itself, which the registry
would call with no arguments. laco's ``pyproject.toml`` declares::

    [project.entry-points."lmms_eval.models"]
    laco = "laco.eval.lmms:lmms_manifest"

so after ``pip install -e .`` (and ``pip install lmms-eval==0.7.3 --no-deps`` plus the ``lmms`` extra)
``--model laco`` resolves to ``LaCoLMMS`` below, a "simple" (``is_simple = True``) model: requests
carry ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` and the documents are looked up
in ``self.task_dict`` (filled in by the lmms-eval evaluator).

The prompt logic is the built-in evaluator's (``laco.eval.evaluator``): one ``<image>\\n`` per image
before the question unless the task already placed ``<image>`` tokens, the model's chat template,
greedy left-padded batched generation.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

try:
    from lmms_eval.api.instance import GenerationResult, Instance
    from lmms_eval.api.model import lmms
except ImportError as err:  # pragma: no cover - exercised only where lmms-eval is absent
    raise ImportError(
        "laco.eval.lmms needs lmms-eval: pip install 'laco[lmms]' && pip install lmms-eval==0.7.3 --no-deps "
        "(a plain `pip install lmms-eval` pulls a CUDA torch and torchvision; see docs/evaluation.md)"
    ) from err

from laco.eval.evaluator import IMAGE_PLACEHOLDER, generate_texts, render_prompt

TESTED_LMMS_EVAL = "0.7."  # the adapter follows lmms-eval 0.7.x's registry and request layout
try:
    _version = importlib.metadata.version("lmms_eval")
except importlib.metadata.PackageNotFoundError:  # e.g. a source checkout on sys.path
    _version = None
if _version is not None and not _version.startswith(TESTED_LMMS_EVAL):
    warnings.warn(f"laco's lmms-eval adapter is tested with lmms-eval 0.7.3, found {_version}", stacklevel=2)

__all__ = ["LaCoLMMS", "lmms_manifest"]

MODEL_ID = "laco"


def lmms_manifest():
    """Entry point for the ``lmms_eval.models`` group: tells lmms-eval where ``--model laco`` lives."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LaCoLMMS")


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype must be 'auto' or a torch dtype name such as 'bfloat16', got {dtype!r}")
    return resolved


def _flatten(items: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(_flatten(item))
        elif item is not None:
            out.append(item)
    return out


class LaCoLMMS(lmms):
    """A LaCo MLLM (``laco.LaCoForConditionalGeneration`` + ``laco.LaCoProcessor``) behind lmms-eval's API.

    ``--model_args pretrained=DIR[,device=cuda,dtype=bfloat16,max_new_tokens=128,chat_template=FILE]``;
    ``device`` defaults to cuda when available, else cpu.
    In Python, pass ``model=`` and ``processor=`` objects instead of ``pretrained``. Single process
    (no data parallelism); ``batch_size`` rows share one left-padded ``generate`` call.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int | str = 128,
        chat_template: str | None = None,
        model: Any = None,
        processor: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        kwargs.pop("max_batch_size", None)  # passed by lmms-eval's CLI; batches here are fixed-size
        if kwargs:
            raise TypeError(f"unexpected model_args for --model laco: {sorted(kwargs)}")
        if (pretrained is None) == (model is None):
            raise ValueError("give exactly one of pretrained=DIR (a saved LaCo model) or model=... with processor=...")
        if model is None:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            import laco.model  # noqa: F401  (registers model_type "laco" with the Auto classes)

            model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=_resolve_dtype(dtype))
            processor = AutoProcessor.from_pretrained(pretrained)
        elif processor is None:
            raise ValueError("model=... needs processor=... as well")
        model.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
        self._model = model.eval()
        self.processor = processor
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if self.batch_size_per_gpu < 1 or self.max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size!r}, {max_new_tokens!r}")
        if chat_template is not None:  # a file path or the template text itself
            path = Path(chat_template)
            self.processor.chat_template = path.read_text() if path.is_file() else chat_template

    # --- properties lmms-eval reads -----------------------------------------------------------
    @property
    def model(self) -> Any:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device

    # --- request helpers ----------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(f"lmms-eval request for unknown document {task}/{split}/{doc_id}: {err}") from None

    def _visuals(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: int) -> list[Any]:
        """The document's images as RGB PIL images; video/audio inputs are a clear error."""
        from PIL import Image

        if doc_to_visual is None:
            return []
        visuals = _flatten([doc_to_visual(self._doc(task, split, doc_id))])
        out = []
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise ValueError(f"{task}/{doc_id}: laco handles images only, got a {type(v).__name__} visual")
            out.append(v.convert("RGB"))
        return out

    def _prompt(self, context: str, num_images: int) -> str:
        """Chat-template prompt for one user turn; image placeholders first unless the task placed them."""
        placed = context.count(IMAGE_PLACEHOLDER)
        if placed == 0:
            context = f"{IMAGE_PLACEHOLDER}\n" * num_images + context
        elif placed != num_images:
            raise ValueError(f"context has {placed} {IMAGE_PLACEHOLDER} placeholders but {num_images} images")
        return render_prompt(self.processor, [{"role": "user", "content": context}])

    def _generation_args(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int, dict[str, Any]]:
        """lmms-eval gen_kwargs -> (stop strings, max_new_tokens, generate kwargs)."""
        gen = dict(gen_kwargs or {})
        until = gen.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, list):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
        max_new = int(gen.pop("max_new_tokens", self.max_new_tokens))
        temperature = float(gen.pop("temperature", 0) or 0)
        kw: dict[str, Any] = {"num_beams": int(gen.pop("num_beams", 1) or 1)}
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature)
            if gen.get("top_p") is not None:
                kw["top_p"] = float(gen["top_p"])
        return until, max_new, kw

    # --- lmms API -----------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batched generation; consecutive requests with equal gen_kwargs share a batch."""
        from tqdm.auto import tqdm

        results: list[str] = [""] * len(requests)
        args = [req.args for req in requests]
        bar = tqdm(total=len(requests), desc="laco generate", disable=self.rank != 0)
        start = 0
        while start < len(args):
            end = start + 1
            while end < len(args) and end - start < self.batch_size and args[end][1] == args[start][1]:
                end += 1
            chunk = args[start:end]
            until, max_new, kw = self._generation_args(chunk[0][1])
            prompts, images = [], []
            for context, _, doc_to_visual, doc_id, task, split in chunk:
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
                prompts.append(self._prompt(context, len(visuals)))
                images.extend(visuals)
            texts = generate_texts(self.model, self.processor, prompts, images, max_new, **kw)
            for i, (text, (context, gen_kwargs, *_)) in enumerate(zip(texts, chunk)):
                for stop in until:  # cut at the first stop string, as lmms-eval models do
                    if stop:
                        text = text.split(stop)[0]
                results[start + i] = text
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            bar.update(len(chunk))
            start = end
        bar.close()
        return results

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request ``(loss, is_greedy)``: the mean negative log-likelihood of the continuation's tokens
        after the chat prompt, and whether greedy decoding would produce exactly them.

        The loss, not a log-probability, is what lmms-eval's models return (llava, llava_onevision:
        ``outputs.loss``) and what its ``multiple_choice`` scoring expects (it takes the ``argmin``),
        although the base-class docstring says "logprob".

        Each pair is returned inside ``GenerationResult.text``: lmms-eval 0.7.3's evaluator passes every
        response through ``unwrap_generation_output``, which turns a bare ``(float, bool)`` tuple into its
        ``str()`` (then ``multiple_choice`` tasks fail with "too many values to unpack"), while a
        ``GenerationResult``'s ``text`` is passed through unchanged -- so the pair arrives intact.
        """
        results = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in (req.args for req in requests):
            doc = self._doc(task, split, doc_id)
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            prompt = self._prompt(context, len(visuals))
            results.append(GenerationResult(text=self._score_continuation(prompt, str(continuation), visuals)))
        return results

    def _score_continuation(self, prompt: str, continuation: str, images: list[Any]) -> tuple[float, bool]:
        images_arg = images or None
        full = self.processor(text=[prompt + continuation], images=images_arg, return_tensors="pt")
        ctx_len = self.processor(text=[prompt], images=images_arg, return_tensors="pt")["input_ids"].shape[1]
        input_ids = full["input_ids"]  # (1, T); the continuation is input_ids[:, ctx_len:]
        if input_ids.shape[1] <= ctx_len:
            raise ValueError(f"continuation {continuation!r} adds no tokens to the prompt")
        device = self.device
        inputs = {k: v.to(device) for k, v in full.items() if isinstance(v, torch.Tensor)}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(next(self.model.parameters()).dtype)
        logits = self.model(**inputs).logits[0, ctx_len - 1:-1].float()  # (T_cont, V): position t predicts t+1
        target = inputs["input_ids"][0, ctx_len:]
        loss = torch.nn.functional.cross_entropy(logits, target)  # mean NLL over the continuation tokens
        greedy = bool((logits.argmax(-1) == target).all())
        return float(loss), greedy

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "--model laco does not implement generate_until_multi_round; use `laco eval` with 'history' records "
            "for multi-turn evaluation"
        )
