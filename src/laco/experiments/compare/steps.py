"""``laco compare``'s model pieces: building the MLLM of one method, the forward from cached encoder
states, training steps (``laco.train.optim``), one-pass exact-match evaluation and throughput."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from laco.compressors.spec import MethodSpec
from laco.experiments.compare.presets import ComparePreset, LLMConfig
from laco.experiments.compare.text import TokenizedSplit
from laco.experiments.pretrain import to_pixel_values
from laco.train.optim import build_optimizer, build_scheduler, optimizer_step

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
        optimizer_step(loss, opt, sched, clip_params=params)
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
