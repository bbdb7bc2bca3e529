"""Version shims: the only places where the supported transformers releases (5.17 to 5.24+) differ.

* Sub-configs: 5.24 declares them with ``SubConfigSpec`` (``sub_configs_defaults``) and builds them in the base
  ``__post_init__``; 5.17-5.23 declare ``sub_configs`` and each composite config builds its own.
* The KV cache: 5.24 names it ``cache`` (keyword and output field); 5.17-5.23 ``past_key_values``.
* ``slice_logits_to_keep`` (the positions an LM head projects): in 5.24, not in 5.17-5.19.
* Activation checkpointing: 5.24 names it ``activation_checkpointing_enable`` (``gradient_checkpointing_*`` is a
  deprecated alias that warns); 5.17-5.19 have only ``gradient_checkpointing_enable``.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers >= 5.24
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # pragma: no cover - exercised in the oldest-transformers CI venv
    SubConfigSpec = None

#: the KV-cache keyword of model forwards and field of model outputs in the installed transformers
CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


HAS_SUB_CONFIG_SPEC = SubConfigSpec is not None


def sub_config_specs(defaults: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """transformers >= 5.24: ``sub_configs_defaults`` for AutoConfig sub-configs ``{key: (model_type, init kwargs)}``."""
    return {key: SubConfigSpec(config_class=AutoConfig, model_type=model_type, init_kwargs=dict(init))
            for key, (model_type, init) in defaults.items()}


def build_sub_configs(config: PreTrainedConfig, defaults: dict[str, tuple[str, dict[str, Any]]]) -> None:
    """Before transformers 5.24: turn dict/None sub-configs into config objects (5.24 does it in the base class)."""
    if HAS_SUB_CONFIG_SPEC:
        return
    for key, (model_type, init) in defaults.items():
        value = getattr(config, key)
        if value is None:
            value = {**init}
        if isinstance(value, dict):
            value = dict(value)
            value = AutoConfig.for_model(value.pop("model_type", model_type), **value)
        setattr(config, key, value)


def causal_lm_output(**fields: Any) -> CausalLMOutputWithPast:
    """A ``CausalLMOutputWithPast``; ``cache`` goes into the installed version's cache field."""
    cache = fields.pop("cache", None)
    return CausalLMOutputWithPast(**fields, **{CACHE_KEY: cache})


def output_cache(output) -> Any:
    """The KV cache of a model output, under either field name."""
    return getattr(output, CACHE_KEY, None)


try:  # 5.24 has it (also 2-D position / boolean-mask tensors); 5.17-5.19 do not
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # pragma: no cover - exercised in the oldest-transformers CI venv
    def slice_logits_to_keep(hidden_states, logits_to_keep):
        """(B, L, D) -> the positions the LM head projects: the last ``logits_to_keep`` (0: all) or those a 1-D
        tensor names (the slicing of 5.17-5.19's causal LMs)."""
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, keep, :]


def set_activation_checkpointing(model, on: bool, **kwargs: Any) -> None:
    """Activation (gradient) checkpointing of a ``PreTrainedModel`` on or off, under either name; ``kwargs``
    go to ``torch.utils.checkpoint`` (e.g. ``use_reentrant=False``)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.24 (not in 5.19)
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
        elif model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif on:  # pragma: no cover - exercised in the oldest-transformers CI venv
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
    elif model.is_gradient_checkpointing:  # pragma: no cover
        model.gradient_checkpointing_disable()
