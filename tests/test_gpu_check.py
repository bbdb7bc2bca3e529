"""``laco gpu-check``: the plan, the budget, the results layout and the CPU dry run (no GPU needed).

The GPU steps themselves run only on a lent device; here every part that can run on a CPU is checked:
argument handling, the refusal without CUDA, the per-step time caps inside the overall budget, the
packing for the device tool's limits (at most 8 flat files), the ``gpu`` marker skipping without CUDA,
and the device image's missing ``datasets``.
"""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from laco.bench import gpu_check as gc
from laco.cli import app

TORCH_THREADS = 1


def test_plan_gpu_has_the_issues_shapes_and_dry_run_substitutes_tiny_cpu(tmp_path):
    steps = gc.plan(gc.CheckConfig(out=tmp_path))
    names = [s.name for s in steps]
    assert names == ["env", "tests", "train", "bench-qwen2-0.5b-b1", "bench-qwen2-0.5b-b8", "bench-qwen2-7b-b1",
                     "bench-qwen2-7b-b8"]
    for s in steps[3:]:
        a = s.argv
        opt = {a[i]: a[i + 1] for i in range(len(a) - 1) if a[i].startswith("--")}
        assert a[1:4] == ["-m", "laco", "bench"] and opt["--vision"] == "siglip-so400m-384"
        assert opt["--device"] == "cuda" and opt["--dtype"] == "bfloat16" and opt["--methods"] == "none,post,laco@1/4"
        assert opt["--batch-size"] in ("1", "8") and opt["--repeats"] == "7" and "--parts" not in a  # every part
    dry = gc.plan(gc.CheckConfig(out=tmp_path, dry_run=True))
    assert [s.name for s in dry][3:] == ["bench-tiny-qwen2-b1", "bench-tiny-qwen2-b8"]
    assert all("cuda" not in s.argv for s in dry)
    only = gc.plan(gc.CheckConfig(out=tmp_path, only=("env", "train")))
    assert [s.name for s in only] == ["env", "train"]
    with pytest.raises(ValueError, match="unknown step.*bench-gpt"):
        gc.plan(gc.CheckConfig(out=tmp_path, only=("bench-gpt",)))
    with pytest.raises(ValueError, match="--budget"):
        gc.CheckConfig(out=tmp_path, budget_s=5)


def test_cli_refuses_without_cuda_and_names_the_dry_run(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    res = CliRunner().invoke(app, ["gpu-check", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "--dry-run" in str(res.exception)
    res = CliRunner().invoke(app, ["gpu-check", "--dry-run", "--only", "nope", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "unknown step" in str(res.exception)
    (tmp_path / "file").write_text("x")
    res = CliRunner().invoke(app, ["gpu-check", "--dry-run", "--out", str(tmp_path / "file")])
    assert res.exit_code != 0 and "existing file" in str(res.exception)


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_budget_caps_each_step_and_skips_what_no_longer_fits(tmp_path, monkeypatch):
    """Steps get min(cap, time left - pack reserve); a step with under MIN_STEP_S left is skipped, not started."""
    clock = FakeClock()
    monkeypatch.setattr(gc.time, "monotonic", clock)
    given = {}

    def runner(step, cfg, work, timeout_s, env):
        given[step.name] = timeout_s
        clock.t += 70.0  # every step takes 70 s
        log = work / "logs" / f"{step.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("ran\n")
        return gc.StepResult(step.name, "ok", 0, 70.0, timeout_s, log.relative_to(work).as_posix())

    cfg = gc.CheckConfig(out=tmp_path / "out", dry_run=True, budget_s=200)
    summary = gc.run_check(cfg, runner=runner, echo=lambda s: None)
    status = {s["name"]: s["status"] for s in summary["steps"]}
    # 200 s budget - 20 s reserve: env gets min(30, 180); tests min(120, 110); train min(120, 40); then 0 s left
    assert given == {"env": 30, "tests": 110, "train": 40}
    assert status == {"env": "ok", "tests": "ok", "train": "ok", "bench-tiny-qwen2-b1": "skipped",
                      "bench-tiny-qwen2-b8": "skipped"}
    assert summary["ok"] is False and "skipped" in (tmp_path / "out" / "summary.md").read_text()


def test_pack_layout_fits_the_device_tools_limits(tmp_path):
    """At most 8 flat files with safe names; the archive holds the work folder; big files are left out and listed."""
    work, out = tmp_path / "work", tmp_path / "out"
    for i in range(7):  # more bench reports than fit: only 5 are copied out flat
        d = work / "bench" / "cuda-nvidia-h200"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"v_l{i}_b1.md").write_text(f"# report {i}\n")
    (work / "logs").mkdir()
    (work / "logs" / "tests.log").write_text("4 passed\n")
    (work / "train").mkdir()
    (work / "train" / "model.safetensors").write_bytes(b"\0" * (gc.MAX_FILE_BYTES + 1))
    (work / "_no_datasets").mkdir()
    (work / "_no_datasets" / "x.py").write_text("")
    out.mkdir()
    summary = {"mode": "gpu", "budget_s": 450, "steps": [], "bench": [], "ok": True}
    written = gc.pack(work, out, summary)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()) and sorted(p.name for p in written) == files
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") for n in files)
    assert {"summary.md", "summary.json", "gpu_check.tar.gz"} <= set(files)
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu_check/logs/tests.log" in names and "gpu_check/bench/cuda-nvidia-h200/v_l6_b1.md" in names
    assert not any("model.safetensors" in n or "_no_datasets" in n for n in names)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["archive"]["left_out"] == ["train/model.safetensors (4.0 MiB)"]


def test_run_command_kills_a_step_at_its_cap(tmp_path):
    log = tmp_path / "s.log"
    code, timed_out = gc.run_command([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                     cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, log=log, timeout_s=2)
    assert (code, timed_out) == (None, True)
    text = log.read_text()
    assert "started" in text and "killed after 2 s" in text


def test_dry_run_steps_cannot_import_datasets_like_the_device_image(tmp_path):
    env = gc.step_env(gc.CheckConfig(out=tmp_path, dry_run=True), tmp_path)
    res = subprocess.run([sys.executable, "-c", "import datasets"], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "lent GPU image" in res.stderr
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert str(gc.source_root()) in env["PYTHONPATH"].split(":")


def test_load_llava_and_collate_without_datasets(tmp_path, monkeypatch):
    """The tiny training path needs no ``datasets`` (the lent GPU image has none): records stay a list."""
    from laco.data import load_llava, write_toy_llava

    path = write_toy_llava(tmp_path / "toy", n=3)
    with_ds = load_llava(path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    without = load_llava(path)
    assert isinstance(without.records, list) and len(without) == len(with_ds) == 3
    for i in range(3):
        a, b = with_ds[i], without[i]
        assert a["id"] == b["id"] and a["messages"] == b["messages"] and len(a["images"]) == len(b["images"]) == 1


def test_dry_run_skips_gpu_tests_here_and_writes_the_layout(tmp_path):
    """A real dry run of the tests step: the gpu-marked tests are collected and skipped without CUDA."""
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "laco", "gpu-check", "--dry-run", "--only", "tests",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((out / "summary.json").read_text())
    tests = next(s for s in summary["steps"] if s["name"] == "tests")
    assert tests["status"] == "ok" and tests["details"]["tests"] >= 4
    assert tests["details"]["skipped"] == tests["details"]["tests"]
    assert tests["details"]["skip_reasons"] == ["needs a CUDA device"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.json", "summary.md"]


@pytest.mark.slow
def test_full_dry_run(tmp_path):
    """Every step of the plan on the CPU (about a minute): training without datasets in bf16, both benches."""
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(Path(gc.source_root()).parent / "scripts" / "gpu_check.sh"), "--dry-run",
                          "--out", str(out)], capture_output=True, text=True, timeout=900,
                         env={**__import__("os").environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and [b["batch"] for b in summary["bench"]] == [1, 8]
    train = next(s for s in summary["steps"] if s["name"] == "train")
    assert train["details"]["logged_steps"] >= 2 and train["details"]["last_loss"] > 0
    assert len(list(out.iterdir())) <= 8
