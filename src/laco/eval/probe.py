"""``laco probe``: choose the merge depth k and ratio r on evidence, before any training.

For each candidate (k, r) the probe inserts a *zero-initialised* LaCo PML -- which computes exactly
r x r average pooling -- after layer k of a pretrained encoder and measures how far the final
features move from the uncompressed encoder's final features pooled to the same grid::

    reference(k, r) = pool_r(encoder(x))                  # external pooling, what LaCo@1 starts from
    compressed(k, r) = encoder_with_pool_after_layer_k(x)  # what in-encoder LaCo starts from

Both are (B, h*w, C) on the same (h, w) grid, so they compare token by token:

* ``cosine``     mean over images and tokens of cos(compressed, reference)      (1 = identical)
* ``rel_error``  mean over images of ||compressed - reference||_F / ||reference||_F
* ``probe_acc``  (images with labels) accuracy of a ridge linear probe trained on the compressed
  features, next to ``ref_probe_acc``, the same probe on the reference features.

Next to each: the analytic encoder FLOP ratio from ``laco.encoder_cost`` and the visual-token count.
The table is ranked by the fidelity metric; the Pareto front (fewer FLOPs vs higher fidelity) is
marked, and the recommendation is the most faithful setting whose FLOP ratio fits the budget.

A zero-initialised PML is the starting point of training (stage 1 learns the projection), so the
probe measures how much the upper layers must be taught, not the accuracy after training; it
ranks depths, it does not predict benchmark scores. Only parameter-free starting points are
meaningful before training, so ``method`` is ``"laco"`` (zero-init) or ``"avg_pool"`` (identical).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from laco.encoders import compress_encoder, resolve_layer
from laco.encoders.adapters import get_adapter
from laco.flops import encoder_cost
from laco.io import atomic_write_text
from laco.ops import pool_tokens, split_prefix, tokens_to_map

METRICS = ("auto", "cosine", "rel_error", "probe_acc")
PROBE_METHODS = ("laco", "avg_pool")


@dataclass
class ProbeConfig:
    """What to probe. ``layers=None`` probes every depth 0..L (L = "post", external pooling)."""

    layers: list[int | float | str] | None = None
    ratios: list[int] = field(default_factory=lambda: [2, 3])
    method: str = "laco"
    pad: str = "replicate"
    feature_layer: int = -1
    final_norm: bool | None = None  # None: the encoder's final norm only at feature_layer -1 (see compress_encoder)
    budget: float = 0.6  # highest acceptable encoder FLOP ratio for the recommendation
    metric: str = "auto"  # ranking metric; "auto": probe_acc when labels exist, else cosine
    batch_size: int = 32
    probe_grid: int = 4  # linear probe features: the grid adaptive-pooled to at most g x g, flattened
    test_fraction: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in PROBE_METHODS:
            raise ValueError(
                f"probe method {self.method!r} is not a parameter-free starting point; use one of {PROBE_METHODS} "
                "(an untrained learned compressor outputs noise, which says nothing about the depth)"
            )
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of {METRICS}")
        if not self.ratios:
            raise ValueError("ratios is empty")
        for r in self.ratios:
            if not isinstance(r, int) or isinstance(r, bool) or r < 2:
                raise ValueError(f"ratio must be an integer >= 2, got {r!r}")
        if not 0 < self.budget:
            raise ValueError(f"budget is a FLOP ratio and must be > 0, got {self.budget}")
        if self.batch_size < 1 or self.probe_grid < 1:
            raise ValueError(f"batch_size and probe_grid must be >= 1, got {self.batch_size}, {self.probe_grid}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclass
class ProbeRow:
    """One candidate: merge after ``layer`` of ``num_layers`` (``fraction`` = layer / L), ratio r."""

    layer: int
    fraction: float
    ratio: int
    grid: tuple[int, int]
    tokens: int
    flop_ratio: float
    gflops: float
    cosine: float
    rel_error: float
    probe_acc: float | None = None
    ref_probe_acc: float | None = None
    pareto: bool = False

    @property
    def label(self) -> str:
        return f"k={self.layer} r={self.ratio}"

    def value(self, metric: str) -> float:
        """The metric oriented so that higher is better."""
        v = getattr(self, metric)
        if v is None:
            raise ValueError(f"metric {metric!r} is not available for this probe (no labels?)")
        return -v if metric == "rel_error" else v


@dataclass
class ProbeResult:
    source: str
    encoder: str
    num_layers: int
    image_size: tuple[int, int]
    input_grid: tuple[int, int]
    num_prefix_tokens: int
    baseline_gflops: float
    num_images: int
    num_labelled: int
    metric: str
    config: ProbeConfig
    rows: list[ProbeRow]
    full_probe_acc: float | None = None  # linear probe on the uncompressed, unpooled features
    recommendation: dict[str, Any] | None = None
    depth_trend: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    notes: list[str] = field(default_factory=list)  # where the encoder and images came from, caveats

    def ranked(self) -> list[ProbeRow]:
        """Best first by the ranking metric; ties go to the cheaper setting."""
        return sorted(self.rows, key=lambda r: (-r.value(self.metric), r.flop_ratio))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [asdict(r) | {"label": r.label} for r in self.ranked()]
        return d

    # -- reports --------------------------------------------------------------------------------
    def to_markdown(self) -> str:
        acc = self.num_labelled > 0 and self.rows[0].probe_acc is not None
        lines = [
            f"# laco probe: {self.source}",
            "",
            f"Encoder `{self.encoder}`, {self.num_layers} layers run, image {self.image_size[0]}x{self.image_size[1]}, "
            f"patch grid {self.input_grid[0]}x{self.input_grid[1]} (+{self.num_prefix_tokens} prefix), "
            f"{self.baseline_gflops:.3f} GFLOPs uncompressed; {self.num_images} images"
            + (f", {self.num_labelled} labelled" if self.num_labelled else "")
            + f". Merge: zero-initialised `{self.config.method}` (= r x r average pooling), pad `{self.config.pad}`.",
            "",
            "Fidelity of the compressed encoder's final features to the uncompressed encoder's final features "
            "pooled to the same grid (before any training). Ranked by "
            f"`{self.metric}`; `*` marks the Pareto front (fewer FLOPs vs higher fidelity). `cosine` ignores scale; "
            "`rel. error` also counts it (pooling *after* a final norm shrinks the reference's norm, merging inside "
            "does not, so rel. error can be large where cosine is high).",
            "",
        ]
        head = ["rank", "k", "k/L", "r", "tokens", "enc FLOP ratio", "cosine", "rel. error"]
        if acc:
            head += ["probe acc", "ref. probe acc"]
        head += ["Pareto"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, r in enumerate(self.ranked(), 1):
            cells = [str(i), str(r.layer), f"{r.fraction:.3f}", str(r.ratio), str(r.tokens), f"{r.flop_ratio:.3f}",
                     f"{r.cosine:.4f}", f"{r.rel_error:.4f}"]
            if acc:
                cells += [f"{r.probe_acc:.3f}", f"{r.ref_probe_acc:.3f}"]
            cells += ["*" if r.pareto else ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if self.full_probe_acc is not None:
            lines += [f"Linear probe on the uncompressed features (grid pooled to at most {self.config.probe_grid}x"
                      f"{self.config.probe_grid}): {self.full_probe_acc:.3f}. `ref. probe acc`: on the reference (the "
                      "uncompressed features pooled by r, i.e. external pooling).", ""]
        if self.depth_trend:
            lines.append("Depth trend (Spearman correlation of fidelity with k, per ratio; +1 = fidelity rises "
                         "monotonically as the merge moves later):")
            lines.append("")
            for key, t in self.depth_trend.items():
                rho = t["spearman"]
                verdict = ("falls as the merge moves earlier" if rho > 0 else
                           "RISES as the merge moves earlier" if rho < 0 else "shows no trend with depth")
                lines.append(f"- {key}: Spearman {t['spearman']:+.3f}, {t['inversions']} adjacent inversions -> "
                             f"fidelity {verdict}")
            lines.append("")
        for note in self.notes:
            lines.append(f"Note: {note}")
        if self.notes:
            lines.append("")
        rec = self.recommendation
        if rec is not None:
            lines.append(f"**Recommendation for a FLOP budget of {self.config.budget:g}:** {rec['text']}")
            lines.append("")
        if self.command:
            lines += ["Command:", "", f"    {self.command}", ""]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Two panels: fidelity vs depth per ratio, and the Pareto plot (fidelity vs encoder FLOP ratio)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        acc = self.rows[0].probe_acc is not None
        metric = "probe_acc" if acc and self.metric in ("auto", "probe_acc") else self.metric
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        ax = axes[0]
        for j, r in enumerate(sorted({row.ratio for row in self.rows})):
            rows = sorted((row for row in self.rows if row.ratio == r), key=lambda x: x.layer)
            ax.plot([x.layer for x in rows], [x.cosine for x in rows], "o-", color=f"C{j}", label=f"cosine, r={r}")
            if acc:
                ax.plot([x.layer for x in rows], [x.probe_acc for x in rows], "s--", color=f"C{j}",
                        label=f"probe acc, r={r}")
        ax.set_xlabel(f"merge after layer k (of {self.num_layers}; k = L is external pooling)")
        ax.set_ylabel("fidelity to pooled uncompressed features")
        ax.set_title("fidelity vs merge depth")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax = axes[1]
        ys = [row.value(metric) * (-1 if metric == "rel_error" else 1) for row in self.rows]
        ax.scatter([row.flop_ratio for row in self.rows], ys, c=[row.ratio for row in self.rows], cmap="viridis",
                   s=30, zorder=3)
        for row, y in zip(self.rows, ys):
            ax.annotate(row.label, (row.flop_ratio, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = sorted((row for row in self.rows if row.pareto), key=lambda x: x.flop_ratio)
        fy = [row.value(metric) * (-1 if metric == "rel_error" else 1) for row in front]
        ax.plot([row.flop_ratio for row in front], fy, "r-", lw=1, label="Pareto front")
        ax.axvline(self.config.budget, color="gray", ls=":", label=f"budget {self.config.budget:g}")
        if self.recommendation is not None and self.recommendation.get("row") is not None:
            rec = self.recommendation["row"]
            ax.scatter([rec["flop_ratio"]], [rec[metric]], marker="*", s=250, c="red", zorder=4, label="recommended")
        ax.set_xlabel("encoder FLOP ratio (compressed / uncompressed)")
        ax.set_ylabel(metric)
        ax.set_title("Pareto: fidelity vs encoder FLOPs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.suptitle(f"laco probe: {self.source} ({self.encoder})", fontsize=10)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def save(self, out_dir: str | Path, stem: str = "probe") -> dict[str, Path]:
        """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir`` (each atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "png": out / f"{stem}.png"}
        atomic_write_text(paths["json"], json.dumps(self.to_dict(), indent=2) + "\n")
        atomic_write_text(paths["markdown"], self.to_markdown())
        tmp = out / f".{stem}.tmp.png"
        self.plot(tmp)
        tmp.replace(paths["png"])
        return paths


# -- fidelity ----------------------------------------------------------------------------------------
def _patch_features(out, num_prefix: int) -> torch.Tensor:
    return split_prefix(out.last_hidden_state, num_prefix)[1].float()  # (B, h*w, C)


def _probe_features(x: torch.Tensor, grid: tuple[int, int], g: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, min(h,g) * min(w,g) * C): a fixed-size, position-keeping summary for the linear probe."""
    m = tokens_to_map(x, grid)  # (B, C, h, w)
    m = F.adaptive_avg_pool2d(m, (min(grid[0], g), min(grid[1], g)))
    return m.flatten(1).cpu()


@torch.no_grad()
def probe_encoder(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    labels: torch.Tensor | None = None,
    config: ProbeConfig | None = None,
    *,
    source: str = "encoder",
    progress: bool = True,
) -> ProbeResult:
    """Probe every (k, r) of ``config`` on ``pixel_values`` (N, 3, H, W); ``labels`` (N,) or (N, K) ints, optional."""
    from tqdm.auto import tqdm

    config = config or ProbeConfig()
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be (N, 3, H, W), got shape {tuple(pixel_values.shape)}")
    n = pixel_values.shape[0]
    if labels is not None:
        labels = torch.as_tensor(labels).long()
        labels = labels[:, None] if labels.ndim == 1 else labels
        if labels.ndim != 2 or labels.shape[0] != n:
            raise ValueError(f"labels must be (N,) or (N, K) with N = {n} images, got shape {tuple(labels.shape)}")
    vision_model.eval()
    adapter = get_adapter(vision_model)
    image_size = tuple(pixel_values.shape[-2:])
    reference = compress_encoder(vision_model, None, feature_layer=config.feature_layer, final_norm=config.final_norm)
    n_run = reference.num_layers
    specs = config.layers if config.layers is not None else list(range(n_run + 1))
    depths = sorted({resolve_layer(s, n_run) for s in specs})
    candidates: list[tuple[int, int, Any]] = []  # (k, r, encoder)
    for r in config.ratios:
        for k in depths:
            enc = compress_encoder(vision_model, config.method, layer=k, ratio=r, feature_layer=config.feature_layer,
                                   final_norm=config.final_norm, pad=config.pad)
            candidates.append((k, r, enc.eval()))
    device = next(vision_model.parameters()).device
    dtype = next(vision_model.parameters()).dtype
    p = adapter.num_prefix_tokens
    grid_in = adapter.patch_grid(pixel_values[:1])

    cos_sum = [0.0] * len(candidates)
    rel_sum = [0.0] * len(candidates)
    tok_count = [0] * len(candidates)
    feats: list[list[torch.Tensor]] = [[] for _ in candidates]
    ref_feats: dict[int, list[torch.Tensor]] = {r: [] for r in config.ratios}  # the reference depends on r only
    full_feats: list[torch.Tensor] = []
    batches = range(0, n, config.batch_size)
    bar = tqdm(total=len(batches) * (len(candidates) + 1), desc="probe", disable=not progress)
    for start in batches:
        x = pixel_values[start:start + config.batch_size].to(device=device, dtype=dtype)
        ref_out = reference(x)
        full = _patch_features(ref_out, p)  # (B, H*W, C), the uncompressed final features
        full_feats.append(_probe_features(full, ref_out.grid, config.probe_grid))
        pooled = {r: pool_tokens(full, ref_out.grid, r, config.pad) for r in config.ratios}  # (B, h*w, C), (h, w)
        if labels is not None:
            for r, (ref, grid) in pooled.items():
                ref_feats[r].append(_probe_features(ref, grid, config.probe_grid))
        bar.update(1)
        for i, (k, r, enc) in enumerate(candidates):
            out = enc(x)
            y = _patch_features(out, p)  # (B, h*w, C)
            ref, grid = pooled[r]  # the same grid as y
            if tuple(grid) != tuple(out.grid):
                raise RuntimeError(f"grid mismatch at k={k} r={r}: {out.grid} vs pooled reference {grid}")
            cos_sum[i] += F.cosine_similarity(y, ref, dim=-1).sum().item()
            tok_count[i] += y.shape[0] * y.shape[1]
            rel_sum[i] += ((y - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-12)).sum().item()
            if labels is not None:
                feats[i].append(_probe_features(y, grid, config.probe_grid))
            bar.update(1)
    bar.close()

    split = _split(n, config.test_fraction, config.seed) if labels is not None else None
    ref_accs = ({r: linear_probe_accuracy(torch.cat(f), labels, split, seed=config.seed) for r, f in ref_feats.items()}
                if split is not None else {})
    rows: list[ProbeRow] = []
    for i, (k, r, enc) in enumerate(candidates):
        cost = encoder_cost(enc, image_size)
        acc = ref_acc = None
        if split is not None:
            acc = linear_probe_accuracy(torch.cat(feats[i]), labels, split, seed=config.seed)
            ref_acc = ref_accs[r]
        rows.append(ProbeRow(
            layer=k, fraction=k / n_run if n_run else 1.0, ratio=r, grid=tuple(cost.output_grid),
            tokens=cost.tokens_out, flop_ratio=cost.flop_ratio, gflops=cost.total_flops / 1e9,
            cosine=cos_sum[i] / tok_count[i], rel_error=rel_sum[i] / n, probe_acc=acc, ref_probe_acc=ref_acc,
        ))
    metric = config.metric if config.metric != "auto" else ("probe_acc" if split is not None else "cosine")
    if metric == "probe_acc" and split is None:
        raise ValueError("metric 'probe_acc' needs labels; pass labels or use metric 'cosine'")
    mark_pareto(rows, metric)
    base = encoder_cost(reference, image_size)
    result = ProbeResult(
        source=source, encoder=type(vision_model).__name__, num_layers=n_run, image_size=image_size,
        input_grid=tuple(grid_in), num_prefix_tokens=p, baseline_gflops=base.baseline_flops / 1e9, num_images=n,
        num_labelled=n if labels is not None else 0, metric=metric, config=config, rows=rows,
        full_probe_acc=(linear_probe_accuracy(torch.cat(full_feats), labels, split, seed=config.seed)
                        if split is not None else None),
    )
    result.depth_trend = depth_trend(rows, metric)
    result.recommendation = recommend(rows, metric, config.budget, n_run)
    return result


# -- ranking ----------------------------------------------------------------------------------------
def mark_pareto(rows: Sequence[ProbeRow], metric: str) -> None:
    """Set ``row.pareto`` for rows no other row beats on both FLOPs (lower) and ``metric`` (higher)."""
    for a in rows:
        a.pareto = not any(
            b is not a and b.flop_ratio <= a.flop_ratio and b.value(metric) >= a.value(metric)
            and (b.flop_ratio < a.flop_ratio or b.value(metric) > a.value(metric))
            for b in rows
        )


def recommend(rows: Sequence[ProbeRow], metric: str, budget: float, num_layers: int) -> dict[str, Any]:
    """The most faithful row with ``flop_ratio <= budget`` (ties: cheaper); else the cheapest row, flagged."""
    fits = [r for r in rows if r.flop_ratio <= budget]
    if fits:
        best = max(fits, key=lambda r: (r.value(metric), -r.flop_ratio))
        text = (f"merge after layer {best.layer} of {num_layers} "
                f"(k/L = {best.fraction:.3f}) with r = {best.ratio}: {best.tokens} visual tokens, encoder FLOP ratio "
                f"{best.flop_ratio:.3f}, {metric} {getattr(best, metric):.4f}.")
        # the ratio also sets the LLM's token count, so give the best depth for each ratio too
        per_ratio = {}
        for r in sorted({row.ratio for row in fits}):
            b = max((row for row in fits if row.ratio == r), key=lambda row: (row.value(metric), -row.flop_ratio))
            per_ratio[str(r)] = asdict(b)
            text += (f" For r = {r}: k = {b.layer} ({b.tokens} tokens, FLOP ratio {b.flop_ratio:.3f}, "
                     f"{metric} {getattr(b, metric):.4f}).")
        return {"fits_budget": True, "row": asdict(best), "per_ratio": per_ratio, "text": text}
    cheapest = min(rows, key=lambda r: (r.flop_ratio, -r.value(metric)))
    text = (f"no candidate fits the budget (the cheapest, k = {cheapest.layer} with r = {cheapest.ratio}, has FLOP "
            f"ratio {cheapest.flop_ratio:.3f}); add earlier layers or larger ratios, or raise the budget.")
    return {"fits_budget": False, "row": asdict(cheapest), "text": text}


def _rank(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); 0 when either side is constant."""
    rx, ry = _rank(xs), _rank(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    vy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (vx * vy) if vx > 0 and vy > 0 else 0.0


def depth_trend(rows: Sequence[ProbeRow], metric: str) -> dict[str, Any]:
    """Per ratio and fidelity metric: Spearman(k, fidelity) and the number of adjacent depths where it drops."""
    trend: dict[str, Any] = {}
    metrics = ["cosine"] + (["probe_acc"] if rows and rows[0].probe_acc is not None else [])
    for r in sorted({row.ratio for row in rows}):
        rs = sorted((row for row in rows if row.ratio == r), key=lambda x: x.layer)
        if len(rs) < 2:
            continue
        for m in metrics:
            vals = [row.value(m) for row in rs]
            inv = sum(1 for a, b in zip(vals, vals[1:]) if b < a)
            trend[f"{m}, r={r}"] = {"spearman": spearman([row.layer for row in rs], vals), "inversions": inv,
                                    "layers": [row.layer for row in rs], "values": vals}
    return trend


# -- linear probe -----------------------------------------------------------------------------------
def _split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n < 10:
        raise ValueError(f"a linear probe needs at least 10 labelled images, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(2, int(round(n * test_fraction)))
    return perm[n_test:], perm[:n_test]


def _ridge_fit(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """Closed-form ridge: W = argmin ||xW - y||^2 + lam * n * ||W||^2, in the cheaper of primal/dual form."""
    n, d = x.shape
    if d <= n:
        return torch.linalg.solve(x.T @ x + lam * n * torch.eye(d, dtype=x.dtype), x.T @ y)
    return x.T @ torch.linalg.solve(x @ x.T + lam * n * torch.eye(n, dtype=x.dtype), y)


def _one_hot_slots(labels: torch.Tensor, num_classes: list[int]) -> torch.Tensor:
    return torch.cat([F.one_hot(labels[:, j], c) for j, c in enumerate(num_classes)], dim=1).double()


def _slot_accuracy(scores: torch.Tensor, labels: torch.Tensor, num_classes: list[int]) -> float:
    accs, o = [], 0
    for j, c in enumerate(num_classes):
        accs.append((scores[:, o:o + c].argmax(1) == labels[:, j]).double().mean().item())
        o += c
    return sum(accs) / len(accs)


def linear_probe_accuracy(
    features: torch.Tensor, labels: torch.Tensor, split: tuple[torch.Tensor, torch.Tensor], *, seed: int = 0,
    lambdas: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
) -> float:
    """Test accuracy (mean over label slots) of a ridge classifier on standardised ``features`` (N, D).

    ``labels`` (N, K): K label slots (e.g. one class per scene quadrant), each one-hot regressed; the
    ridge strength is chosen on a fifth of the training split, then the probe is refitted on all of it.
    """
    labels = labels[:, None] if labels.ndim == 1 else labels
    if (labels < 0).any():
        raise ValueError("labels must be non-negative class indices")
    num_classes = [int(labels[:, j].max()) + 1 for j in range(labels.shape[1])]
    train, test = split
    x = features.double()

    def fit_eval(tr: torch.Tensor, ev: torch.Tensor, lam: float) -> float:
        mu, sd = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
        xt, xe = (x[tr] - mu) / sd, (x[ev] - mu) / sd
        y = _one_hot_slots(labels[tr], num_classes)
        w = _ridge_fit(xt, y - y.mean(0), lam)
        return _slot_accuracy(xe @ w + y.mean(0), labels[ev], num_classes)

    g = torch.Generator().manual_seed(seed + 1)
    inner = train[torch.randperm(len(train), generator=g)]
    n_val = max(1, len(inner) // 5)
    best = max(lambdas, key=lambda lam: fit_eval(inner[n_val:], inner[:n_val], lam))
    return fit_eval(train, test, best)
