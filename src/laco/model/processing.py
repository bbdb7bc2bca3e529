"""``LaCoProcessor``: images + text -> ``input_ids``, ``attention_mask``, ``pixel_values`` for a LaCo MLLM.

Every ``<image>`` placeholder in the text becomes ``num_tiles * num_image_tokens`` image tokens, where
``num_image_tokens`` is the model's compressed token count per image/tile (from the compression config:
``LaCoProcessor.from_model_config``, never hard-coded) and ``num_tiles`` is 1 unless AnyRes is on.

Image preprocessing uses ``SiglipImageProcessorPil`` (PIL + numpy, no torchvision): resize to the square
input size (no crop, as LLaVA-OneVision), rescale to [0, 1], normalise with the encoder family's mean/std.

**AnyRes multi-crop** (``anyres_grids=[[rows, cols], ...]``): each image picks the tile layout that keeps
the most of its resolution (then wastes the least canvas, as LLaVA-NeXT's ``select_best_resolution``),
is resized to fit a ``rows*S x cols*S`` canvas with its aspect ratio kept, padded with the mean colour,
and cut into ``rows*cols`` tiles of ``S x S``. Token layout of one image, each block ``num_image_tokens``
long and compressed separately by the vision tower::

    [tile (0,0)] [tile (0,1)] ... [tile (rows-1, cols-1)] [global thumbnail: the whole image at S x S]

A ``(1, 1)`` layout is just the thumbnail (one block). ``pixel_values`` holds the tiles in exactly this
order, image after image, so the model scatters them without knowing about tiles.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin, SiglipImageProcessorPil

_MEAN_STD = {  # (mean, std) per vision family
    "siglip_vision_model": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "clip_vision_model": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    "dinov2": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    "dinov2_with_registers": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}


def make_image_processor(image_size: int, vision_model_type: str = "siglip_vision_model") -> SiglipImageProcessorPil:
    """Resize to ``image_size`` square, rescale, normalise with the family's statistics (torchvision-free)."""
    mean, std = _MEAN_STD.get(vision_model_type, _MEAN_STD["siglip_vision_model"])
    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=mean, image_std=std)


def select_tile_grid(image_hw: tuple[int, int], grids: Sequence[Sequence[int]], tile: int) -> tuple[int, int]:
    """The (rows, cols) in ``grids`` keeping the most image resolution, ties broken by the least wasted canvas."""
    h, w = image_hw
    best, best_key = None, None
    for rows, cols in grids:
        scale = min(rows * tile / h, cols * tile / w)
        effective = min(int(h * scale) * int(w * scale), h * w)
        waste = rows * cols * tile * tile - effective
        key = (effective, -waste)
        if best_key is None or key > best_key:
            best, best_key = (int(rows), int(cols)), key
    return best


def _to_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255 if arr.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    raise TypeError(f"images must be PIL images or HxWx3 numpy arrays, got {type(image).__name__}")


def split_anyres(image, grid: tuple[int, int], tile: int, fill: Sequence[float]) -> list:
    """Cut ``image`` into ``rows*cols`` S x S tiles (raster order) of an aspect-preserving padded canvas."""
    from PIL import Image

    rows, cols = grid
    w, h = image.size
    scale = min(rows * tile / h, cols * tile / w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    colour = tuple(int(round(255 * m)) for m in fill)
    canvas = Image.new("RGB", (cols * tile, rows * tile), colour)
    canvas.paste(image.resize((new_w, new_h), Image.BICUBIC), ((cols * tile - new_w) // 2, (rows * tile - new_h) // 2))
    return [canvas.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]


class LaCoProcessor(ProcessorMixin):
    """Image processor + tokenizer + chat template; expands ``<image>`` to the model's image-token count."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int | None = None,
        image_token: str = "<image>",
        anyres_grids: list[list[int]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ):
        if not isinstance(num_image_tokens, int) or isinstance(num_image_tokens, bool) or num_image_tokens < 1:
            raise ValueError(
                f"num_image_tokens must be a positive int (use LaCoProcessor.from_model_config), got {num_image_tokens!r}"
            )
        if image_token not in tokenizer.get_vocab():
            raise ValueError(f"image token {image_token!r} is not in the tokenizer's vocabulary")
        if anyres_grids is not None:
            anyres_grids = [[int(r), int(c)] for r, c in anyres_grids]
            if not anyres_grids or any(r < 1 or c < 1 for r, c in anyres_grids):
                raise ValueError(f"anyres_grids must be a non-empty list of [rows, cols] >= 1, got {anyres_grids!r}")
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.anyres_grids = anyres_grids
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_model_config(
        cls, config, tokenizer, image_processor=None, anyres_grids: list[list[int]] | None = None
    ) -> "LaCoProcessor":
        """A processor matching ``config`` (a ``LaCoConfig``): token count, image size, image token (checked)."""
        token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        if token_id != config.image_token_id:
            raise ValueError(
                f"tokenizer id of {config.image_token!r} is {token_id}, but the model's image_token_id is "
                f"{config.image_token_id}: tokenizer and model do not belong together"
            )
        if image_processor is None:
            image_processor = make_image_processor(config.image_size, config.vision_config.model_type)
        return cls(image_processor, tokenizer, num_image_tokens=config.num_image_tokens,
                   image_token=config.image_token, anyres_grids=anyres_grids)

    @property
    def tile_size(self) -> int:
        return int(self.image_processor.size["height"])

    # -- images -----------------------------------------------------------------------------------
    def _tiles(self, image) -> list:
        """One image -> its tiles in token-layout order (tiles in raster order, then the thumbnail)."""
        image = _to_pil(image)
        if self.anyres_grids is None:
            return [image]
        grid = select_tile_grid((image.height, image.width), self.anyres_grids, self.tile_size)
        if grid == (1, 1):
            return [image]
        return [*split_anyres(image, grid, self.tile_size, self.image_processor.image_mean), image]

    def preprocess_images(self, images: Sequence) -> tuple[torch.Tensor, list[int]]:
        """Images -> (pixel_values (total_tiles, 3, S, S), tiles per image)."""
        tiles, counts = [], []
        for image in images:
            t = self._tiles(image)
            tiles += t
            counts.append(len(t))
        pixel_values = self.image_processor(images=tiles, return_tensors="pt")["pixel_values"]
        return pixel_values, counts

    # -- text + images ----------------------------------------------------------------------------
    def __call__(
        self,
        text: str | list[str] | None = None,
        images=None,
        return_tensors: str | None = "pt",
        padding: bool | str = "longest",
        **tokenizer_kwargs: Any,
    ) -> BatchFeature:
        """``text`` (one string or a batch) with ``<image>`` placeholders, and ``images`` in placeholder order:
        a flat list for the whole batch, or one list per sample. Returns input_ids, attention_mask, pixel_values.
        """
        if text is None:
            raise ValueError("LaCoProcessor needs text (with one <image> placeholder per image)")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        per_sample = [t.count(self.image_token) for t in texts]
        flat = self._flatten_images(images, per_sample)
        expanded, expected = list(texts), 0
        data: dict[str, Any] = {}
        if flat:
            pixel_values, tiles = self.preprocess_images(flat)
            data["pixel_values"] = pixel_values
            it = iter(tiles)
            expanded = []
            for t in texts:
                parts = t.split(self.image_token)
                out = parts[0]
                for part in parts[1:]:
                    n = next(it) * self.num_image_tokens
                    expected += n
                    out += self.image_token * n + part
                expanded.append(out)
        enc = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, **tokenizer_kwargs)
        found = int((torch.as_tensor(enc["input_ids"]) == self.image_token_id).sum()) if return_tensors == "pt" else \
            sum(row.count(self.image_token_id) for row in enc["input_ids"])
        if found != expected:
            raise ValueError(
                f"after tokenization there are {found} image tokens but {expected} were expected "
                f"(truncation cut into an image, or the text contains the image token id by other means)"
            )
        data.update(enc)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _flatten_images(self, images, per_sample: list[int]) -> list:
        n_text = sum(per_sample)
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if images and all(isinstance(x, (list, tuple)) for x in images):  # one list per sample
            if len(images) != len(per_sample):
                raise ValueError(f"got image lists for {len(images)} samples but {len(per_sample)} texts")
            for i, (imgs, n) in enumerate(zip(images, per_sample)):
                if len(imgs) != n:
                    raise ValueError(f"sample {i}: {n} {self.image_token} placeholder(s) but {len(imgs)} image(s)")
            return [img for imgs in images for img in imgs]
        if len(images) != n_text:
            raise ValueError(
                f"{n_text} {self.image_token} placeholder(s) in the text (per sample: {per_sample}) "
                f"but {len(images)} image(s)"
            )
        return list(images)

    def apply_chat_template(self, conversation, **kwargs):
        """The chat template (ChatML) applied to ``conversation`` -> text; image items render as ``<image>``."""
        if kwargs.pop("tokenize", False):
            raise ValueError("apply_chat_template returns text here: tokenize it with processor(text=..., images=...), "
                             "which expands each <image> to the model's image-token count")
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, tokenize=False, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]
