"""``laco convert``: turn a pretrained LLaVA / LLaVA-OneVision checkpoint into a LaCo model.

    src (Hugging Face LlavaForConditionalGeneration / LlavaOnevisionForConditionalGeneration)
        model.vision_tower            -> model.vision_tower.vision_model   (same tensors, unchanged)
        (new)                         -> model.vision_tower.compressors    (LaCo PML, projection zero-initialised)
        model.multi_modal_projector   -> model.multi_modal_projector       (linear_1, act, linear_2 -> mlp2x_gelu 0, 1, 2)
        model.language_model, lm_head -> model.language_model, lm_head    (same tensors)
        model.image_newline           -> model.image_newline               (OneVision; same tensor)

With the zero-initialised PML the converted tower computes the source tower with an r x r average
pool inside the encoder after layer k: a usable starting point that ``laco train`` stage 1 (PML +
projector, encoder and LLM frozen) then trains.

Feature selection is kept: Hugging Face LLaVA takes ``hidden_states[vision_feature_layer]``,
which is never passed through the encoder's final norm, so a SigLIP / DINOv2 tower read at ``-1``
(LLaVA-OneVision) converts to ``feature_layer=-1`` with ``final_norm=False`` (stored in the
compression kwargs); positive layer indices become the equivalent negative ones.

LLaVA-OneVision's visual layout carries over (``laco.model.anyres``): ``image_grid_pinpoints``,
``vision_aspect_ratio`` (anyres_max_N), the learned ``image_newline``, the video token, and the
source's image processor; each tile, base image and video frame is compressed inside the encoder on
its own, and unpadding / newlines act on the compressed grid. With method ``none`` the converted
model computes exactly what the source does (images, multi-image prompts, videos).

What does not carry over (each is listed in ``conversion.json`` ``notes``):

* ``vision_feature_select_strategy="default"`` on a tower without a CLS token (SigLIP): Hugging
  Face drops the first *patch* there; LaCo's "default" drops only prefix tokens (none for SigLIP),
  so the grid stays whole -- the merge needs a complete grid.
* A list-valued ``vision_feature_layer`` (several layers concatenated) is not supported.

Idefics3 / SmolVLM are not supported: their vision transformer has no encoder adapter in
``laco.encoders`` and their connector already pixel-shuffles outside the encoder.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from torch import nn

from laco.io import replace_dir
from laco.safety import check_model_dir, check_replaceable, clean_partials, read_json_object, write_marker

LayerSpec = Union[int, float, str]

#: config model_type -> transformers class name, for the architectures ``convert`` reads
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llava": "LlavaForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}
#: LLaVA projector activations that LaCo's "mlp2x_gelu" computes exactly (nn.GELU, erf form)
_GELU_ACTS = ("gelu",)


def _supported_text() -> str:
    return ", ".join(f"{cls} (model_type {mt!r})" for mt, cls in SUPPORTED_ARCHITECTURES.items())


def read_source_config(src_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint dir, checked to be a supported architecture (clear errors otherwise)."""
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"source checkpoint {str(src)!r} is not a directory")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(src)!r} has no config.json; expected a Hugging Face checkpoint directory")
    cfg = read_json_object(check_model_dir(src) / "config.json", "source config")
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_ARCHITECTURES:
        arch = ", ".join(cfg.get("architectures") or []) or "unknown architecture"
        raise ValueError(f"cannot convert model_type {mt!r} ({arch}); supported: {_supported_text()}")
    return cfg


def hf_feature_layer_to_core(vision_feature_layer: Any, num_layers: int) -> int:
    """HF ``hidden_states`` index (0 = embeddings, i = output of layer i; negative from the end) -> core -L..-1."""
    if isinstance(vision_feature_layer, (list, tuple)):
        raise ValueError(
            f"vision_feature_layer {list(vision_feature_layer)} concatenates several layers; LaCo reads one layer"
        )
    if isinstance(vision_feature_layer, bool) or not isinstance(vision_feature_layer, int):
        raise TypeError(f"vision_feature_layer must be an int, got {vision_feature_layer!r}")
    f = vision_feature_layer
    core = f - (num_layers + 1) if f >= 0 else f
    if not -num_layers <= core <= -1:
        raise ValueError(
            f"vision_feature_layer {f} selects {'the patch embeddings' if core == -num_layers - 1 else 'no layer'} "
            f"of a {num_layers}-layer tower; LaCo needs a transformer layer's output (1..{num_layers} or -{num_layers}..-1)"
        )
    return core


def _hf_class(model_type: str):
    import transformers

    return getattr(transformers, SUPPORTED_ARCHITECTURES[model_type])


def _safetensors_files(src: Path) -> list[Path]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {str(src)!r}")
    return files


def load_llava_vision_tower(src_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Only the vision tower of a LLaVA(-OneVision) checkpoint (the LLM is never loaded), and the source config.

    Weight keys are matched for both layouts in circulation: ``model.vision_tower.*`` (transformers >= 4.52)
    and ``vision_tower.*`` (older), with or without the ``vision_model.`` level of the tower class.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel

    src = Path(src_dir)
    cfg = read_source_config(src)
    vision_config = AutoConfig.for_model(**cfg["vision_config"])
    if hasattr(vision_config, "vision_use_head"):
        vision_config.vision_use_head = False  # SigLIP's pooling head: unused by LLaVA, often not saved
    tower = AutoModel.from_config(vision_config)
    target = set(tower.state_dict())
    tensors: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(src):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                for prefix in ("model.vision_tower.", "vision_tower."):
                    if key.startswith(prefix):
                        tensors[key[len(prefix):]] = f.get_tensor(key)
    for strip, add in (("", ""), ("vision_model.", ""), ("", "vision_model.")):
        cand = {add + k[len(strip):]: v for k, v in tensors.items() if k.startswith(strip)}
        if target <= set(cand):
            tower.load_state_dict({k: cand[k] for k in target}, strict=True)
            return tower.eval(), cfg
    missing = sorted(target - set(tensors))[:5]
    raise ValueError(f"{str(src)!r} has no complete vision tower weights (e.g. missing {missing})")


# -- conversion -------------------------------------------------------------------------------------
@dataclass
class ConversionReport:
    """What ``convert_checkpoint`` did; saved as ``conversion.json`` next to the converted model."""

    source: str
    architecture: str
    out_dir: str
    compression: dict[str, Any]
    source_vision_feature_layer: Any
    vision_feature_layer: int
    final_norm: bool
    vision_feature_select_strategy: str
    encoder_layers_run: int
    merge_after_layers: list[int]
    tokens_per_image_before: int
    tokens_per_image_after: int
    encoder_flop_ratio: float
    carried_tensors: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _source_tokens_per_image(adapter, image_size: int, strategy: str) -> int:
    """Tokens one base-resolution image gives in the source: HF "default" drops index 0, "full" keeps all."""
    h, w = adapter.grid_for_image_size(image_size)
    n = h * w + adapter.num_prefix_tokens
    return n - 1 if strategy == "default" else n


def build_converted_model(
    source_model: nn.Module, *, layer: LayerSpec | Sequence[LayerSpec] = "1/4", ratio: int = 2, method: str = "laco",
    compressor_kwargs: dict[str, Any] | None = None, image_token: str = "<image>", video_token: str | None = "<video>",
    video_pooling: bool | None = None,
) -> tuple[nn.Module, list[str]]:
    """A ``LaCoForConditionalGeneration`` sharing ``source_model``'s vision tower and LLM tensors (no copies),
    with a new compressor (zero-initialised LaCo PML by default) and the LLaVA projector's weights.

    LLaVA-OneVision's visual layout carries over: ``image_grid_pinpoints``, ``vision_aspect_ratio``, the learned
    ``image_newline`` (same tensor) and the video token (``video_token=None``: no video input). ``video_pooling`` (OneVision's 2x2 bilinear frame
    pooling): default on only for method "none", since the in-encoder merge replaces it.

    Returns the model (eval mode) and notes on what did not carry over.
    """
    from laco.encoders.adapters import get_adapter
    from laco.model.config import LaCoConfig
    from laco.model.modeling import LaCoForConditionalGeneration, build_vision_tower
    from laco.model.projectors import create_projector

    src_cfg = source_model.config
    mt = src_cfg.model_type
    if mt not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"cannot convert {type(source_model).__name__} (model_type {mt!r}); supported: {_supported_text()}")
    base = source_model.model  # LlavaModel / LlavaOnevisionModel: vision_tower, multi_modal_projector, language_model
    vision = base.vision_tower
    adapter = get_adapter(vision)  # TypeError naming the supported encoder families
    notes: list[str] = []

    feature_layer = hf_feature_layer_to_core(src_cfg.vision_feature_layer, len(adapter.layers))
    # HF LLaVA reads hidden_states[...], never the final norm; only -1 would apply it in laco
    kwargs = dict(compressor_kwargs or {})
    has_norm = not isinstance(adapter.final_norm, nn.Identity)
    if feature_layer == -1 and has_norm:
        kwargs["final_norm"] = False
    strategy = src_cfg.vision_feature_select_strategy
    if strategy == "default" and adapter.num_prefix_tokens != 1:
        notes.append(
            f"vision_feature_select_strategy 'default': Hugging Face drops token 0 of every image, which for "
            f"{type(vision).__name__} ({adapter.num_prefix_tokens} prefix tokens) is not exactly the prefix; LaCo "
            "drops the prefix tokens only, so the merge sees the whole patch grid")
    act = src_cfg.projector_hidden_act
    if act not in _GELU_ACTS:
        raise ValueError(f"projector activation {act!r} has no LaCo projector; supported: {_GELU_ACTS}")
    newline = getattr(base, "image_newline", None)
    config = LaCoConfig(
        vision_config=vision.config.to_dict(),
        text_config=base.language_model.config.to_dict(),
        compression={"method": method, "layer": layer, "ratio": ratio, "kwargs": kwargs},
        projector_type="mlp2x_gelu",
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        image_token=image_token,
        image_token_id=src_cfg.image_token_id,
        image_size=vision.config.image_size,
        image_grid_pinpoints=getattr(src_cfg, "image_grid_pinpoints", None),
        vision_aspect_ratio=getattr(src_cfg, "vision_aspect_ratio", None) or "anyres_max_9",
        use_image_newline=newline is not None,
        video_token=video_token or "<video>",
        video_token_id=getattr(src_cfg, "video_token_id", None) if video_token else None,
        video_pooling=video_pooling,
        tie_word_embeddings=bool(getattr(src_cfg, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):  # a skeleton: every module below is replaced by the source's or built for real
        model = LaCoForConditionalGeneration(config)
    model.vision_tower = build_vision_tower(config, vision)  # PML built on the tower's device/dtype, zero-init
    model.set_decoder(base.language_model)  # the same layout as the source: decoder + lm_head
    model.lm_head = source_model.get_output_embeddings()
    model.projector = _convert_projector(base.multi_modal_projector, adapter.dim, config.text_config.hidden_size)
    if newline is not None:
        model.image_newline = newline  # the source's learned row separator (same tensor)
    model.config.vision_config = vision.config
    model.config.text_config = base.language_model.config
    if getattr(source_model, "generation_config", None) is not None:
        model.generation_config = source_model.generation_config
    src_meta = next(source_model.parameters()).is_meta  # a meta source (shape checks) stays meta
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and not src_meta]
    if leftover:
        raise RuntimeError(f"conversion left tensors without data (a module the mapping misses): {leftover[:5]}")
    return model.eval(), notes


def _convert_projector(src: nn.Module, in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA's ``linear_1 -> act -> linear_2`` as LaCo's ``mlp2x_gelu`` (Sequential 0, 1, 2); weights copied exactly."""
    from laco.model.projectors import create_projector

    l1, l2 = src.linear_1, src.linear_2
    if l1.in_features != in_dim:
        raise ValueError(f"projector input width {l1.in_features} != vision width {in_dim} "
                         "(several feature layers concatenated?)")
    proj = create_projector("mlp2x_gelu", in_dim, out_dim).to(device=l1.weight.device, dtype=l1.weight.dtype)
    with torch.no_grad():
        for dst, s in ((proj[0], l1), (proj[2], l2)):
            dst.weight.copy_(s.weight)
            if s.bias is not None:
                dst.bias.copy_(s.bias)
            else:  # multimodal_projector_bias=False: a zero bias computes the same function
                dst.bias.zero_()
    return proj


def _load_source_processor(src: Path):
    """(tokenizer or None, the source's own image processor or None) from the source dir's processor files."""
    image_processor = None
    if (src / "preprocessor_config.json").is_file():
        from laco.model.processing import load_image_processor

        image_processor = load_image_processor(src)
    tokenizer = None
    if (src / "tokenizer.json").is_file() or (src / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src)
        if getattr(tokenizer, "chat_template", None) is None:  # LLaVA keeps it at the processor level
            jinja, js = src / "chat_template.jinja", src / "chat_template.json"
            if jinja.is_file():
                tokenizer.chat_template = jinja.read_text()
            elif js.is_file():
                tokenizer.chat_template = json.loads(js.read_text()).get("chat_template")
    return tokenizer, image_processor


#: files that mark a conversion written before the marker file existed
LEGACY_MARKERS = ("conversion.json", "config.json")


def _atomic_replace_dir(tmp: Path, out: Path, overwrite: bool, src: Path) -> None:
    if out.exists():
        if not overwrite:
            raise ValueError(f"output directory {str(out)!r} exists; pass overwrite=True (--overwrite) to replace it")
        check_replaceable(out, "convert", sources=(src,), legacy=LEGACY_MARKERS)  # again: it may have changed
    replace_dir(tmp, out)


def convert_checkpoint(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    layer: LayerSpec | Sequence[LayerSpec] = "1/4",
    ratio: int = 2,
    method: str = "laco",
    compressor_kwargs: dict[str, Any] | None = None,
    video_pooling: bool | None = None,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert the LLaVA(-OneVision) checkpoint in ``src_dir`` into a LaCo model saved in ``out_dir``.

    Writes the model (safetensors), its processor when the source has a tokenizer, and ``conversion.json``;
    everything goes to a temporary sibling folder that is renamed into place at the end.
    """
    from laco.encoders.adapters import get_adapter
    from laco.flops import encoder_cost

    src, out = Path(src_dir), Path(out_dir)
    cfg = read_source_config(src)
    if out.exists() and out.resolve() == src.resolve():
        raise ValueError(f"the output directory must differ from the source checkpoint: {out}")
    if out.exists() and not overwrite:
        raise ValueError(f"output directory {str(out)!r} exists; pass overwrite=True (--overwrite) to replace it")
    # only a previous conversion is replaced: never the source, a folder holding it, or the current directory
    check_replaceable(out, "convert", sources=(src,), legacy=LEGACY_MARKERS)
    clean_partials(out)  # temporary folders of a killed conversion
    if method != "laco":
        warnings.warn(f"method {method!r}: only 'laco' (zero-initialised) starts as average pooling; an untrained "
                      f"{method} changes the model's outputs until it is trained", stacklevel=2)
    tokenizer, image_processor = _load_source_processor(src)
    image_token = "<image>"
    if tokenizer is not None and cfg.get("image_token_index", cfg.get("image_token_id")) is not None:
        image_token = tokenizer.convert_ids_to_tokens(int(cfg.get("image_token_index", cfg.get("image_token_id"))))
    video_token, video_id = "<video>", cfg.get("video_token_index", cfg.get("video_token_id"))
    video_note = None
    if tokenizer is not None and video_id is not None:
        video_token = tokenizer.convert_ids_to_tokens(int(video_id))
        if video_token not in tokenizer.all_special_tokens:  # a plain text piece cannot be a placeholder
            video_note = (f"the source tokenizer has no special token for video_token_id {video_id} ({video_token!r}): "
                          "the converted model takes no video")
            video_token = None
    source_model = _hf_class(cfg["model_type"]).from_pretrained(src, dtype="auto").eval()
    model, notes = build_converted_model(source_model, layer=layer, ratio=ratio, method=method,
                                         compressor_kwargs=compressor_kwargs, image_token=image_token,
                                         video_token=video_token, video_pooling=video_pooling)
    if video_note:
        notes.append(video_note)
    tower = model.vision_tower
    adapter = get_adapter(tower.vision_model)
    cost = encoder_cost(tower, model.config.image_size)
    report = ConversionReport(
        source=str(src), architecture=SUPPORTED_ARCHITECTURES[cfg["model_type"]], out_dir=str(out),
        compression=dict(model.config.compression), source_vision_feature_layer=cfg.get("vision_feature_layer", -2),
        vision_feature_layer=tower.feature_layer, final_norm=tower.apply_final_norm,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        encoder_layers_run=tower.num_layers, merge_after_layers=tower.merge_layers,
        tokens_per_image_before=_source_tokens_per_image(adapter, model.config.image_size,
                                                         model.config.vision_feature_select_strategy),
        tokens_per_image_after=model.num_image_tokens, encoder_flop_ratio=cost.flop_ratio,
        carried_tensors={
            "vision_tower": len(tower.vision_model.state_dict()),
            "projector": len(model.projector.state_dict()),
            "language_model": len(model.get_decoder().state_dict()) + len(model.lm_head.state_dict()),
            "new_compressor": len(tower.compressors.state_dict()),
        },
        notes=notes,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        processor = _build_processor(model, tokenizer, image_processor)
        if processor is not None:
            processor.save_pretrained(tmp)
        else:
            report.notes.append("the source has no tokenizer files: no processor was saved")
        (tmp / "conversion.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        write_marker(tmp, "convert", source=str(src.resolve()))
        _atomic_replace_dir(tmp, out, overwrite, src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _build_processor(model, tokenizer, image_processor):
    """A ``LaCoProcessor`` expanding each image placeholder to the converted model's token count, with the
    source's own image processor (resize, crop, mean/std as it was trained; only the size is set to the
    model's), or the encoder family's default where the source has none."""
    if tokenizer is None:
        return None
    from laco.model.processing import LaCoProcessor

    return LaCoProcessor.from_model_config(model.config, tokenizer, image_processor=image_processor)
