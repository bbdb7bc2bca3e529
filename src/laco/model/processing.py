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

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin, SiglipImageProcessorPil
from transformers.processing_utils import MultiModalData

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


def load_image_processor(path: str | os.PathLike):
    """``AutoImageProcessor.from_pretrained(path)``; where that needs torchvision (transformers < 5.24 loads the
    torchvision class for a saved ``...ImageProcessor``), the same processor's PIL class (``...ImageProcessorPil``)."""
    import json

    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(path)
    except ImportError:
        kind = json.loads((Path(path) / "preprocessor_config.json").read_text()).get("image_processor_type", "")
        pil = getattr(transformers, f"{kind.removesuffix('Pil')}Pil", None)
        if pil is None:
            raise
        return pil.from_pretrained(path)


def output_size(image_processor) -> int:
    """Side of the square an image processor outputs: its crop size if it centre-crops, else its resize."""
    if getattr(image_processor, "do_center_crop", False):
        return int(image_processor.crop_size["height"])
    return int(image_processor.size["height"])


def set_image_size(image_processor, size: int) -> None:
    """Make ``image_processor`` output ``size`` x ``size``, keeping its kind of resize (and crop) and statistics."""
    if output_size_or_none(image_processor) == size:
        return
    if getattr(image_processor, "do_center_crop", False):  # CLIP-style: shortest edge, then a centre crop
        image_processor.size = {"shortest_edge": size}
        image_processor.crop_size = {"height": size, "width": size}
    else:
        image_processor.size = {"height": size, "width": size}


def output_size_or_none(image_processor) -> int | None:
    try:
        return output_size(image_processor)
    except (KeyError, TypeError):  # e.g. size given as shortest_edge without a crop
        return None


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
        if image_processor is None:  # a config built in code: the encoder family's statistics
            image_processor = make_image_processor(config.image_size, config.vision_config.model_type)
        else:  # the encoder's own (a folder, e.g. from_parts' vision_dir, or an object): only the size is set
            if isinstance(image_processor, (str, os.PathLike)):
                image_processor = load_image_processor(image_processor)
            set_image_size(image_processor, config.image_size)
        return cls(image_processor, tokenizer, num_image_tokens=config.num_image_tokens,
                   image_token=config.image_token, anyres_grids=anyres_grids)

    @property
    def tile_size(self) -> int:
        """Side of the square the image processor outputs (its crop when it centre-crops)."""
        return output_size(self.image_processor)

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

    # -- text + images: transformers' ProcessorMixin.__call__ with the standard multimodal hooks ---------
    def __call__(self, images=None, text=None, **kwargs: Any) -> BatchFeature:
        """``text`` (one string or a batch) with ``<image>`` placeholders, and ``images`` in placeholder order:
        a flat list for the whole batch, or one list per sample. Returns input_ids, attention_mask, pixel_values.

        Defaults: ``return_tensors="pt"``, ``padding="longest"``. The rest is ``ProcessorMixin.__call__``:
        ``_process_images`` preprocesses and ``replace_image_token`` expands each placeholder, so the chat
        template (``apply_chat_template(..., tokenize=True)``) and vLLM drive this processor as any other.
        """
        if text is None:
            raise ValueError("LaCoProcessor needs text (with one <image> placeholder per image)")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        flat = self._flatten_images(images, [t.count(self.image_token) for t in texts])
        kwargs.setdefault("return_tensors", "pt")
        kwargs.setdefault("padding", "longest")
        return super().__call__(images=flat or None, text=texts, **kwargs)

    def _process_images(self, images, **kwargs):
        """Images -> ({"pixel_values": (total_tiles, 3, S, S)}, one placeholder replacement per image)."""
        pixel_values, tiles = self.preprocess_images(list(images))
        processed = {"pixel_values": pixel_values, "num_tiles": tiles}
        replacements = [self.replace_image_token(processed, image_idx=i) for i in range(len(tiles))]
        return {"pixel_values": pixel_values}, replacements

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """The placeholder of image ``image_idx`` expanded to ``num_tiles x num_image_tokens`` image tokens."""
        tiles = image_inputs.get("num_tiles")
        return self.image_token * (self.num_image_tokens * (tiles[image_idx] if tiles is not None else 1))

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs: Any) -> MultiModalData:
        """Image tokens (and tiles) per image of the given ``(height, width)`` sizes, before any pixel work
        (the hook vLLM and transformers use to size placeholders)."""
        data: dict[str, list[int]] = {}
        if image_sizes is not None:
            tiles = [self._num_tiles(tuple(hw)) for hw in image_sizes]
            data = {"num_image_tokens": [t * self.num_image_tokens for t in tiles], "num_image_patches": tiles}
        return MultiModalData(**data)

    def _num_tiles(self, image_hw: tuple[int, int]) -> int:
        """Tiles of an image of size (h, w): 1, or rows x cols + the thumbnail (see ``_tiles``)."""
        if self.anyres_grids is None:
            return 1
        rows, cols = select_tile_grid(image_hw, self.anyres_grids, self.tile_size)
        return 1 if (rows, cols) == (1, 1) else rows * cols + 1

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

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]
