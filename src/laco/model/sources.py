"""Vision encoders as sources to analyse (``laco probe``): a preset, or the encoder inside a Hugging Face vision
model, LLaVA / LLaVA-OneVision checkpoint or saved LaCo model, with how its features are read (feature layer,
final norm) and how its images are normalised."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from laco.encoders.adapters import get_adapter

VISION_MODEL_TYPES = ("siglip_vision_model", "clip_vision_model", "dinov2", "dinov2_with_registers")


@dataclass
class EncoderSource:
    """A vision encoder to probe, how its features are read, and how its images are normalised."""

    name: str
    model: nn.Module
    feature_layer: int = -1
    final_norm: bool | None = None
    image_size: int = 224
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    notes: list[str] = field(default_factory=list)


#: per-family normalisation when a directory has no preprocessor_config.json
_DEFAULT_STATS = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _norm_stats(folder: Path, model_type: str) -> tuple[tuple, tuple]:
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        d = json.loads(pre.read_text())
        if "image_mean" in d and "image_std" in d:
            return tuple(d["image_mean"]), tuple(d["image_std"])
    family = next((f for f in _DEFAULT_STATS if model_type.startswith(f)), "siglip")
    return _DEFAULT_STATS[family]


def load_encoder_source(source: str) -> EncoderSource:
    """A vision preset name (random weights), or a directory holding a Hugging Face vision encoder, a LLaVA /
    LLaVA-OneVision checkpoint, or a saved LaCo model (its uncompressed encoder). The project's own pretrained
    encoder ("embedded") is ``laco.experiments.pretrain.embedded_encoder_source``."""
    from laco import encoders

    if source in encoders.list_vision_presets():
        model = encoders.create_vision_encoder(source).eval()
        return EncoderSource(source, model, image_size=model.config.image_size, notes=[
            f"{source} is a preset with RANDOM weights: its fidelity numbers say nothing about a pretrained encoder"])
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(
            f"probe source {source!r} is neither 'embedded', a vision preset ({', '.join(encoders.list_vision_presets())}) "
            "nor a directory")
    from laco.safety import check_model_dir, read_json_object

    cfg = read_json_object(check_model_dir(path) / "config.json", "model config")
    mt = cfg.get("model_type")
    if mt in ("llava", "llava_onevision"):
        from laco.model.convert import hf_feature_layer_to_core, load_llava_vision_tower

        model, cfg = load_llava_vision_tower(path)
        adapter = get_adapter(model)
        feature_layer = hf_feature_layer_to_core(cfg.get("vision_feature_layer", -2), len(adapter.layers))
        mean, std = _norm_stats(path, model.config.model_type)
        return EncoderSource(str(path), model, feature_layer=feature_layer, final_norm=False,
                             image_size=model.config.image_size, image_mean=mean, image_std=std)
    if mt == "laco":
        from transformers import AutoModelForImageTextToText
        import laco.model  # noqa: F401  (registers model_type 'laco' with the Auto classes)

        lm = AutoModelForImageTextToText.from_pretrained(path)
        tower = lm.vision_tower
        mean, std = _norm_stats(path, lm.config.vision_config.model_type)
        return EncoderSource(str(path), tower.vision_model.eval(), feature_layer=tower.feature_layer,
                             final_norm=tower.apply_final_norm, image_size=lm.config.image_size, image_mean=mean,
                             image_std=std)
    if mt in VISION_MODEL_TYPES or mt in ("siglip", "clip"):
        from transformers import AutoModel

        model = AutoModel.from_pretrained(path)
        model = getattr(model, "vision_model", model) if mt in ("siglip", "clip") else model
        mean, std = _norm_stats(path, mt)
        return EncoderSource(str(path), model.eval(), image_size=model.config.image_size, image_mean=mean,
                             image_std=std)
    raise ValueError(
        f"cannot probe model_type {mt!r} in {source!r}; supported: a vision encoder ({', '.join(VISION_MODEL_TYPES)}), "
        "llava, llava_onevision, laco"
    )


