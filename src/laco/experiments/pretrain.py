"""The embedded pretrained vision encoder: a small SigLIP-structured ViT pretrained on real scenes.

No pretrained ViT ships in any installable package, and LaCo's claim is about inserting a merge
into a *pretrained* encoder, so the project pretrains one (as ``shared/FEASIBILITY.md`` did):

* architecture: Hugging Face ``SiglipVisionModel`` (64 px, patch 8 -> 8 x 8 grid, width 96,
  6 layers, 4 heads, MLP 192; no pooling head), so every adapter / compressor / FLOP path of the
  library applies to it unchanged;
* task: per-quadrant classification of the 2 x 2 scenes of ``laco.data.embedded`` (10 classes per
  quadrant) plus the colour of the small dot, through a light read-out
  (per-token LayerNorm -> Linear -> GELU -> mean-pool per quadrant -> Linear); the read-out is
  saved beside the encoder but the MLLM does not use it;
* cache: ``$LACO_CACHE/encoders/<name>-<config hash>/`` (default ``~/.cache/laco``), written with
  ``save_pretrained`` (safetensors) into a temporary folder and renamed into place, with a
  ``checksums.sha256`` file verified on every load; a missing or corrupt cache is rebuilt.

    enc = load_pretrained_encoder()          # SiglipVisionModel; pretrains on the first call
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from laco.data.embedded import DOT_COLOURS, EmbeddedDataConfig, compose_scenes, default_cache_dir, get_item_source
from laco.io import publish_dir
from laco.safety import verify_checksums as _verify
from laco.safety import write_checksums
from laco.train.optim import build_optimizer, build_scheduler, optimizer_step

PIXEL_MEAN, PIXEL_STD = 0.5, 0.5
NUM_CLASSES = 10  # both item sources (Fashion-MNIST, generated) have 10 classes  # SigLIP normalisation: [0, 255] -> [-1, 1]


@dataclass
class PretrainConfig:
    """Encoder shape and pretraining budget. Any change gives a new cache entry."""

    hidden_size: int = 96
    intermediate_size: int = 192
    num_hidden_layers: int = 6  # 1/12, 1/4, 1/2 of 6 -> merge after layer 1, 2, 3
    num_attention_heads: int = 4
    image_size: int = 64
    patch_size: int = 8
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    pool_size: int = 16000  # training scenes composed once from the train items (fresh seed)
    eval_size: int = 1000  # held-out scenes from the val items
    seed: int = 0
    data: EmbeddedDataConfig = field(default_factory=EmbeddedDataConfig)

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = EmbeddedDataConfig(**self.data)
        if self.image_size != self.data.canvas:
            raise ValueError(f"image_size {self.image_size} must equal the scene canvas {self.data.canvas}")
        if (self.image_size // self.patch_size) % 2:
            raise ValueError(f"the patch grid {self.image_size // self.patch_size} must be even (2 x 2 quadrants)")

    def key(self) -> str:
        # only what changes the weights: split sizes of the MLLM data do not
        d = asdict(self)
        d["data"] = {k: d["data"][k] for k in ("canvas", "large", "small", "dot_size", "source")}
        # version 2 (#15): warmup is transformers' (lr * step / warmup from 0), no longer (step + 1) / warmup
        return hashlib.sha256(json.dumps({**d, "version": 2}, sort_keys=True).encode()).hexdigest()[:12]

    def vision_config(self):
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            image_size=self.image_size, patch_size=self.patch_size, num_channels=3, vision_use_head=False,
        )


def to_pixel_values(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1] (SigLIP's mean 0.5 / std 0.5)."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - PIXEL_MEAN) / PIXEL_STD


class QuadrantReadout(nn.Module):
    """Pretraining head: per-token MLP, mean-pool each grid quadrant -> 10-way; mean-pool all -> dot colour."""

    def __init__(self, dim: int, num_classes: int, num_colours: int = len(DOT_COLOURS)):
        super().__init__()
        self.token_mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.cls = nn.Linear(dim, num_classes)
        self.dot = nn.Linear(dim, num_colours)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, H*W, C) patch tokens -> (class logits (B, 4, K), dot logits (B, colours))."""
        b, (h, w) = x.shape[0], grid
        y = self.token_mlp(x).view(b, 2, h // 2, 2, w // 2, -1)  # (B, qrow, h/2, qcol, w/2, C)
        quad = y.mean(dim=(2, 4)).reshape(b, 4, -1)  # (B, 4, C), quadrant q = 2*row + col
        return self.cls(quad), self.dot(y.mean(dim=(1, 2, 3, 4)))


@torch.no_grad()
def readout_accuracy(encoder, head: QuadrantReadout, images: np.ndarray, labels: np.ndarray, dot: np.ndarray,
                     batch_size: int = 256) -> dict[str, float]:
    """Quadrant-classification and dot-colour accuracy (%) of encoder + read-out on scenes."""
    encoder.eval()
    head.eval()
    correct_q = correct_d = 0
    grid = (encoder.config.image_size // encoder.config.patch_size,) * 2
    for i in range(0, len(images), batch_size):
        x = encoder(pixel_values=to_pixel_values(images[i:i + batch_size])).last_hidden_state
        cls, dl = head(x, grid)
        correct_q += (cls.argmax(-1).numpy() == labels[i:i + batch_size]).sum()
        correct_d += (dl.argmax(-1).numpy() == dot[i:i + batch_size]).sum()
    return {"quadrant_acc": 100.0 * correct_q / labels.size, "dot_acc": 100.0 * correct_d / len(dot)}


def pretrain_encoder(config: PretrainConfig, *, progress: bool = True):
    """Pretrain a SiglipVisionModel on scene classification; returns (encoder, read-out head, metrics)."""
    from tqdm.auto import tqdm
    from transformers import SiglipVisionModel

    torch.manual_seed(config.seed)
    source = get_item_source(config.data.source)
    items, labels = source.pools["train"]
    pool = compose_scenes(items, labels, config.pool_size, 4004 + config.seed, config.data, source.class_names, source.name)
    held = compose_scenes(*source.pools["val"], config.eval_size, 5005, config.data, source.class_names, source.name)
    encoder = SiglipVisionModel(config.vision_config())
    head = QuadrantReadout(config.hidden_size, len(source.class_names))
    params = [*encoder.parameters(), *head.parameters()]
    opt = build_optimizer(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = build_scheduler(opt, config.steps, warmup_steps=config.warmup_steps)
    grid = (config.image_size // config.patch_size,) * 2
    rng = np.random.default_rng(config.seed)
    encoder.train()
    head.train()
    t0 = time.time()
    bar = tqdm(range(config.steps), desc="pretraining encoder", disable=not progress)
    for step in bar:
        idx = rng.integers(0, len(pool), size=config.batch_size)
        x = encoder(pixel_values=to_pixel_values(pool.images[idx])).last_hidden_state  # (B, 64, C)
        cls, dl = head(x, grid)
        loss = nn.functional.cross_entropy(cls.flatten(0, 1), torch.as_tensor(pool.labels[idx]).flatten()) \
            + nn.functional.cross_entropy(dl, torch.as_tensor(pool.dot[idx]))
        optimizer_step(loss, opt, sched, clip_params=params)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    metrics = {"train_seconds": round(time.time() - t0, 1), "final_loss": round(loss.item(), 4), "source": source.name,
               **{k: round(float(v), 2) for k, v in readout_accuracy(encoder, head, held.images, held.labels, held.dot).items()}}
    encoder.eval()
    return encoder, head, metrics


# -- cache ----------------------------------------------------------------------------------------
def verify_checksums(folder: Path) -> bool:
    """True when every file listed in the checksum file exists and matches (and the list is not empty)."""
    return _verify(folder) is None


def encoder_cache_path(config: PretrainConfig | None = None, cache_dir: str | Path | None = None) -> Path:
    config = config or PretrainConfig()
    source = get_item_source(config.data.source).name if config.data.source == "auto" else config.data.source
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "encoders" / f"siglip-{source}-{config.key()}"


def load_pretrained_encoder(cache_dir: str | Path | None = None, config: PretrainConfig | None = None, *,
                            progress: bool = True, with_head: bool = False):
    """The pretrained ``SiglipVisionModel`` (eval mode); pretrains and caches it on the first call.

    ``with_head=True`` also returns the pretraining read-out and its metrics: ``(encoder, head, metrics)``.
    """
    from safetensors.torch import load_file, save_file
    from transformers import SiglipVisionModel

    config = config or PretrainConfig()
    path = encoder_cache_path(config, cache_dir)
    if path.exists() and not verify_checksums(path):
        warnings.warn(f"pretrained encoder cache {path} is incomplete or corrupt (checksum mismatch); rebuilding",
                      stacklevel=2)
        shutil.rmtree(path)
    if not path.exists():
        encoder, head, metrics = pretrain_encoder(config, progress=progress)
        tmp = path.with_name(path.name + f".partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        encoder.save_pretrained(tmp)
        save_file(head.state_dict(), str(tmp / "readout.safetensors"))
        (tmp / "pretrain.json").write_text(json.dumps({"config": asdict(config), "metrics": metrics}, indent=2))
        write_checksums(tmp)
        publish_dir(tmp, path)  # another process that finished first keeps theirs
    encoder = SiglipVisionModel.from_pretrained(path).eval()
    if not with_head:
        return encoder
    info = json.loads((path / "pretrain.json").read_text())
    head = QuadrantReadout(config.hidden_size, NUM_CLASSES)
    head.load_state_dict(load_file(str(path / "readout.safetensors")))
    return encoder, head.eval(), info["metrics"]


def embedded_encoder_source():
    """The pretrained embedded encoder as a ``laco.model.sources.EncoderSource`` (``laco probe embedded``)."""
    from laco.model.sources import EncoderSource

    model = load_pretrained_encoder()
    path = encoder_cache_path()
    info = json.loads((path / "pretrain.json").read_text()) if (path / "pretrain.json").is_file() else {}
    note = f"embedded encoder {path.name}" + (f", pretraining metrics {info['metrics']}" if "metrics" in info else "")
    return EncoderSource("embedded", model, image_size=PretrainConfig().image_size,
                         image_mean=(PIXEL_MEAN,) * 3, image_std=(PIXEL_STD,) * 3, notes=[note])
