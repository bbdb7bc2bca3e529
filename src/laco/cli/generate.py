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
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, TextStreamer

    import laco  # noqa: F401  (registers the Auto classes)

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{str(model_dir)!r} holds no config.json: not a saved model directory")
    if not (model_dir / "processor_config.json").is_file():
        raise FileNotFoundError(
            f"{str(model_dir)!r} holds no processor_config.json: save the LaCoProcessor next to the model"
        )
    for path in image:
        if not path.is_file():
            raise FileNotFoundError(f"image {str(path)!r} does not exist")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif dtype in dtypes:
        torch_dtype = dtypes[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(dtypes)}")

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    images = [Image.open(path).convert("RGB") for path in image]
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
