"""``LaCoProcessor``: images, videos + text -> model inputs for a LaCo MLLM.

Every ``<image>`` placeholder becomes exactly as many image tokens as the model produces for that image,
and every ``<video>`` as many video tokens as it produces for that video (``laco.model.anyres``: one
arithmetic for the model and the processor). A mismatch after tokenization is a ValueError before any
forward.

* **No pinpoints** (``image_grid_pinpoints=None``): an image is resized to the square input size
  (``SiglipImageProcessorPil``: PIL + numpy, no torchvision) and gives ``num_image_tokens`` tokens
  (+1 with ``image_newline``).
* **LLaVA-OneVision AnyRes** (pinpoints): images are preprocessed by Hugging Face's
  ``LlavaOnevisionImageProcessorPil`` (base image first, then the tiles of the best-fit pinpoint) and the
  count is ``ImageLayout.num_tokens`` (base grid + unpadded grid + one newline per row, after
  ``anyres_max_N``). As in OneVision, images of a multi-image prompt are not tiled (base image + newline).
  Outputs: ``pixel_values`` (n_inputs, 3, S, S) (base image and tiles of each image in turn),
  ``image_sizes`` (n_images, 2), ``batch_num_images`` (images per sample that has images).
* **Video** (``videos=``: a list of frames or a ``(T, H, W, 3)`` array per ``<video>``): every frame is
  resized to S x S; ``<video>`` becomes ``T * tokens_per_frame + 1`` tokens; ``pixel_values_videos``
  (n_videos, T, 3, S, S).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import math

import numpy as np
import torch
from transformers import BatchFeature, LlavaOnevisionImageProcessorPil, ProcessorMixin, SiglipImageProcessorPil
from transformers.processing_utils import MultiModalData

from laco.model import anyres

_MEAN_STD = {  # (mean, std) per vision family
    "siglip_vision_model": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "clip_vision_model": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    "dinov2": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    "dinov2_with_registers": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}


def make_image_processor(image_size: int, vision_model_type: str = "siglip_vision_model", *, pinpoints=None,
                         mean=None, std=None):
    """The torchvision-free image processor: with ``pinpoints`` LLaVA-OneVision's AnyRes one (base image, then
    tiles), else a plain resize to ``image_size`` square; rescale, normalise (default: the family's statistics)."""
    fam_mean, fam_std = _MEAN_STD.get(vision_model_type, _MEAN_STD["siglip_vision_model"])
    kw = dict(size={"height": image_size, "width": image_size}, image_mean=list(mean or fam_mean),
              image_std=list(std or fam_std))
    if pinpoints:
        return LlavaOnevisionImageProcessorPil(image_grid_pinpoints=[list(p) for p in pinpoints], **kw)
    return SiglipImageProcessorPil(**kw)


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


class LaCoProcessor(ProcessorMixin):
    """Image processor + tokenizer + chat template; expands ``<image>`` / ``<video>`` to the model's token counts.

    Args (all from the model config, see ``from_model_config``): ``num_image_tokens`` per base image / tile;
    ``image_grid_pinpoints``, ``vision_aspect_ratio``, ``image_newline`` (OneVision's layout);
    ``video_token``, ``video_pooling`` (2x2 bilinear frame pooling).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int | None = None,
        image_token: str = "<image>",
        image_grid_pinpoints: list[list[int]] | None = None,
        vision_aspect_ratio: str = anyres.DEFAULT_VISION_ASPECT_RATIO,
        image_newline: bool = False,
        video_token: str | None = None,
        video_pooling: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ):
        if not isinstance(num_image_tokens, int) or isinstance(num_image_tokens, bool) or num_image_tokens < 1:
            raise ValueError(
                f"num_image_tokens must be a positive int (use LaCoProcessor.from_model_config), got {num_image_tokens!r}"
            )
        for name, token in (("image", image_token), ("video", video_token)):
            if token is not None and token not in tokenizer.get_vocab():
                raise ValueError(f"{name} token {token!r} is not in the tokenizer's vocabulary")
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.video_token = video_token
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token) if video_token is not None else None
        self.max_tiles = anyres.parse_max_tiles(vision_aspect_ratio)
        self.vision_aspect_ratio = vision_aspect_ratio
        self.image_newline = bool(image_newline)
        self.video_pooling = bool(video_pooling)
        self.image_grid_pinpoints = None
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        if image_grid_pinpoints is not None:
            self.image_grid_pinpoints = anyres.check_pinpoints(image_grid_pinpoints, self.tile_size)
        if self.image_grid_pinpoints or self.image_newline or video_token is not None:
            g = math.isqrt(num_image_tokens)
            if g * g != num_image_tokens:
                raise ValueError(f"AnyRes / image_newline / video need a square token grid per tile, but "
                                 f"num_image_tokens is {num_image_tokens}")

    @classmethod
    def from_model_config(cls, config, tokenizer, image_processor=None) -> "LaCoProcessor":
        """A processor matching ``config`` (a ``LaCoConfig``): token counts, layout, image size, tokens (checked)."""
        for what in ("image", "video"):
            token, token_id = getattr(config, f"{what}_token"), getattr(config, f"{what}_token_id")
            if what == "video" and token_id is None:
                continue
            got = tokenizer.convert_tokens_to_ids(token)
            if got != token_id:
                raise ValueError(
                    f"tokenizer id of {token!r} is {got}, but the model's {what}_token_id is "
                    f"{token_id}: tokenizer and model do not belong together"
                )
        if image_processor is None:  # a config built in code: the encoder family's statistics
            image_processor = make_image_processor(config.image_size, config.vision_config.model_type,
                                                   pinpoints=config.image_grid_pinpoints)
        else:  # the encoder's own (a folder, e.g. from_parts' vision_dir, or an object): only the size is set
            if isinstance(image_processor, (str, os.PathLike)):
                image_processor = load_image_processor(image_processor)
            set_image_size(image_processor, config.image_size)
        return cls(image_processor, tokenizer, num_image_tokens=config.num_image_tokens, image_token=config.image_token,
                   image_grid_pinpoints=config.image_grid_pinpoints, vision_aspect_ratio=config.vision_aspect_ratio,
                   image_newline=config.use_image_newline,
                   video_token=config.video_token if config.video_token_id is not None else None,
                   video_pooling=config.video_pooling)

    def save_pretrained(self, save_directory, *args: Any, remote_code: bool = False, **kwargs: Any):
        """``ProcessorMixin.save_pretrained``; ``remote_code=True`` adds the code and ``auto_map`` (see the model's)."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if remote_code:
            from laco.model.remote import add_remote_code

            add_remote_code(save_directory)
        return out

    @property
    def tile_size(self) -> int:
        """Side of the square the image processor outputs (its crop when it centre-crops)."""
        return output_size(self.image_processor)

    # -- token counts -------------------------------------------------------------------------------
    def image_layout(self, image_size: tuple[int, int], tiled: bool = True) -> anyres.ImageLayout:
        g = math.isqrt(self.num_image_tokens)
        return anyres.image_layout(image_size, tile_grid_size=(g, g), pinpoints=self.image_grid_pinpoints,
                                   tile_size=self.tile_size, max_tiles=self.max_tiles, newline=self.image_newline,
                                   tiled=tiled)

    def image_tokens(self, image_size: tuple[int, int], tiled: bool = True) -> int:
        """LLM tokens of one image of ``image_size`` (H, W); ``tiled=False``: in a multi-image prompt."""
        if not (self.image_grid_pinpoints or self.image_newline):
            return self.num_image_tokens  # may include prefix tokens (strategy "full")
        return self.image_layout(image_size, tiled).num_tokens

    def video_tokens(self, num_frames: int) -> int:
        """LLM tokens of a video of ``num_frames`` frames (frames x tokens per frame, + one newline)."""
        g = math.isqrt(self.num_image_tokens)
        return anyres.video_tokens(num_frames, (g, g), pool=self.video_pooling, newline=self.image_newline)

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> MultiModalData:
        """Hugging Face's hook (vLLM, chat templates): tokens per image (H, W) and per video (T, H, W)."""
        data: dict[str, list[int]] = {}
        if image_sizes is not None:
            data["num_image_tokens"] = [self.image_tokens(tuple(s)) for s in image_sizes]
            data["num_image_patches"] = [self.image_layout(tuple(s)).num_inputs if self.image_grid_pinpoints else 1
                                         for s in image_sizes]
        if video_sizes is not None:
            data["num_video_tokens"] = [self.video_tokens(int(v[0])) for v in video_sizes]
        return MultiModalData(**data)

    # -- images and videos ----------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence, tiled: Sequence[bool]) -> dict[str, torch.Tensor]:
        """Images -> ``pixel_values`` (n_inputs, 3, S, S) and, with pinpoints, ``image_sizes`` (n, 2) (H, W)."""
        pil = [_to_pil(im) for im in images]
        if not self.image_grid_pinpoints:
            return {"pixel_values": torch.as_tensor(self.image_processor(images=pil, return_tensors="np")["pixel_values"])}
        pixels = []
        for im, t in zip(pil, tiled):
            # OneVision tiles an image only when it is alone in its sample: a 2-image group turns tiling off
            group = [im] if t else [im, im]
            out = self.image_processor(images=[group], return_tensors="np")
            pixels.append(torch.as_tensor(out["pixel_values"][0][: self.image_layout((im.height, im.width), t).num_inputs]))
        sizes = torch.tensor([[im.height, im.width] for im in pil], dtype=torch.long)
        return {"pixel_values": torch.cat(pixels), "image_sizes": sizes}

    def preprocess_video(self, video) -> torch.Tensor:
        """A list of frames or a (T, H, W, 3) array -> (T, 3, S, S), every frame resized to S x S."""
        frames = list(video)
        if not frames:
            raise ValueError("a video has no frames")
        resize = make_image_processor(self.tile_size, mean=self.image_processor.image_mean,
                                      std=self.image_processor.image_std)
        return torch.as_tensor(resize(images=[_to_pil(f) for f in frames], return_tensors="np")["pixel_values"])

    # -- text + images + videos (keyword arguments; images first, as transformers' processors) ---------
    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        videos=None,
        return_tensors: str | None = "pt",
        padding: bool | str = "longest",
        multi_image: bool | None = None,
        **tokenizer_kwargs: Any,
    ) -> BatchFeature:
        """``text`` (one string or a batch) with ``<image>`` / ``<video>`` placeholders; ``images`` in placeholder
        order, a flat list for the whole batch or one list per sample; ``videos`` likewise, a flat list.

        ``multi_image``: whether the images belong to a multi-image prompt (not tiled); default: a sample with
        one image is tiled, a sample with several is not (OneVision). Returns input_ids, attention_mask,
        pixel_values (+ image_sizes, batch_num_images with pinpoints), pixel_values_videos.
        """
        if text is None:
            raise ValueError("LaCoProcessor needs text (with one <image> placeholder per image)")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        per_sample = [t.count(self.image_token) for t in texts]
        flat = self._flatten_images(images, per_sample)
        data: dict[str, Any] = {}
        counts: list[int] = []
        if flat:
            if multi_image is None:
                tiled = [n == 1 for n in per_sample for _ in range(n)]
            else:
                tiled = [not multi_image] * len(flat)
            data.update(self.preprocess_images(flat, tiled))
            sizes = [(im.height, im.width) for im in map(_to_pil, flat)]
            counts = [self.image_tokens(s, t) for s, t in zip(sizes, tiled)]
            if self.image_grid_pinpoints:
                data["batch_num_images"] = torch.tensor([n for n in per_sample if n], dtype=torch.long)
        texts = self._expand(texts, self.image_token, counts)
        expected = {self.image_token_id: sum(counts)}
        videos = [] if videos is None else list(videos)
        n_video = sum(t.count(self.video_token) for t in texts) if self.video_token else 0
        if len(videos) != n_video:
            raise ValueError(f"{n_video} {self.video_token or '<video>'} placeholder(s) in the text but "
                             f"{len(videos)} video(s)" + ("" if self.video_token else " (the model takes no video)"))
        if videos:
            clips = [self.preprocess_video(v) for v in videos]
            if len({c.shape for c in clips}) > 1:
                raise ValueError(f"videos in one call must have the same number of frames, got {[len(c) for c in clips]}")
            data["pixel_values_videos"] = torch.stack(clips)  # (n_videos, T, 3, S, S)
            v_counts = [self.video_tokens(len(c)) for c in clips]
            texts = self._expand(texts, self.video_token, v_counts)
            expected[self.video_token_id] = sum(v_counts)
        enc = self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **tokenizer_kwargs)
        ids = torch.as_tensor(enc["input_ids"]) if return_tensors == "pt" else None
        for token_id, n in expected.items():
            found = int((ids == token_id).sum()) if ids is not None else \
                sum(row.count(token_id) for row in enc["input_ids"])
            if found != n:
                raise ValueError(
                    f"after tokenization there are {found} tokens of id {token_id} but {n} were expected "
                    f"(truncation cut into an image or video, or the text contains the token id by other means)"
                )
        data.update(enc)
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _expand(texts: list[str], token: str | None, counts: Sequence[int]) -> list[str]:
        """Each ``token`` placeholder, in order across ``texts``, repeated its count times."""
        if not counts:
            return texts
        it = iter(counts)
        out = []
        for t in texts:
            parts = t.split(token)
            out.append(parts[0] + "".join(token * next(it) + part for part in parts[1:]))
        return out

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
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos"]
