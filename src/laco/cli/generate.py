"""``laco generate MODEL_DIR --image x.png --prompt "..."``: answer a prompt about images, streaming tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from laco.cli import app


def build_prompt(processor, prompt: str, n_images: int, use_chat_template: bool) -> str:
    """The model's text: the prompt as one user turn (ChatML), with one <image> per image placed before
    the question unless the prompt already holds its own placeholders."""
    token = processor.image_token
    if token in prompt:
        if prompt.count(token) != n_images:
            raise ValueError(f"the prompt has {prompt.count(token)} {token} placeholder(s) but {n_images} --image given")
        body = prompt
    else:
        body = (token + "\n") * n_images + prompt
    if not use_chat_template:
        return body
    if not processor.chat_template:
        raise ValueError("the processor has no chat template; pass --raw to feed the prompt as is")
    return processor.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True)


def check_new_tokens(model_dir: Path, max_new_tokens: int, option: str = "--max-new-tokens") -> None:
    """``max_new_tokens`` must leave room for a prompt within the LLM's ``max_position_embeddings``."""
    from laco.safety import read_json_object

    cfg = read_json_object(model_dir / "config.json", "model config")
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    limit = text.get("max_position_embeddings")
    if isinstance(limit, int) and max_new_tokens >= limit:
        raise ValueError(f"{option} {max_new_tokens} does not fit the model's context of {limit} positions "
                         f"(max_position_embeddings); use fewer than {limit}")


def torch_dtype_for(dtype: str, device: str, option: str = "--dtype"):
    """'auto' (bf16 on CUDA, fp32 elsewhere) or a floating torch dtype name."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise ValueError(f"{option} {dtype!r} is unknown; choose auto, {', '.join(choices)}")
    return choices[dtype]


@app.command()
def generate(
    model_dir: Path = typer.Argument(..., help="a saved LaCo model with its processor (save_pretrained of both)"),
    image: list[Path] = typer.Option([], "--image", "-i", help="image file; repeat for several, in placeholder order"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="the question; <image> placeholders optional"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: int = typer.Option(0, "--seed"),
    raw: bool = typer.Option(False, "--raw", help="do not wrap the prompt in the chat template"),
    device: Optional[str] = typer.Option(None, "--device", help="default: cuda if available, else cpu"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on cuda, fp32 on cpu), float32, bfloat16, float16"),
) -> None:
    """Generate an answer about the images, printing tokens as they come (greedy unless --temperature > 0)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, TextStreamer

    import laco.model  # noqa: F401  (registers model_type 'laco' with the Auto classes)
    from laco.safety import check_device, check_finite, check_model_dir, open_image

    # every argument and input file is checked before the model is loaded
    check_finite("--temperature", temperature, low=0.0)
    check_finite("--top-p", top_p, low=0.0, high=1.0)
    device = check_device(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = torch_dtype_for(dtype, device)
    check_model_dir(model_dir, processor=True)
    check_new_tokens(model_dir, max_new_tokens)
    images = [open_image(path) for path in image]

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    text = build_prompt(processor, prompt, len(images), use_chat_template=not raw)
    inputs = processor(text=[text], images=images or None, return_tensors="pt").to(device)
    tokenizer = processor.tokenizer
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    torch.manual_seed(seed)
    with torch.inference_mode():
        model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
