"""``laco compare``: LaCo against external and in-encoder baselines on the embedded scenes, two scenarios.

Every method gives the LLM the same visual-token budget (r = 2: 8x8 -> 4x4 = 16 tokens), except
``none`` (64 tokens, the uncompressed reference)::

    none                  no compression
    ext_pixel_shuffle     pixel shuffle + MLP after the encoder       (layer "post")
    ext_laco              LaCo PML after the encoder (LaCo@1)         (layer "post")
    laco@1/4 ...          inside the encoder after k = L/4 layers: laco, pixel_shuffle (no shortcut),
                          avg_pool, ldpv2, tokenpacker, tome; and laco at 1/12 and 1/2

The MLLM is ``laco.LaCoForConditionalGeneration``: the embedded pretrained SigLIP-structured
encoder (``laco.experiments.pretrain``), an ``mlp2x_gelu`` projector and a small Qwen2 LLM built
in code, with a small byte-level BPE (``train_small_tokenizer``): the answers use a few dozen
words, and the real Qwen2 vocabulary (151k) would make the output softmax cost ~100x the rest of a
width-128 LLM. The LLM is first trained on the questions and answers as text (no image), so that
stage 1 has a language model to align to, as LLaVA's does.

Scenarios (the encoder is frozen throughout, as in LLaVA / LaCo stage 1):

* **readout**: the feasibility study's protocol on the same encoder: insert the compressor and train
  only it against the encoder's frozen, pretrained quadrant read-out (a pretrained, frozen consumer).
* **train**: pretrained encoder + new compressor and projector. Stage 1 trains compressor +
  projector (LLM frozen); stage 2 also trains the LLM.
* **retrofit**: start from the trained uncompressed MLLM (the train scenario's ``none`` model of the
  same seed), insert the compressor, train only the compressor, everything else frozen; accuracy is
  measured before and after.

Speed: because the encoder is frozen, the output of its first k layers never changes; it is
computed once per image (``cache_hidden_states``) and training runs layers k+1..L, the projector
and the LLM from there (``image_features_from_hidden``). ``tests/test_compare.py`` checks that this
gives the same loss as the model's own forward from pixels. Throughput is measured separately on
the real, uncached model.

Accuracy is greedy exact match, computed in one teacher-forced pass: greedy decoding produces the
reference answer (then ``<|im_end|>``) if and only if the argmax at every answer position is the
reference token, so no ``generate`` loop is needed.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from laco.compressors.spec import MethodSpec, canonical_name, parse_method
from laco.compressors.spec import parse_methods as parse_method_specs
from laco.data.embedded import EmbeddedDataConfig, EmbeddedDataset, build_embedded_dataset
from laco.experiments.pretrain import PretrainConfig, load_pretrained_encoder, to_pixel_values
from laco.flops import encoder_cost
from laco.train.optim import build_optimizer, build_scheduler, freeze_for_stage

SCENARIOS = ("readout", "train", "retrofit")


# -- methods (grammar: laco.compressors.spec) -------------------------------------------------------
#: the comparison's rows, canonical names (results before #15 spell "laco@post" "ext_laco" and
#: "pixel_shuffle@post" "ext_pixel_shuffle"; both spellings are accepted)
DEFAULT_METHODS = ("none", "pixel_shuffle@post", "laco@post", "laco@1/4", "pixel_shuffle@1/4", "avg_pool@1/4",
                   "ldpv2@1/4", "tokenpacker@1/4", "tome@1/4", "laco@1/12", "laco@1/2")


def parse_methods(spec: str | list[str] | None) -> list[str]:
    """'laco@1/4,pixel_shuffle@1/4' or a list -> canonical method names (default: ``DEFAULT_METHODS``)."""
    return list(DEFAULT_METHODS) if spec is None else [m.name for m in parse_method_specs(spec)]


# -- presets ----------------------------------------------------------------------------------------
@dataclass
class LLMConfig:
    """The small Qwen2-structured LLM (built in code) and its tokenizer size."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512  # the small BPE trained on the embedded text


@dataclass
class ComparePreset:
    """Everything ``laco compare`` does; presets fill it, a YAML/JSON file overrides any field."""

    name: str = "quick"
    data: EmbeddedDataConfig = field(default_factory=EmbeddedDataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    seeds: list[int] = field(default_factory=lambda: [0])
    ratio: int = 2
    projector_type: str = "mlp2x_gelu"
    # budgets (steps of ``batch_size`` samples)
    batch_size: int = 32
    llm_pretrain_steps: int = 150
    stage1_steps: int = 100
    stage2_steps: int = 150
    retrofit_steps: int = 60
    readout_steps: int = 60  # compressor-only steps against the frozen pretrained read-out
    readout_batch_size: int = 128
    lr_llm_pretrain: float = 2e-3
    lr_stage1: float = 1e-3
    lr_stage2: float = 5e-4
    lr_retrofit: float = 1e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    # evaluation and timing
    eval_limit: int | None = None  # test questions (None: all)
    eval_batch_size: int = 128
    curve_every: int = 0  # train scenario: test accuracy every N stage-2 steps (0: off) -> acc_vs_step.png
    curve_limit: int | None = 600  # test questions per curve point (None: all)
    timing_batches: int = 3  # uncached batches timed per method (median reported)
    timing_batch_size: int = 32
    cache_dtype: str = "float32"  # hidden-state cache; "float16" halves its memory
    threads: int = 2  # torch threads; on a busy shared machine 1 is often faster
    cache_dir: str | None = None  # default $LACO_CACHE or ~/.cache/laco

    def __post_init__(self) -> None:
        for name, cls in (("data", EmbeddedDataConfig), ("pretrain", PretrainConfig), ("llm", LLMConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        self.methods = parse_methods(self.methods)
        bad = [s for s in self.scenarios if s not in SCENARIOS]
        if bad or not self.scenarios:
            raise ValueError(f"unknown scenario(s) {bad or self.scenarios!r}; choose from {SCENARIOS}")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if self.cache_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"cache_dtype must be float32, float16 or bfloat16, got {self.cache_dtype!r}")
        if self.pretrain.data.canvas != self.data.canvas:
            raise ValueError(f"pretrain.data.canvas {self.pretrain.data.canvas} != data.canvas {self.data.canvas}")
        if self.curve_every < 0:
            raise ValueError(f"curve_every must be >= 0 (0: no learning curve), got {self.curve_every}")
        for k in ("batch_size", "eval_batch_size", "timing_batch_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")


def _smoke() -> ComparePreset:
    data = EmbeddedDataConfig(num_train=96, num_val=16, num_test=32)
    pre = PretrainConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, steps=4,
                         batch_size=16, pool_size=64, eval_size=32, warmup_steps=2, data=data)
    return ComparePreset(
        name="smoke", data=data, pretrain=pre,
        llm=LLMConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=320),
        batch_size=8, llm_pretrain_steps=2, stage1_steps=2, stage2_steps=2, retrofit_steps=2, eval_batch_size=32,
        timing_batches=1, timing_batch_size=4, threads=1,  # tiny ops: a second thread only adds sync overhead
    )


def _quick() -> ComparePreset:
    data = EmbeddedDataConfig(num_train=8000, num_val=500, num_test=600)
    return ComparePreset(name="quick", data=data, pretrain=PretrainConfig(data=data), stage1_steps=80,
                         stage2_steps=120, retrofit_steps=60)


def _full() -> ComparePreset:
    data = EmbeddedDataConfig(num_train=12000, num_val=1000, num_test=2000)
    return ComparePreset(
        name="full", data=data, pretrain=PretrainConfig(steps=800, batch_size=96, data=data), seeds=[0, 1, 2],
        # the tiny MLLM needs ~1500+ stage-2 steps to read the image (docs/compare.md); hours on 2 CPU cores
        stage1_steps=200, stage2_steps=2000, retrofit_steps=150, readout_steps=150, llm_pretrain_steps=300,
        timing_batches=5,
    )


PRESETS = {"smoke": _smoke, "quick": _quick, "full": _full}


def _merge(obj: Any, overrides: dict[str, Any], where: str = "") -> Any:
    """A copy of dataclass ``obj`` with ``overrides`` applied recursively; unknown keys are a ValueError."""
    names = {f.name for f in fields(obj)}
    kw = {}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"unknown config key {where + key!r}; known: {', '.join(sorted(names))}")
        cur = getattr(obj, key)
        kw[key] = _merge(cur, value, f"{where}{key}.") if is_dataclass(cur) and isinstance(value, dict) else value
    out = copy.deepcopy(obj)
    for key, value in kw.items():
        setattr(out, key, value)
    if where == "" and "data" in overrides and "pretrain" not in overrides:
        out.pretrain.data = copy.deepcopy(out.data)  # the encoder sees scenes of the same geometry
    if hasattr(out, "__post_init__"):
        out.__post_init__()  # re-validate
    return out


def load_preset(name: str = "quick", config_file: str | os.PathLike | None = None, **overrides: Any) -> ComparePreset:
    """A preset, then a YAML/JSON config file, then keyword overrides (``methods="laco@1/4"``, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[name]()
    if config_file is not None:
        from laco.safety import read_yaml

        path = Path(config_file)
        data = read_yaml(path, "compare config") or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file must hold a mapping of preset fields, got {type(data).__name__}: {path}")
        data.pop("preset", None)  # the CLI reads it; the rest overrides fields
        try:
            preset = _merge(preset, data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{err} (in {path})") from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return _merge(preset, overrides) if overrides else preset


# -- text: tokenizer and tokenised splits -----------------------------------------------------------
@dataclass
class TokenizedSplit:
    """Right-padded token ids of one split at one image-token count.

    input_ids / attention_mask / labels: (N, L); labels are -100 except on scored answer tokens
    (answer text + ``<|im_end|>``). image_index: (N,) row of the split's scene arrays.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_index: torch.Tensor
    task: list[str]
    turn: list[int]

    def __len__(self) -> int:
        return len(self.image_index)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``idx``, trimmed to the longest row (no all-pad columns)."""
        mask = self.attention_mask[idx]
        n = int(mask.sum(1).max())
        return self.input_ids[idx, :n], mask[:, :n], self.labels[idx, :n]


def _image_row(path: str) -> int:
    return int(Path(path).stem)  # "images/test/000123.png" -> 123


def conversations(ds: EmbeddedDataset, split: str) -> list[tuple[list[dict[str, str]], int, int, str, int]]:
    """(messages, image row, number of scored assistant turns at the end, task, turn) per sample.

    Train: the LLaVA records, every answer scored. Val/test: the eval JSONL rendered exactly as
    ``laco.eval`` renders it (history teacher-forced), only the final answer scored.
    """
    from laco.eval.evaluator import build_messages, load_records

    out = []
    if split == "train":
        for rec in ds.llava(split):
            msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                    for t in rec["conversations"]]
            out.append((msgs, _image_row(rec["image"]), sum(m["role"] == "assistant" for m in msgs), rec["task"], 1))
        return out
    for rec in load_records(ds.eval_file(split)):
        msgs = build_messages(rec) + [{"role": "assistant", "content": str(rec.answer)}]
        out.append((msgs, _image_row(str(rec.images[0])), 1, rec.task, rec.turn))
    return out


def build_tokenizer(ds: EmbeddedDataset, vocab_size: int):
    """A small byte-level BPE trained on the training conversations (the model engineer's trainer)."""
    from laco.model.tokenizer import train_small_tokenizer

    texts = [m["content"].replace("<image>\n", "") for msgs, *_ in conversations(ds, "train") for m in msgs]
    return train_small_tokenizer(texts, vocab_size)


def tokenize_split(tok, convs: list, num_image_tokens: int, *, with_image: bool = True) -> TokenizedSplit:
    """Chat-template the conversations, expand ``<image>`` to ``num_image_tokens`` tokens, label the scored answers."""
    texts, spans = [], []
    for msgs, _, n_scored, _, _ in convs:
        if not with_image:
            msgs = [{**m, "content": m["content"].replace("<image>\n", "")} for m in msgs]
        text = tok.apply_chat_template(msgs, tokenize=False)
        text = text.replace("<image>", "<image>" * num_image_tokens)
        # char spans of the scored answers: content + "<|im_end|>" of the last n_scored assistant turns
        cur, found = 0, []
        for m in msgs:
            if m["role"] != "assistant":
                continue
            head = "<|im_start|>assistant\n"
            start = text.index(head + m["content"] + "<|im_end|>", cur) + len(head)
            end = start + len(m["content"]) + len("<|im_end|>")
            found.append((start, end))
            cur = end
        texts.append(text)
        spans.append(found[len(found) - n_scored:])
    enc = tok(texts, padding=True, return_offsets_mapping=True, return_tensors="pt")
    ids, offsets = enc["input_ids"], enc["offset_mapping"]  # (N, L), (N, L, 2)
    labels = torch.full_like(ids, -100)
    for i, sp in enumerate(spans):
        for s, e in sp:
            sel = (offsets[i, :, 0] >= s) & (offsets[i, :, 1] <= e) & (offsets[i, :, 1] > offsets[i, :, 0])
            labels[i, sel] = ids[i, sel]
    image_id = tok.convert_tokens_to_ids("<image>")
    if with_image:
        counts = (ids == image_id).sum(1)
        if not bool((counts == num_image_tokens).all()):
            raise ValueError(f"expected {num_image_tokens} image tokens per sample, got {sorted(set(counts.tolist()))}")
    return TokenizedSplit(ids, enc["attention_mask"], labels, torch.tensor([c[1] for c in convs]),
                          [c[3] for c in convs], [c[4] for c in convs])


# -- model building ---------------------------------------------------------------------------------
def llm_config(cfg: LLMConfig, tok):
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads, vocab_size=len(tok),
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
    )


def build_model(spec: MethodSpec, preset: ComparePreset, encoder, llm, tok, seed: int):
    """A ``LaCoForConditionalGeneration`` with the pretrained encoder and LLM weights and a fresh
    projector + compressor drawn from ``seed`` (the same projector init for every method of a seed)."""
    from laco.model import LaCoConfig, LaCoForConditionalGeneration

    config = LaCoConfig(
        vision_config=encoder.config.to_dict(), text_config=llm.config.to_dict(),
        compression={**spec.compression, "ratio": preset.ratio}, projector_type=preset.projector_type,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LaCoForConditionalGeneration(config)
    model.vision_tower.vision_model.load_state_dict(encoder.state_dict())
    model.language_model.load_state_dict(llm.state_dict())
    return model


def start_layer(model) -> int:
    """Layers of the frozen encoder that run before anything trainable: the first merge (or all layers)."""
    tower = model.vision_tower
    return min(tower.merge_layers, default=tower.num_layers)


def image_features_from_hidden(model, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """(B, P + H*W, C) encoder state after ``start`` layers -> projected image features (B, T, D)."""
    return model.get_image_features(encoder_state=hidden, start_layer=start)


def lm_logits_and_loss(model, feats: torch.Tensor | None, ids, mask, labels):
    """Run the LLM on ``ids`` with ``feats`` written into the image-token positions (the model's own merge)."""
    emb = model.get_input_embeddings()(ids)
    if feats is not None:
        emb = model.merge_image_features(ids, emb, feats)
    out = model.language_model(inputs_embeds=emb, attention_mask=mask, labels=labels)
    return out.logits, out.loss


@torch.no_grad()
def cache_hidden_states(encoder, images: np.ndarray, layers: list[int], batch_size: int = 256,
                        dtype: torch.dtype = torch.float32, desc: str = "caching") -> dict[int, torch.Tensor]:
    """Uncompressed encoder states after each of ``layers`` (0 = embeddings) for all ``images``: {k: (N, P+HW, C)}."""
    from tqdm.auto import tqdm

    from laco.encoders import compress_encoder

    tower = compress_encoder(encoder, "none").eval()
    out = {k: [] for k in layers}
    for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
        states = tower(to_pixel_values(images[i:i + batch_size]), output_hidden_states=True).hidden_states
        for k in layers:
            out[k].append(states[k].to(dtype))
    return {k: torch.cat(v) for k, v in out.items()}


# -- training and evaluation ------------------------------------------------------------------------
def train_steps(model, params: list[nn.Parameter], hidden: torch.Tensor | None, start: int, data: TokenizedSplit,
                steps: int, lr: float, preset: ComparePreset, seed: int, desc: str,
                on_step: Callable[[int], None] | None = None) -> float:
    """AdamW + warmup/cosine on cached states (``hidden`` None: text only). Returns samples/s of these steps.

    ``on_step(n)`` runs after step n (1-based), e.g. to evaluate; its time is not counted in samples/s.
    """
    from tqdm.auto import tqdm

    if steps <= 0 or not params:
        return float("nan")
    model.train()
    opt = build_optimizer(params, lr=lr, weight_decay=preset.weight_decay)
    sched = build_scheduler(opt, steps, warmup_steps=max(1, int(preset.warmup_fraction * steps)))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, leave=False)
    for step in bar:
        idx = torch.randint(0, len(data), (preset.batch_size,), generator=gen)
        ids, mask, labels = data.batch(idx)
        feats = None
        if hidden is not None:
            feats = image_features_from_hidden(model, hidden[data.image_index[idx]].float(), start)
        _, loss = lm_logits_and_loss(model, feats, ids, mask, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_step is not None:
            t_cb = time.perf_counter()
            on_step(step + 1)
            model.train()
            t0 += time.perf_counter() - t_cb
    model.eval()
    return steps * preset.batch_size / (time.perf_counter() - t0)


@torch.no_grad()
def evaluate_cached(model, hidden: torch.Tensor, start: int, data: TokenizedSplit, batch_size: int,
                    limit: int | None = None) -> dict[str, Any]:
    """Greedy exact-match accuracy (%) overall, per task and per turn, in one teacher-forced pass per batch."""
    model.eval()
    n = len(data) if limit is None else min(limit, len(data))
    correct = torch.zeros(n, dtype=torch.bool)
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(n, i + batch_size))
        ids, mask, labels = data.batch(idx)
        feats = image_features_from_hidden(model, hidden[data.image_index[idx]].float(), start)
        logits, _ = lm_logits_and_loss(model, feats, ids, mask, None)
        pred, target = logits[:, :-1].argmax(-1), labels[:, 1:]  # position t predicts token t+1
        scored = target != -100
        correct[idx] = ((pred == target) | ~scored).all(1)
    return summarize(correct, data.task[:n], data.turn[:n])


def summarize(correct: torch.Tensor, tasks: list[str], turns: list[int]) -> dict[str, Any]:
    c = correct.float().numpy()

    def acc(sel):
        sel = np.asarray(sel)
        return round(100.0 * float(c[sel].mean()), 2) if sel.any() else None

    return {
        "accuracy": acc(np.ones(len(c), bool)), "n": len(c),
        "per_task": {t: acc([x == t for x in tasks]) for t in sorted(set(tasks))},
        "per_turn": {str(t): acc([x == t for x in turns]) for t in sorted(set(turns))},
    }


def measure_throughput(model, images: np.ndarray, data: TokenizedSplit, params: list[nn.Parameter],
                       batches: int, batch_size: int) -> dict[str, float]:
    """Median samples/s of the real (uncached) model from pixels: inference prefill, and one training step
    (forward + backward through everything after the frozen part, optimizer excluded)."""
    rows = torch.arange(min(len(data), batches * batch_size))
    infer, train = [], []
    for b in range(batches):
        idx = rows[b * batch_size:(b + 1) * batch_size]
        if not len(idx):
            break
        ids, mask, labels = data.batch(idx)
        pix = to_pixel_values(images[data.image_index[idx].numpy()])
        model.eval()
        with torch.no_grad():
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, pixel_values=pix, logits_to_keep=1)
            infer.append(len(idx) / (time.perf_counter() - t0))
        if params:
            model.train()
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels).loss.backward()
            train.append(len(idx) / (time.perf_counter() - t0))
            model.zero_grad(set_to_none=True)
    model.eval()
    return {"infer_samples_per_s": round(statistics.median(infer), 1),
            "train_samples_per_s": round(statistics.median(train), 1) if train else None}


# -- the experiment ---------------------------------------------------------------------------------
@dataclass
class Context:
    """What every run shares: data, tokenizer, pretrained encoder and LLM, caches, tokenised splits."""

    preset: ComparePreset
    ds: EmbeddedDataset
    tok: Any
    encoder: Any
    llm: Any
    encoder_metrics: dict
    readout: Any  # the encoder's pretraining head (quadrant classes), frozen
    hidden: dict[str, dict[int, torch.Tensor]]  # split -> layer -> states
    splits: dict[tuple[str, int], TokenizedSplit]  # (split, image tokens) -> tokens
    timings: dict[str, float] = field(default_factory=dict)


def pretrain_llm(preset: ComparePreset, tok, train_convs) -> Any:
    """The small Qwen2 LLM trained on the training conversations as text only (no image)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)
        llm = AutoModelForCausalLM.from_config(llm_config(preset.llm, tok))
    text = tokenize_split(tok, train_convs, 0, with_image=False)

    class _TextOnly(nn.Module):  # the interface lm_logits_and_loss expects, without images
        def __init__(self, lm):
            super().__init__()
            self.language_model = lm

        def get_input_embeddings(self):
            return self.language_model.get_input_embeddings()

    wrapper = _TextOnly(llm)
    train_steps(wrapper, list(llm.parameters()), None, 0, text, preset.llm_pretrain_steps, preset.lr_llm_pretrain,
                preset, seed=12345, desc="pretraining LLM on text")
    return llm.eval()


def prepare(preset: ComparePreset, *, log=print) -> Context:
    """Data, encoder (cached on disk), tokenizer, text-pretrained LLM, hidden-state caches, tokenised splits."""
    torch.set_num_threads(preset.threads)
    timings = {}
    t = time.perf_counter()
    ds = build_embedded_dataset(preset.data, Path(preset.cache_dir) / "data" / _data_name(preset)
                                if preset.cache_dir else None)
    timings["data_s"] = time.perf_counter() - t
    if ds.source != "fashion_mnist":
        log("[yellow]Fashion-MNIST is not installed: using PIL-generated scenes "
            "(apt-get install dataset-fashion-mnist for the real images)[/yellow]")
    log(f"data: {ds.source} scenes in {ds.root} (train {len(ds.scenes['train'])}, test {len(ds.scenes['test'])})")
    t = time.perf_counter()
    encoder, readout, enc_metrics = load_pretrained_encoder(preset.cache_dir, preset.pretrain, with_head=True)
    timings["encoder_s"] = time.perf_counter() - t
    log(f"pretrained encoder: quadrant accuracy {enc_metrics['quadrant_acc']}%, dot {enc_metrics['dot_acc']}% "
        f"(held-out scenes; pretraining took {enc_metrics['train_seconds']} s, once)")
    t = time.perf_counter()
    train_convs = conversations(ds, "train")
    test_convs = conversations(ds, "test")
    tok = build_tokenizer(ds, preset.llm.vocab_size)
    llm = pretrain_llm(preset, tok, train_convs)
    timings["llm_pretrain_s"] = time.perf_counter() - t
    # which encoder states the methods start from, and how many image tokens each gives
    specs = {m: parse_method(m) for m in {*preset.methods, "none"}}
    starts, tokens = set(), set()
    with torch.device("meta"):
        for spec in specs.values():
            m = build_model(spec, preset, _meta_like(encoder), _meta_like(llm), tok, 0)
            starts.add(start_layer(m))
            tokens.add(m.num_image_tokens)
    t = time.perf_counter()
    dtype = getattr(torch, preset.cache_dtype)
    hidden = {s: cache_hidden_states(encoder, ds.scenes[s].images, sorted(starts), dtype=dtype, desc=f"caching {s} states")
              for s in ("train", "test")}
    timings["cache_s"] = time.perf_counter() - t
    splits = {}
    for n in sorted(tokens):
        splits[("train", n)] = tokenize_split(tok, train_convs, n)
        splits[("test", n)] = tokenize_split(tok, test_convs, n)
    for q in [*encoder.parameters(), *readout.parameters()]:
        q.requires_grad_(False)
    return Context(preset, ds, tok, encoder, llm, enc_metrics, readout, hidden, splits, timings)


def _data_name(preset: ComparePreset) -> str:
    from laco.data.embedded import get_item_source

    src = get_item_source(preset.data.source).name
    return f"{src}-{preset.data.key(src)}"


def _meta_like(module):
    """A meta-device copy (config only) for shape bookkeeping."""
    with torch.device("meta"):
        return type(module)(copy.deepcopy(module.config))


def run_method(ctx: Context, name: str, seed: int, scenario: str, base=None) -> tuple[dict[str, Any], Any]:
    """One (method, seed, scenario) run -> (result row, trained model)."""
    p, spec = ctx.preset, parse_method(name)
    tag = f"{scenario} {name} s{seed}"
    model = build_model(spec, p, ctx.encoder, ctx.llm, ctx.tok, seed)
    if scenario == "retrofit":
        if base is None:
            raise ValueError("retrofit needs the trained uncompressed base model")
        state = {k: v for k, v in base.state_dict().items() if ".compressors." not in k}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(".compressors." not in k for k in missing):
            raise RuntimeError(f"retrofit load mismatch: missing {missing}, unexpected {unexpected}")
    start = start_layer(model)
    n_tok = model.num_image_tokens
    train, test = ctx.splits[("train", n_tok)], ctx.splits[("test", n_tok)]
    h_train, h_test = ctx.hidden["train"][start], ctx.hidden["test"][start]
    row: dict[str, Any] = {"method": name, "scenario": scenario, "seed": seed, "compressor": spec.compressor,
                           "layer": spec.layer, "merge_layer": start if spec.compressor != "none" else None}
    t0 = time.perf_counter()
    if scenario == "train":
        params = freeze_for_stage(model, ["compressor", "projector"])
        sps1 = train_steps(model, params, h_train, start, train, p.stage1_steps, p.lr_stage1, p, seed, f"{tag} stage 1")
        params = freeze_for_stage(model, ["compressor", "projector", "llm"])
        curve: list[list[float]] = []

        def record(step: int) -> None:  # test accuracy during stage 2 (a learning curve, not model selection)
            if p.curve_every and (step % p.curve_every == 0 or step == p.stage2_steps):
                acc = evaluate_cached(model, h_test, start, test, p.eval_batch_size, p.curve_limit)["accuracy"]
                curve.append([p.stage1_steps + step, acc])

        sps2 = train_steps(model, params, h_train, start, train, p.stage2_steps, p.lr_stage2, p, seed + 1,
                           f"{tag} stage 2", on_step=record)
        row["cached_train_samples_per_s"] = round(sps2, 1)
        if curve:
            row["curve"] = curve
    else:
        row["before"] = evaluate_cached(model, h_test, start, test, p.eval_batch_size, p.eval_limit)
        # parameter-free compressors (avg_pool, tome) have nothing to retrofit: freeze all, train nothing
        if any(True for _ in model.vision_tower.compressors.parameters()):
            params = freeze_for_stage(model, ["compressor"])
        else:
            model.requires_grad_(False)
            params = []
        sps = train_steps(model, params, h_train, start, train, p.retrofit_steps, p.lr_retrofit, p, seed, f"{tag}")
        row["cached_train_samples_per_s"] = None if math.isnan(sps) else round(sps, 1)
    row["train_seconds"] = round(time.perf_counter() - t0, 1)
    row["after"] = evaluate_cached(model, h_test, start, test, p.eval_batch_size, p.eval_limit)
    row["trainable_params"] = sum(q.numel() for q in params)
    row.update(_costs(model))
    row.update(measure_throughput(model, ctx.ds.scenes["test"].images, test, params, p.timing_batches, p.timing_batch_size))
    for q in model.parameters():
        q.requires_grad_(False)
    return row, model


def _readout_accuracy(ctx: Context, tower, start: int, split: str, limit: int | None = None) -> dict[str, Any]:
    """Quadrant-classification accuracy (%) of the frozen pretrained read-out on the (compressed) tokens."""
    scenes = ctx.ds.scenes[split]
    n = len(scenes) if limit is None else min(limit, len(scenes))
    hidden, correct = ctx.hidden[split][start], 0
    tower.eval()
    with torch.no_grad():
        for i in range(0, n, 256):
            out = tower.forward_from(hidden[i:min(n, i + 256)].float(), tower.adapter.grid_for_image_size(), start)
            logits, _ = ctx.readout(out.last_hidden_state[:, tower.num_prefix_tokens:], out.grid)
            correct += int((logits.argmax(-1) == torch.as_tensor(scenes.labels[i:min(n, i + 256)])).sum())
    return {"accuracy": round(100.0 * correct / (4 * n), 2), "n": 4 * n, "per_task": {"quadrant": round(100.0 * correct / (4 * n), 2)},
            "per_turn": {}}


def run_readout(ctx: Context, name: str, seed: int) -> dict[str, Any]:
    """The feasibility study's protocol on the same encoder: insert the compressor, train only it against the
    frozen pretrained quadrant read-out (the consumer is pretrained and frozen, like a frozen LLM)."""
    from tqdm.auto import tqdm

    from laco.encoders import compress_encoder

    p, spec = ctx.preset, parse_method(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = compress_encoder(ctx.encoder, spec.compressor, layer=spec.layer, ratio=p.ratio,
                                 **dict(spec.kwargs)) if spec.compressor != "none" else compress_encoder(ctx.encoder, "none")
    start = min(tower.merge_layers, default=tower.num_layers)
    row: dict[str, Any] = {"method": name, "scenario": "readout", "seed": seed, "compressor": spec.compressor,
                           "layer": spec.layer, "merge_layer": start if spec.compressor != "none" else None}
    row["before"] = _readout_accuracy(ctx, tower, start, "test", p.eval_limit)
    params = list(tower.compressors.parameters())
    t0 = time.perf_counter()
    if params and p.readout_steps > 0:
        for q in params:
            q.requires_grad_(True)
        opt = build_optimizer(params, lr=p.lr_stage1, weight_decay=p.weight_decay)
        sched = build_scheduler(opt, p.readout_steps, warmup_steps=max(1, int(p.warmup_fraction * p.readout_steps)))
        gen = torch.Generator().manual_seed(seed)
        hidden, labels = ctx.hidden["train"][start], torch.as_tensor(ctx.ds.scenes["train"].labels)
        tower.train()
        for step in tqdm(range(p.readout_steps), desc=f"readout {name} s{seed}", leave=False):
            idx = torch.randint(0, len(hidden), (p.readout_batch_size,), generator=gen)
            out = tower.forward_from(hidden[idx].float(), tower.adapter.grid_for_image_size(), start)
            logits, _ = ctx.readout(out.last_hidden_state[:, tower.num_prefix_tokens:], out.grid)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels[idx].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        for q in params:
            q.requires_grad_(False)
    row["train_seconds"] = round(time.perf_counter() - t0, 1)
    row["after"] = _readout_accuracy(ctx, tower, start, "test", p.eval_limit)
    row["trainable_params"] = sum(q.numel() for q in params)
    row["cached_train_samples_per_s"] = None
    cost = encoder_cost(tower)
    row.update({"visual_tokens": tower.num_output_tokens(), "encoder_gflops": round(cost.total_flops / 1e9, 4),
                "encoder_flop_ratio": round(cost.flop_ratio, 3), "num_layers": tower.num_layers,
                "train_samples_per_s": None, "infer_samples_per_s": None})
    return row


def _costs(model) -> dict[str, Any]:
    cost = encoder_cost(model.vision_tower)
    return {"visual_tokens": model.num_image_tokens, "encoder_gflops": round(cost.total_flops / 1e9, 4),
            "encoder_flop_ratio": round(cost.flop_ratio, 3), "num_layers": model.vision_tower.num_layers}


def run_compare(preset: ComparePreset, out_dir: str | os.PathLike, *, command: str | None = None,
                log=print) -> dict[str, Any]:
    """The whole experiment; writes results.json, results.md, the plots and command.txt into ``out_dir``."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = prepare(preset, log=log)
    runs = []
    mllm = [s for s in preset.scenarios if s != "readout"]
    for seed in preset.seeds:
        if "readout" in preset.scenarios:
            for name in preset.methods:
                row = run_readout(ctx, name, seed)
                runs.append(row)
                log(f"  readout  {name:18s} seed {seed}: quadrant acc {row['after']['accuracy']:.1f} "
                    f"(before {row['before']['accuracy']:.1f})")
        if not mllm:
            continue
        base_row, base = run_method(ctx, "none", seed, "train")
        log(f"  train    {'none':18s} seed {seed}: acc {base_row['after']['accuracy']:.1f} (the retrofit base)")
        if "train" in preset.scenarios and "none" in preset.methods:
            runs.append(base_row)
        if "retrofit" in preset.scenarios and "none" in preset.methods:
            runs.append({**base_row, "scenario": "retrofit", "before": base_row["after"], "trainable_params": 0,
                         "train_seconds": 0.0, "cached_train_samples_per_s": None, "train_samples_per_s": None})
        for name in preset.methods:
            if name == "none":
                continue
            for scenario in mllm:
                row, _ = run_method(ctx, name, seed, scenario, base=base)
                runs.append(row)
                log(f"  {scenario:8s} {name:18s} seed {seed}: acc {row['after']['accuracy']:.1f}"
                    + (f" (before {row['before']['accuracy']:.1f})" if "before" in row else ""))
    ctx.timings["total_s"] = time.perf_counter() - t_start
    results = {
        "preset": preset.name, "config": asdict(preset), "data_source": ctx.ds.source, "data_dir": str(ctx.ds.root),
        "encoder": {"pretrain_metrics": ctx.encoder_metrics, "config": ctx.encoder.config.to_dict()},
        "timings_s": {k: round(v, 1) for k, v in ctx.timings.items()},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                        "machine": platform.machine()},
        "command": command, "runs": runs, "table": aggregate(runs), "contrasts": contrasts(runs),
    }
    from laco.experiments.report import write_report

    write_report(results, out)
    return results


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std (sample std; 0 for one seed) over seeds per (scenario, method), in run order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["method"]), []).append(r)
    table = []
    for (scenario, method), rs in groups.items():
        acc = [r["after"]["accuracy"] for r in rs]
        before = [r["before"]["accuracy"] for r in rs if "before" in r]
        tasks = sorted({t for r in rs for t in r["after"]["per_task"]})
        med = lambda k: statistics.median([r[k] for r in rs]) if all(r.get(k) is not None for r in rs) else None  # noqa: E731
        curves = [r["curve"] for r in rs if r.get("curve")]
        same_steps = curves and all([c[0] for c in cur] == [c[0] for c in curves[0]] for cur in curves)
        table.append({
            "scenario": scenario, "method": method, "seeds": len(rs),
            "acc_mean": round(statistics.mean(acc), 2), "acc_std": round(statistics.stdev(acc), 2) if len(acc) > 1 else 0.0,
            "acc_min": min(acc), "acc_max": max(acc),
            "before_mean": round(statistics.mean(before), 2) if before else None,
            "before_std": round(statistics.stdev(before), 2) if len(before) > 1 else (0.0 if before else None),
            "per_task": {t: round(statistics.mean([r["after"]["per_task"][t] for r in rs
                                                   if r["after"]["per_task"].get(t) is not None]), 2) for t in tasks},
            "merge_layer": rs[0]["merge_layer"], "num_layers": rs[0]["num_layers"],
            "visual_tokens": rs[0]["visual_tokens"], "encoder_gflops": rs[0]["encoder_gflops"],
            "encoder_flop_ratio": rs[0]["encoder_flop_ratio"], "trainable_params": rs[0]["trainable_params"],
            "train_samples_per_s": med("train_samples_per_s"), "infer_samples_per_s": med("infer_samples_per_s"),
            "curve": [[step, round(statistics.mean(c[i][1] for c in curves), 2)] for i, (step, _) in enumerate(curves[0])]
            if same_steps else None,  # mean over seeds of the stage-2 learning curve
        })
    return table


# the questions the experiment asks, as (A, B): is A better than B, seed for seed?
CONTRASTS = (
    ("laco@1/4", "pixel_shuffle@1/4"),  # does the shortcut matter inside the encoder?
    ("laco@1/4", "laco@post"),  # what does merging early cost, against LaCo after the encoder?
    ("laco@1/4", "pixel_shuffle@post"),  # ... against the usual post-encoder pixel shuffle?
    ("laco@post", "pixel_shuffle@post"),  # does the shortcut matter after the encoder?
)


def contrasts(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired accuracy differences A - B per scenario, over the seeds both ran (a seed shares data order
    and projector init across methods, so pairing removes that part of the seed noise)."""
    acc = {(r["scenario"], canonical_name(r["method"]), r["seed"]): r["after"]["accuracy"] for r in runs}
    spelled = {canonical_name(r["method"]): r["method"] for r in runs}  # older runs spell "ext_laco"
    out = []
    for scenario in SCENARIOS:
        for a, b in CONTRASTS:
            seeds = sorted(s for (sc, m, s) in acc if sc == scenario and m == a and (scenario, b, s) in acc)
            if not seeds:
                continue
            d = [round(acc[(scenario, a, s)] - acc[(scenario, b, s)], 2) for s in seeds]
            a_name, b_name = spelled[a], spelled[b]
            verdict = (f"{a_name} higher on every seed" if min(d) > 0 else f"{b_name} higher on every seed"
                       if max(d) < 0 else "mixed across seeds")
            out.append({"scenario": scenario, "a": a_name, "b": b_name, "seeds": seeds, "diffs": d,
                        "mean": round(statistics.mean(d), 2),
                        "std": round(statistics.stdev(d), 2) if len(d) > 1 else 0.0,
                        "verdict": verdict if len(d) > 1 else "one seed"})
    return out


# -- merging runs -----------------------------------------------------------------------------------
# fields that may differ between parts of one experiment: which seeds a part ran, how it ran them
_PER_PART_FIELDS = ("seeds", "threads", "cache_dir")


def merge_results(dirs: list[str | os.PathLike], *, command: str | None = None) -> dict[str, Any]:
    """One ``results.json`` from runs that differ only in their seeds (e.g. one process or machine per seed).

    Every seed is independent (its retrofit base is its own ``none`` model), so the parts concatenate;
    the table is re-aggregated over all seeds. Refuses parts whose preset, data, encoder or any other
    setting differ, and any (scenario, method, seed) that two parts both ran.
    """
    if len(dirs) < 2:
        raise ValueError(f"merging needs at least two results folders, got {len(dirs)}")
    parts = []
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"no results.json in {d}")
        parts.append((path, json.loads(path.read_text())))

    def same(results: dict[str, Any]) -> dict[str, Any]:
        cfg = {k: v for k, v in results["config"].items() if k not in _PER_PART_FIELDS}
        return {"preset": results["preset"], "config": cfg, "data_source": results["data_source"],
                "encoder": results["encoder"]}

    ref_path, ref = parts[0]
    for path, res in parts[1:]:
        a, b = same(ref), same(res)
        diff = sorted(k for k in a["config"].keys() | b["config"].keys() if a["config"].get(k) != b["config"].get(k))
        diff += [k for k in ("preset", "data_source", "encoder") if a[k] != b[k]]
        if diff:
            raise ValueError(f"cannot merge {path} into {ref_path}: they differ in {', '.join(diff)}")
    runs, seen = [], set()
    for path, res in parts:
        for r in res["runs"]:
            key = (r["scenario"], r["method"], r["seed"])
            if key in seen:
                raise ValueError(f"{path} repeats {key[0]} {key[1]} seed {key[2]}, already in another part")
            seen.add(key)
            runs.append(r)
    seeds = sorted({r["seed"] for r in runs})
    timings: dict[str, float] = {}
    for _, res in parts:  # serial-equivalent work: the parts' wall times summed
        for k, v in res["timings_s"].items():
            timings[k] = round(timings.get(k, 0.0) + v, 1)
    return {
        **ref, "config": {**ref["config"], "seeds": seeds}, "timings_s": timings, "command": command,
        "merged_from": [{"dir": str(Path(d)), "command": res.get("command"), "seeds": res["config"]["seeds"],
                         "timings_s": res["timings_s"], "environment": res["environment"]}
                        for d, (_, res) in zip(dirs, parts)],
        "runs": runs, "table": aggregate(runs), "contrasts": contrasts(runs),
    }
