"""The model card (``README.md``) that ``LaCoForConditionalGeneration.save_pretrained`` writes next to the weights."""

from __future__ import annotations


def _name(sub_config) -> str:
    path = getattr(sub_config, "_name_or_path", "") or ""
    return f"{sub_config.model_type} (`{path}`)" if path else f"{sub_config.model_type} (configured in code)"


def model_card(model) -> str:
    """Markdown: base encoder and LLM, compression (method, layer, ratio), tokens per image, encoder FLOP ratio,
    and how to load the folder."""
    from laco.flops import encoder_cost

    config = model.config
    comp = config.compression
    tower = model.vision_tower
    cost = encoder_cost(tower)
    rows = [
        ("vision encoder", _name(config.vision_config)),
        ("language model", _name(config.text_config)),
        ("compression method", f"`{comp['method']}`" + (f" {comp['kwargs']}" if comp["kwargs"] else "")),
        ("merge after layer(s)", f"{comp['layer']!r} -> {list(tower.merge_layers)} of {tower.num_layers}"),
        ("ratio", f"{comp['ratio']} x {comp['ratio']} tokens -> 1"),
        ("image size", f"{config.image_size} px"),
        ("tokens per image", str(model.num_image_tokens)),
        ("encoder FLOPs vs uncompressed", f"{cost.flop_ratio:.3f}"),
        ("projector", f"`{config.projector_type}`"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [laco, visual-token-compression, multimodal]
---

# LaCo model

A LLaVA-style multimodal LLM with LaCo layer-wise visual token compression (a Patch Merge Layer inside the
vision encoder; Liu et al., arXiv 2507.02279), saved by laco {_laco_version()}.

| | |
|---|---|
{table}

## Load

```python
import laco.model  # registers model_type "laco" with the Auto classes
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained(PATH)
processor = AutoProcessor.from_pretrained(PATH)
messages = [{{"role": "user", "content": [{{"type": "image", "image": pil_image}}, {{"type": "text", "text": "What is this?"}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
print(processor.decode(model.generate(**inputs, max_new_tokens=64)[0, inputs["input_ids"].shape[1]:]))
```

Without laco installed: if this folder holds `modeling_laco.py` (written by `laco export` or
`save_pretrained(..., remote_code=True)`), drop the first import and pass `trust_remote_code=True` to both
`from_pretrained` calls.

Or from the command line: `laco generate PATH --image x.png --prompt "What is in the image?"`.
"""


def _laco_version() -> str:
    from laco._version import __version__

    return __version__
