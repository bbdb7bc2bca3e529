"""``laco gpu-check``: the one prepared check for a lent GPU (``scripts/gpu_check.sh`` wraps it).

Built for the lent device image (torch 2.11, transformers 5.17, accelerate, peft; no ``datasets``, no
network; laco runs from ``PYTHONPATH=src``), it runs, each step in its own process with its own time cap,
all inside one overall budget (default 450 s, under the 8 minutes the issue allows):

=====================  ==============================================================================
``env``                versions, the GPU, ``nvidia-smi`` (in this process)
``tests``              ``pytest -m gpu`` on the ``gpu``-marked tests (junit XML kept)
``train``              a short 1-GPU ``laco train`` of the tiny config, bf16, on toy data written here
``bench-<llm>-b<N>``   ``laco bench`` SigLIP-so400m-384 + Qwen2-0.5B / Qwen2-7B, batch 1 and 8, bf16, CUDA
                       events: none / laco@post / laco@1/4, every part (encode+prefill, generate, both
                       training stages, ...)
=====================  ==============================================================================

A step that fails or runs over its cap is recorded (exit code, log tail) and the next one runs. Then
everything is packed for the device tool's return limits (at most 8 files, 2 folders deep): ``summary.md``,
``summary.json``, ``gpu_check.tar.gz`` (logs, junit XML, bench results, training metrics; files over 4 MiB
left out and listed) and each bench's markdown report as ``bench_<stem>.md``.

``--dry-run`` prints the plan, then runs the same steps on the CPU at tiny shapes (tiny-siglip +
tiny-qwen2, 1 timed round, a few training steps), with ``datasets`` made unimportable as on the device,
and writes the same layout: it checks everything but the GPU itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

#: the issue's shapes: one vision encoder, two LLMs, two batch sizes
VISION = "siglip-so400m-384"
LLMS = ("qwen2-0.5b", "qwen2-7b")
BATCHES = (1, 8)
METHODS = "none,post,laco@1/4"
#: what the dry run substitutes (same code path, shapes that run on a CPU in seconds)
DRY_VISION, DRY_LLM = "tiny-siglip", "tiny-qwen2"
MAX_FILE_BYTES = 4 * 2**20  # files larger than this stay out of the archive (e.g. checkpoints)
PACK_RESERVE_S = 20.0  # kept back from the budget for the summary and the archive
MIN_STEP_S = 10.0  # a step with less time left than this is skipped, not started


@dataclass
class Step:
    """One command of the plan: ``argv`` runs with ``cwd`` = the work folder; ``cap_s`` bounds its time."""

    name: str
    argv: list[str]
    cap_s: float
    result_dir: str | None = None  # bench steps: where its results land (relative to the work folder)


@dataclass
class StepResult:
    name: str
    status: str  # ok | failed | timeout | skipped
    returncode: int | None
    wall_s: float
    timeout_s: float
    log: str  # relative to the work folder
    tail: str = ""  # the log's last lines
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckConfig:
    out: Path
    dry_run: bool = False
    budget_s: float = 450.0
    repeats: int = 7
    warmup: int = 1
    only: tuple[str, ...] = ()  # step names to run (empty: all)
    python: str = sys.executable

    def __post_init__(self):
        if self.budget_s < PACK_RESERVE_S + MIN_STEP_S:
            raise ValueError(f"--budget must be at least {PACK_RESERVE_S + MIN_STEP_S:.0f} s, got {self.budget_s:g}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"need --repeats >= 1 and --warmup >= 0, got {self.repeats} and {self.warmup}")


def source_root() -> Path:
    """The folder that holds the ``laco`` package (``src`` in a checkout): put on the steps' PYTHONPATH."""
    return Path(__file__).resolve().parents[2]  # src/laco/bench/gpu_check.py -> src


def tests_dir() -> Path | None:
    """The checkout's ``tests`` folder (``None`` for an installed laco without one)."""
    d = source_root().parent / "tests"
    return d if (d / "test_gpu.py").is_file() else None


def plan(cfg: CheckConfig) -> list[Step]:
    """The steps in order (``cfg.only`` filters them; an unknown name is an error)."""
    py = [cfg.python]
    steps = [Step("env", [], 30)]
    tests = tests_dir()
    if tests is not None:
        steps.append(Step("tests", py + ["-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                                         f"--junitxml={Path('tests.xml').as_posix()}", str(tests / "test_gpu.py"),
                                         "--rootdir", str(tests.parent)], 120))
    steps.append(Step("train", py + ["-m", "laco", "train", "train/tiny_bf16.yaml"], 120))
    vision, llms = (DRY_VISION, (DRY_LLM,)) if cfg.dry_run else (VISION, LLMS)
    repeats, warmup = (1, 0) if cfg.dry_run else (cfg.repeats, cfg.warmup)
    for llm in llms:
        for batch in BATCHES:
            name = f"bench-{llm}-b{batch}"
            argv = py + ["-m", "laco", "bench", "--vision", vision, "--llm", llm, "--methods", METHODS,
                         "--batch-size", str(batch), "--device", "cpu" if cfg.dry_run else "cuda",
                         "--dtype", "bfloat16", "--warmup", str(warmup), "--repeats", str(repeats),
                         "--new-tokens", "4" if cfg.dry_run else "16", "--out", "bench"]
            if cfg.dry_run:
                argv += ["--threads", "1"]
            steps.append(Step(name, argv, 150 if "7b" in llm else 100, result_dir="bench"))
    if cfg.only:
        names = [s.name for s in steps]
        unknown = [n for n in cfg.only if n not in names]
        if unknown:
            raise ValueError(f"--only: unknown step(s) {', '.join(unknown)}; the plan has {', '.join(names)}")
        steps = [s for s in steps if s.name in cfg.only]
    return steps


def format_plan(cfg: CheckConfig, steps: list[Step]) -> str:
    mode = "DRY RUN on the CPU at tiny shapes" if cfg.dry_run else "GPU run"
    lines = [f"laco gpu-check: {mode}; budget {cfg.budget_s:.0f} s; results -> {cfg.out}"]
    for s in steps:
        cmd = " ".join(s.argv[1:]) if s.argv else "(versions, GPU, nvidia-smi)"
        lines.append(f"  {s.name:<22} cap {s.cap_s:>4.0f} s  {cmd}")
    return "\n".join(lines)


# -- preparing the work folder ----------------------------------------------------------------------
def write_train_config(work: Path, dry_run: bool) -> Path:
    """Toy data and ``configs/train/tiny.yaml`` made short and bf16, under ``work/train``."""
    import yaml

    from laco.data import write_toy_llava

    folder = work / "train"
    data_file = write_toy_llava(folder / "data", n=8 if dry_run else 64)
    tiny = source_root().parent / "configs" / "train" / "tiny.yaml"
    if not tiny.is_file():
        raise FileNotFoundError(f"laco gpu-check runs from a checkout: {tiny} is missing")
    cfg = yaml.safe_load(tiny.read_text())
    cfg.update(output_dir=str((folder / "run").resolve()), mixed_precision="bf16", save_every=0, progress=False,
               log_every=1)
    cfg["data"].update(path=str(data_file.resolve()), image_folder=str(data_file.parent.resolve()))
    for stage in cfg["stages"]:
        stage["epochs"] = 1 if dry_run else 2
    path = folder / "tiny_bf16.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _mimic_device_image(work: Path) -> Path:
    """A folder whose ``datasets`` package raises ImportError: first on PYTHONPATH, as on the device image."""
    shim = work / "_no_datasets" / "datasets"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text(
        'raise ImportError("datasets is not installed on the lent GPU image (laco gpu-check --dry-run mimics it)")\n')
    return shim.parent


def step_env(cfg: CheckConfig, work: Path) -> dict[str, str]:
    """The steps' environment: laco's source first on PYTHONPATH (no install there), unbuffered output."""
    paths = [str(source_root())]
    if cfg.dry_run:
        paths.insert(0, str(_mimic_device_image(work)))
    old = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + ([old] if old else [])), PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if cfg.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run never touches a GPU, even where one exists
    return env


# -- running ----------------------------------------------------------------------------------------
def environment_info() -> dict[str, Any]:
    import platform

    import torch
    import transformers

    from laco._version import __version__

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "versions": {"laco": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
    }
    for mod in ("accelerate", "peft", "datasets", "safetensors"):
        try:
            info["versions"][mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001 - recorded, not raised: absent packages are a finding here
            info["versions"][mod] = f"not importable ({type(err).__name__})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
                       "bf16": torch.cuda.is_bf16_supported()}
    if shutil.which("nvidia-smi"):
        try:
            info["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired) as err:
            info["nvidia_smi"] = f"failed: {err}"
    return info


def run_command(argv: list[str], *, cwd: Path, env: dict[str, str], log: Path, timeout_s: float) -> tuple[int | None, bool]:
    """Run ``argv`` with output to ``log``; kill its whole process group at ``timeout_s``. (returncode, timed out)."""
    with log.open("w") as f:
        f.write("$ " + " ".join(argv) + "\n")
        f.flush()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\n[laco gpu-check] killed after {timeout_s:.0f} s (the step's time cap)\n")
            return None, True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_step(step: Step, cfg: CheckConfig, work: Path, timeout_s: float, env: dict[str, str]) -> StepResult:
    log = work / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if step.name == "env":
        info = environment_info()
        (work / "env.json").write_text(json.dumps(info, indent=1))
        log.write_text(json.dumps({k: v for k, v in info.items() if k != "nvidia_smi"}, indent=1) + "\n"
                       + str(info.get("nvidia_smi", "")))
        gpu_ok = info["cuda_available"] or cfg.dry_run
        return StepResult(step.name, "ok" if gpu_ok else "failed", 0 if gpu_ok else 1, time.monotonic() - t0,
                          timeout_s, log.relative_to(work).as_posix(), details=info)
    if step.name == "train":
        write_train_config(work, cfg.dry_run)
    code, timed_out = run_command(step.argv, cwd=work, env=env, log=log, timeout_s=timeout_s)
    status = "timeout" if timed_out else "ok" if code == 0 else "failed"
    res = StepResult(step.name, status, code, time.monotonic() - t0, timeout_s, log.relative_to(work).as_posix(),
                     tail=_tail(log))
    if step.name == "tests":
        res.details = junit_counts(work / "tests.xml")
    elif step.name == "train":
        res.details = train_details(work / "train" / "run")
    return res


def junit_counts(path: Path) -> dict[str, Any]:
    """tests / failures / errors / skipped (+ skip reasons) from pytest's junit XML."""
    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["skip_reasons"] = sorted({s.get("message", "") for s in suite.iter("skipped")})
    return counts


def train_details(run_dir: Path) -> dict[str, Any]:
    """Steps and first/last loss from the run's ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    losses = []
    for line in path.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if "loss" in rec:
            losses.append(rec["loss"])
    return {"logged_steps": len(losses), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


def bench_headlines(work: Path) -> list[dict[str, Any]]:
    """Per bench result: laco@1/4 against laco@post, the median (range) of per-round ratios vs predicted."""
    out = []
    for path in sorted((work / "bench").rglob("*.json")):
        data = json.loads(path.read_text())
        sp = data.get("analysis", {}).get("speedups", {}).get("laco@1/4", {})
        cfg = data["config"]
        out.append({"result": path.relative_to(work).as_posix(), "llm": cfg["llm"],
                    "batch": cfg["work"]["batch_size"], "dtype": cfg["dtype"],
                    "speedups": {p: {"measured": sp[p]["paired"]["median"], "low": sp[p]["low"], "high": sp[p]["high"],
                                     "predicted": sp[p]["predicted"]}
                                 for p in ("encode_prefill", "generate", "train_stage1", "train_stage2") if p in sp}})
    return out


def run_check(cfg: CheckConfig, *, runner: Callable[..., StepResult] = run_step,
              echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run the plan inside the budget and pack the results into ``cfg.out``; returns the summary."""
    import torch

    if not cfg.dry_run and not torch.cuda.is_available():
        raise ValueError("no CUDA device here: `laco gpu-check` is for the lent GPU; "
                         "use --dry-run to check the plan on the CPU")
    deadline = time.monotonic() + cfg.budget_s
    steps = plan(cfg)
    echo(format_plan(cfg, steps))
    cfg.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="laco-gpu-check-"))
    env = step_env(cfg, work)
    results: list[StepResult] = []
    try:
        for step in steps:
            left = deadline - time.monotonic() - PACK_RESERVE_S
            if left < MIN_STEP_S:
                res = StepResult(step.name, "skipped", None, 0.0, 0.0, "", tail=f"only {max(left, 0):.0f} s left")
            else:
                res = runner(step, cfg, work, min(step.cap_s, left), env)
            results.append(res)
            echo(f"{res.name:<22} {res.status:<8} {res.wall_s:6.1f} s")
        summary = {"mode": "dry-run" if cfg.dry_run else "gpu", "budget_s": cfg.budget_s,
                   "plan": [asdict(s) for s in steps], "steps": [asdict(r) for r in results],
                   "bench": bench_headlines(work), "ok": all(r.status == "ok" for r in results)}
        pack(work, cfg.out, summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary


# -- packing ----------------------------------------------------------------------------------------
def pack(work: Path, out: Path, summary: dict[str, Any]) -> list[Path]:
    """Write ``summary.json``, ``summary.md``, ``gpu_check.tar.gz`` and ``bench_<stem>.md`` into ``out``.

    At most 8 flat files (the device tool returns no more); files over ``MAX_FILE_BYTES`` and the dry run's
    import shim stay out of the archive and are listed in the summary.
    """
    from laco.io import atomic_write, atomic_write_text

    left_out = []
    archive = out / "gpu_check.tar.gz"

    def write_tar(tmp: Path) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(p for p in work.rglob("*") if p.is_file()):
                rel = path.relative_to(work)
                if rel.parts[0] == "_no_datasets":
                    continue
                if path.stat().st_size > MAX_FILE_BYTES:
                    left_out.append(f"{rel.as_posix()} ({path.stat().st_size / 2**20:.1f} MiB)")
                    continue
                tar.add(path, arcname=f"gpu_check/{rel.as_posix()}")

    atomic_write(archive, write_tar, suffix=".tar.gz")
    summary["archive"] = {"file": archive.name, "left_out": left_out}
    written = [archive]
    for md in sorted((work / "bench").rglob("*.md"))[:5]:  # 5 + 3 = the device tool's 8 files
        dest = out / f"bench_{md.name}"
        shutil.copyfile(md, dest)
        written.append(dest)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    atomic_write_text(out / "summary.md", summary_markdown(summary))
    return written + [out / "summary.json", out / "summary.md"]


def summary_markdown(summary: dict[str, Any]) -> str:
    env = next((s["details"] for s in summary["steps"] if s["name"] == "env"), {})
    gpu = env.get("gpu", {})
    lines = [f"# laco gpu-check ({summary['mode']})", "",
             f"Device: {gpu.get('name', 'no GPU')}"
             + (f", {gpu['memory_gib']} GiB, capability {gpu['capability']}" if gpu else "")
             + ". Versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()) + ".", "",
             *(["Dry run: CPU, tiny shapes; `datasets` unimportable in the steps, as on the device image.", ""]
               if summary["mode"] == "dry-run" else []),
             f"Overall: {'all steps ok' if summary['ok'] else '**some steps did not pass**'} "
             f"(budget {summary['budget_s']:.0f} s).", "",
             "| step | status | wall | details |", "|---|---|---|---|"]
    for s in summary["steps"]:
        d = s["details"] if s["name"] != "env" else {}
        detail = ", ".join(f"{k} {v}" for k, v in d.items() if k != "skip_reasons")
        if d.get("skip_reasons"):
            detail += "; skipped: " + "; ".join(d["skip_reasons"])
        lines.append(f"| {s['name']} | {s['status']} | {s['wall_s']:.1f} s | {detail or '-'} |")
    if summary["bench"]:
        lines += ["", "## laco@1/4 vs laco@post: median of per-round ratios (range) / FLOP-predicted", "",
                  "| LLM | batch | encode + prefill | generate | train stage 1 | train stage 2 |", "|---|---|---|---|---|---|"]
        for b in summary["bench"]:
            cells = [(f"{s['measured']:.2f}x ({s['low']:.2f}-{s['high']:.2f}) / {s['predicted']:.2f}x"
                      if (s := b["speedups"].get(p)) else "-")
                     for p in ("encode_prefill", "generate", "train_stage1", "train_stage2")]
            lines.append(f"| {b['llm']} | {b['batch']} | " + " | ".join(cells) + " |")
    failed = [s for s in summary["steps"] if s["status"] not in ("ok",)]
    for s in failed:
        lines += ["", f"## {s['name']}: {s['status']}", "", "```", s["tail"], "```"]
    if summary.get("archive", {}).get("left_out"):
        lines += ["", "Left out of the archive (too large): " + ", ".join(summary["archive"]["left_out"])]
    return "\n".join(lines) + "\n"


__all__ = ["CheckConfig", "Step", "StepResult", "plan", "format_plan", "run_check", "run_step", "pack",
           "junit_counts", "write_train_config"]
