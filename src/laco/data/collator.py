"""Turn LLaVA samples into model batches: chat template, ``<image>`` expansion, padding, labels.

For one sample (``{"id", "images", "messages"}`` from ``LlavaDataset``):

1. The conversation is rendered with the processor's chat template, turn by turn: the text of each
   assistant turn is ``render(messages[:i+1])`` minus ``render(messages[:i], add_generation_prompt=True)``
   (for ChatML: ``"answer<|im_end|>\\n"``). A template that does not render prefixes consistently is
   a ValueError, not a silently mislabelled sample.
2. The processor tokenises each segment, expanding every ``<image>`` into its image's token count and every
   ``<video>`` into its video's (``LaCoProcessor.image_tokens`` / ``video_tokens``: AnyRes tiles, newlines,
   frames) and preprocessing the images and frames; segments are
   concatenated (chat templates put special tokens at every segment boundary, so this equals
   tokenising the whole text; tested).
3. ``labels`` are the token ids inside assistant turns and ``-100`` everywhere else (system, user,
   template scaffolding, image and video tokens, padding).
4. Longer than ``max_length``: ``on_overflow="truncate"`` cuts tokens from the right with a warning,
   but never inside or before an image's or video's tokens (the counts must match the pixels):
   such a sample, or one left with no assistant token, is dropped with a warning; ``"drop"`` drops
   every overlong sample; ``"raise"`` raises a ValueError naming the sample.

A batch: ``input_ids``, ``attention_mask``, ``labels`` (B, T), right-padded to the longest sample
(optionally to a multiple of ``pad_to_multiple_of``), and ``pixel_values`` (n_images, 3, H, W) in
placeholder order, only when the batch has images; under AnyRes also ``image_sizes`` (n_images, 2) and
``batch_num_images`` (images per sample that has any); with videos ``pixel_values_videos`` (n_videos, T, 3, H, W)
in placeholder order (a list of (T_i, 3, H, W) when the frame counts differ; the model takes both). Samples that are ``None`` (an image that failed
to decode with ``on_bad_record="skip"``) or dropped are counted in ``collator.stats``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

logger = logging.getLogger(__name__)

OVERFLOW_POLICIES = ("truncate", "drop", "raise")
IGNORE_INDEX = -100


@dataclass
class EncodedSample:
    """One tokenised sample. ``input_ids``/``labels``: (T,) long; ``pixel_values``: (n_tiles, 3, H, W) or None;
    ``image_sizes``: (n_images, 2) original (H, W) under AnyRes, else None; ``videos``: one (T, 3, H, W) per video."""

    id: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None
    videos: tuple[torch.Tensor, ...] = ()


@dataclass
class CollatorStats:
    samples: int = 0
    truncated: int = 0
    dropped_overflow: int = 0
    dropped_no_labels: int = 0
    dropped_bad: int = 0  # None samples: bad images reported by the dataset


class LlavaCollator:
    """Collate ``LlavaDataset`` samples for ``LaCoForConditionalGeneration``; see the module docstring.

    Args:
        processor: a ``LaCoProcessor`` (``tokenizer``, ``image_processor``, ``image_token``,
            ``num_image_tokens``, chat template).
        max_length: maximum tokens per sample, image tokens included.
        on_overflow: ``"truncate"`` | ``"drop"`` | ``"raise"``.
        pad_to_multiple_of: pad the batch length up to a multiple of this (e.g. 8 for tensor cores).
    """

    def __init__(
        self,
        processor,
        max_length: int = 2048,
        *,
        on_overflow: Literal["truncate", "drop", "raise"] = "truncate",
        pad_to_multiple_of: int | None = None,
    ):
        if on_overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"on_overflow must be one of {OVERFLOW_POLICIES}, got {on_overflow!r}")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.on_overflow = on_overflow
        self.pad_to_multiple_of = pad_to_multiple_of
        self.image_token: str = processor.image_token
        self.num_image_tokens: int = int(processor.num_image_tokens)
        self.image_token_id: int = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no token for the image placeholder {self.image_token!r}")
        self.video_token: str | None = getattr(processor, "video_token", None)
        video_id = getattr(processor, "video_token_id", None)
        self.media_token_ids = [self.image_token_id] + ([video_id] if video_id is not None else [])
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before training")
        self.chat_template = getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not self.chat_template:
            raise ValueError("neither the processor nor its tokenizer has a chat template")
        self.stats = CollatorStats()

    # -- text -----------------------------------------------------------------------------------
    def _render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def segments(self, messages: Sequence[dict]) -> list[tuple[str, bool]]:
        """Split the rendered conversation into ``(text, is_assistant)`` pieces whose concatenation is the whole."""
        pieces: list[tuple[str, bool]] = []
        done = ""  # rendered text covered by ``pieces``
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], add_generation_prompt=True)
            full = self._render(messages[: i + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError(
                    "the chat template does not render conversation prefixes consistently, so assistant turns "
                    f"cannot be located for the labels (turn {i}: {prompt[-40:]!r} / {full[-40:]!r})"
                )
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        rest = self._render(messages)
        if not rest.startswith(done):
            raise ValueError("the chat template renders the whole conversation differently from its prefixes")
        if rest[len(done):]:
            pieces.append((rest[len(done):], False))
        return [(t, a) for t, a in pieces if t]

    def encode(self, sample: dict) -> EncodedSample | None:
        """Tokenise one sample (no padding); ``None`` if it is dropped (see ``on_overflow``).

        Each segment goes through the processor, which expands its ``<image>`` placeholders (by the tile
        count of each image under AnyRes) and preprocesses its images, checking the counts.
        """
        images = list(sample.get("images") or [])
        videos = list(sample.get("videos") or [])
        ids: list[int] = []
        labels: list[int] = []
        pixels: list[torch.Tensor] = []
        sizes: list[torch.Tensor] = []
        clips: list[torch.Tensor] = []
        used = v_used = 0
        for text, is_assistant in self.segments(sample["messages"]):
            n = text.count(self.image_token)
            m = text.count(self.video_token) if self.video_token else 0
            try:
                # the sample's image count (not the segment's) decides AnyRes tiling: OneVision tiles lone images only
                enc = self.processor(text=[text], images=images[used : used + n] or None,
                                     videos=videos[v_used : v_used + m] or None, return_tensors=None, padding=False,
                                     add_special_tokens=False, multi_image=len(images) > 1)
            except ValueError as err:
                raise ValueError(f"sample {sample.get('id')!r}: {err}") from None
            used, v_used = used + n, v_used + m
            tok = list(enc["input_ids"][0])
            ids += tok
            labels += tok if is_assistant else [IGNORE_INDEX] * len(tok)
            if n:
                pixels.append(torch.as_tensor(enc["pixel_values"]))
                if "image_sizes" in enc:
                    sizes.append(torch.as_tensor(enc["image_sizes"]))
            if m:
                clips += list(torch.as_tensor(enc["pixel_values_videos"]))  # m x (T, 3, H, W)
        for token, n_used, items, what in ((self.image_token, used, images, "image"),
                                           (self.video_token or "<video>", v_used, videos, "video")):
            if n_used != len(items):
                raise ValueError(f"sample {sample.get('id')!r}: {n_used} {token!r} placeholder(s) but "
                                 f"{len(items)} {what}(s)" + ("" if self.video_token or what == "image" else
                                                              " (the model takes no video)"))
        input_ids = torch.tensor(ids, dtype=torch.long)
        label_t = torch.tensor(labels, dtype=torch.long)
        is_media = torch.isin(input_ids, torch.tensor(self.media_token_ids))  # image and video token positions
        label_t[is_media] = IGNORE_INDEX
        pixel_values = torch.cat(pixels) if pixels else None
        enc = EncodedSample(str(sample.get("id")), input_ids, label_t, pixel_values, torch.cat(sizes) if sizes else None,
                            tuple(clips))
        if len(input_ids) > self.max_length:
            enc = self._overflow(enc, is_media)
        if enc is not None and not bool((enc.labels[1:] != IGNORE_INDEX).any()):
            logger.warning("dropping sample %r: no assistant token left to train on", enc.id)
            self.stats.dropped_no_labels += 1
            return None
        return enc

    def _overflow(self, enc: EncodedSample, is_media: torch.Tensor) -> EncodedSample | None:
        n = len(enc.input_ids)
        where = f"sample {enc.id!r} has {n} tokens > max_length {self.max_length}"
        if self.on_overflow == "raise":
            raise ValueError(f"{where} (on_overflow='raise')")
        last_image_end = int(is_media.nonzero().max()) + 1 if bool(is_media.any()) else 0
        if self.on_overflow == "drop" or last_image_end > self.max_length:
            why = "" if self.on_overflow == "drop" else \
                f"; truncation would cut image tokens (or video tokens; they end at {last_image_end})"
            logger.warning("dropping %s%s", where, why)
            self.stats.dropped_overflow += 1
            return None
        logger.warning("truncating %s", where)
        self.stats.truncated += 1
        m = self.max_length
        return EncodedSample(enc.id, enc.input_ids[:m], enc.labels[:m], enc.pixel_values, enc.image_sizes, enc.videos)

    # -- batch ----------------------------------------------------------------------------------
    def __call__(self, samples: Sequence[dict | None]) -> dict[str, Any]:
        encoded = []
        for s in samples:
            if s is None:
                self.stats.dropped_bad += 1
                continue
            enc = self.encode(s)
            if enc is not None:
                encoded.append(enc)
        self.stats.samples += len(encoded)
        batch = self.pad(encoded)
        batch["num_requested"] = len(samples)  # kept + dropped: the trainer reports and limits drops
        return batch

    def pad(self, encoded: Sequence[EncodedSample]) -> dict[str, Any]:
        """Right-pad encoded samples into a batch; see the module docstring."""
        length = max((len(e.input_ids) for e in encoded), default=0)
        if self.pad_to_multiple_of and length % self.pad_to_multiple_of:
            length += self.pad_to_multiple_of - length % self.pad_to_multiple_of
        b = len(encoded)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            input_ids[i, :n] = e.input_ids
            attention_mask[i, :n] = 1
            labels[i, :n] = e.labels
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pixels = [e.pixel_values for e in encoded if e.pixel_values is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)  # (n_images_total, 3, H, W), placeholder order
        sizes = [e.image_sizes for e in encoded if e.image_sizes is not None]
        if sizes:  # AnyRes: original sizes, and images per sample (a sample with several is not tiled)
            batch["image_sizes"] = torch.cat(sizes)  # (n_images_total, 2)
            batch["batch_num_images"] = torch.tensor([len(s) for s in sizes], dtype=torch.long)
        clips = [c for e in encoded for c in e.videos]
        if clips:  # placeholder order; stacked when every video has as many frames
            batch["pixel_values_videos"] = torch.stack(clips) if len({c.shape for c in clips}) == 1 else clips
        return batch
