"""``laco compare``'s model pieces: building the MLLM of one method, the forward from cached encoder
states, training steps (``laco.train.optim``) and one-pass exact-match evaluation."""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from laco.compressors.spec import MethodSpec
from laco.experiments.compare.presets import ComparePreset, LLMConfig
from laco.experiments.compare.parallel import progress_enabled
from laco.experiments.compare.text import TokenizedSplit
from laco.experiments.pretrain import to_pixel_values
from laco.train.optim import build_optimizer, build_scheduler, optimizer_step

def derive_seed(seed: int, role: str) -> int:
    """An independent random stream per (replicate seed, role): "llm", "projector", "compressor", "stage1", ...

    Each role draws from its own stream, so adding a method, a scenario or a module never shifts another's
    draws: e.g. the projector of a seed starts from the same weights whatever compressor is built first."""
    return int.from_bytes(hashlib.sha256(f"laco-compare:{seed}:{role}".encode()).digest()[:4], "little")


# -- model building ---------------------------------------------------------------------------------
def llm_config(cfg: LLMConfig, tok):
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads, vocab_size=len(tok),
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
    )


def build_model(spec: MethodSpec, preset: ComparePreset, encoder, llm, tok, seed: int, *, load_weights: bool = True):
    """A ``LaCoForConditionalGeneration`` with the pretrained encoder and LLM weights, a compressor drawn from
    the seed's "compressor" stream and a projector from its "projector" stream: for one seed, every method
    starts from the same projector weights (the projector does not depend on the compressor: C -> D)."""
    from laco.model import LaCoConfig, LaCoForConditionalGeneration

    config = LaCoConfig(
        vision_config=encoder.config.to_dict(), text_config=llm.config.to_dict(),
        compression={**spec.compression, "ratio": preset.ratio}, projector_type=preset.projector_type,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "compressor"))
        model = LaCoForConditionalGeneration(config)
        if load_weights:
            torch.manual_seed(derive_seed(seed, "projector"))
            model.projector.apply(model._init_weights)
    if load_weights:
        model.vision_tower.vision_model.load_state_dict(encoder.state_dict())
        model.get_decoder().load_state_dict(llm.base_model.state_dict())  # the causal LM = decoder + lm_head
        model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
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
    out = model(inputs_embeds=emb, attention_mask=mask, labels=labels)
    return out.logits, out.loss


@torch.no_grad()
def cache_hidden_states(encoder, images: np.ndarray | Sequence, layers: list[int], batch_size: int = 256,
                        dtype: torch.dtype = torch.float32, desc: str = "caching",
                        to_pixels: Callable[[Any], torch.Tensor] = to_pixel_values) -> dict[int, torch.Tensor]:
    """Uncompressed encoder states after each of ``layers`` (0 = embeddings) for all ``images``: {k: (N, P+HW, C)}.

    ``images``: (N, H, W, 3) uint8 scenes, or any sequence that ``to_pixels`` turns, a slice at a time, into
    (n, 3, S, S) pixel values (user data: image files through the encoder's image processor)."""
    from tqdm.auto import tqdm

    from laco.encoders import compress_encoder

    tower = compress_encoder(encoder, "none").eval()
    out = {k: [] for k in layers}
    for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
        states = tower(to_pixels(images[i:i + batch_size]), output_hidden_states=True).hidden_states
        for k in layers:
            out[k].append(states[k].to(dtype))
    return {k: torch.cat(v) for k, v in out.items()}


# -- training and evaluation ------------------------------------------------------------------------
def train_steps(model, params: list[nn.Parameter] | list[dict], hidden: torch.Tensor | None, start: int,
                data: TokenizedSplit, steps: int, lr: float, preset: ComparePreset, seed: int, desc: str,
                on_step: Callable[[int], None] | None = None) -> float | None:
    """AdamW + warmup/cosine for ``steps`` batches drawn by ``seed``, from cached encoder states after ``start``
    layers; ``hidden`` None: ``model`` is a causal LM trained on text only. ``params``: tensors, or param groups
    with their own learning rates (``laco.train.optim.param_groups``). ``on_step(n)`` runs after step n.
    Returns the last step's loss (None when nothing trained)."""
    from tqdm.auto import tqdm

    flat = [q for g in params for q in (g["params"] if isinstance(g, dict) else [g])]
    if steps <= 0 or not flat:
        return None
    model.train()
    opt = build_optimizer(params, lr=lr, weight_decay=preset.weight_decay)
    sched = build_scheduler(opt, steps, warmup_steps=max(1, int(preset.warmup_fraction * steps)))
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not progress_enabled())
    for step in bar:
        idx = torch.randint(0, len(data), (preset.batch_size,), generator=gen)
        ids, mask, labels = data.batch(idx)
        if hidden is None:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            feats = image_features_from_hidden(model, hidden[data.image_index[idx]].float(), start)
            _, loss = lm_logits_and_loss(model, feats, ids, mask, labels)
        optimizer_step(loss, opt, sched, clip_params=flat)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_step is not None:
            on_step(step + 1)
            model.train()
    model.eval()
    return round(loss.item(), 5)


@torch.no_grad()
def _exact_match(logits_of: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], data: TokenizedSplit,
                 batch_size: int, limit: int | None) -> dict[str, Any]:
    """Greedy exact-match accuracy (%) overall, per task and per turn, in one teacher-forced pass per batch:
    greedy decoding gives the reference iff every answer position's argmax is the reference token.
    ``logits_of(idx, ids, mask)`` -> (B, L, V) logits of the rows ``idx``."""
    n = len(data) if limit is None else min(limit, len(data))
    correct = torch.zeros(n, dtype=torch.bool)
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(n, i + batch_size))
        ids, mask, labels = data.batch(idx)
        pred, target = logits_of(idx, ids, mask)[:, :-1].argmax(-1), labels[:, 1:]  # position t predicts t+1
        correct[idx] = ((pred == target) | (target == -100)).all(1)
    return summarize(correct, data.task[:n], data.turn[:n])


def evaluate_cached(model, hidden: torch.Tensor, start: int, data: TokenizedSplit, batch_size: int,
                    limit: int | None = None) -> dict[str, Any]:
    """The MLLM's greedy exact-match accuracy from cached encoder states after ``start`` layers."""
    model.eval()

    def logits_of(idx, ids, mask):
        feats = image_features_from_hidden(model, hidden[data.image_index[idx]].float(), start)
        return lm_logits_and_loss(model, feats, ids, mask, None)[0]

    return _exact_match(logits_of, data, batch_size, limit)


def evaluate_text_only(llm, data: TokenizedSplit, batch_size: int, limit: int | None = None) -> dict[str, Any]:
    """A causal LM's greedy exact-match accuracy on the questions without their image (``data``: 0 image tokens)."""
    llm.eval()
    return _exact_match(lambda idx, ids, mask: llm(input_ids=ids, attention_mask=mask).logits, data, batch_size, limit)


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
