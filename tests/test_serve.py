"""``laco.serve`` without vLLM: the plugin module is importable and light, the CPU post-install alias is right.

The engine tests are in tests/test_vllm.py (marked ``vllm``: they need the vLLM venv).
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys

from laco.serve import setup_cpu


def test_plugin_module_imports_without_vllm():
    code = "import sys, laco.serve as s; assert s.VLLM_MODEL_CLASS.startswith('laco.serve.vllm_model:'); " \
           "print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # vLLM loads the model class lazily, by name


def test_entry_point_names_register():
    eps = md.entry_points(group="vllm.general_plugins")
    laco_eps = [ep for ep in eps if ep.name == "laco"]
    if laco_eps:  # absent when laco runs from PYTHONPATH without an install
        assert laco_eps[0].value == "laco.serve:register"


def test_vllm_alias_metadata(tmp_path, monkeypatch):
    monkeypatch.setattr(setup_cpu.md, "version", lambda name: "0.32.0")
    info = setup_cpu.write_vllm_alias(tmp_path)
    dists = {d.metadata["Name"]: d for d in md.distributions(path=[str(tmp_path)])}
    assert set(dists) == {"vllm"}
    # vLLM's platform detection needs "cpu" in the version it reads for "vllm"
    assert dists["vllm"].version == "0.32.0+cpu"
    assert info.name == "vllm-0.32.0+cpu.dist-info"
    recorded = {line.split(",")[0] for line in (info / "RECORD").read_text().splitlines()}
    assert recorded == {f"{info.name}/{n}" for n in ("METADATA", "INSTALLER", "RECORD")}
