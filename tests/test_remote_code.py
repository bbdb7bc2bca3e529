"""Remote-code export (``laco.model.remote``, ``laco export``): a saved model + processor load with
``trust_remote_code=True`` in a Python where ``import laco`` fails, and generate the tokens laco generates."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.compat  # also runs in the oldest-transformers CI venv

#: the subprocess: laco cannot be imported (``sys.modules['laco'] = None``, no src on the path); it loads the
#: folder through the Auto classes with remote code, runs the chat path on a fixed image and prints the tokens
REMOTE_SCRIPT = """
import json, sys
sys.modules["laco"] = None
try:
    import laco
except ImportError:
    pass
else:
    raise SystemExit("laco is importable")
import numpy as np
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

folder = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
proc = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 72, 3), dtype=np.uint8))
messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what is it"}]}]
inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                  return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
print(json.dumps({"tokens": out[0].tolist(), "model": type(model).__module__, "processor": type(proc).__module__}))
"""


def _laco_tokens(folder: Path) -> list[int]:
    """The same generation as REMOTE_SCRIPT, through laco's own classes."""
    from PIL import Image

    from laco.model import LaCoForConditionalGeneration, LaCoProcessor

    model = LaCoForConditionalGeneration.from_pretrained(folder).eval()
    proc = LaCoProcessor.from_pretrained(folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 72, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what is it"}]}]
    inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=8, do_sample=False)[0].tolist()


def _laco_imports(text: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "laco"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "laco":
            found.append(node.module)
    return found


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory):
    from laco.model.testing import tiny_laco_model, tiny_laco_processor

    folder = tmp_path_factory.mktemp("export") / "tiny_laco_remote"
    model = tiny_laco_model(seed=3)
    model.save_pretrained(folder, remote_code=True)
    tiny_laco_processor(model.config).save_pretrained(folder, remote_code=True)
    return folder


def test_saved_folder_has_code_and_auto_map(remote_dir):
    config = json.loads((remote_dir / "config.json").read_text())
    processor = json.loads((remote_dir / "processor_config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_laco.LaCoForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_laco.LaCoConfig"
    assert processor["auto_map"]["AutoProcessor"] == "processing_laco.LaCoProcessor"
    for entry in ("configuration_laco.py", "modeling_laco.py", "processing_laco.py"):
        assert (remote_dir / entry).is_file()
    leftovers = {p.name: _laco_imports(p.read_text()) for p in remote_dir.glob("*.py")}
    assert {k: v for k, v in leftovers.items() if v} == {}


def test_bundle_covers_lazy_imports_and_is_deterministic():
    """Imports inside functions (config.build_vision_tower -> encoders, save_pretrained -> card) are bundled too,
    and two runs give the same files."""
    from laco.model.remote import bundle_sources

    files = bundle_sources()
    assert files == bundle_sources()
    assert {"laco_model_card.py", "laco_flops.py", "laco_compressors.py", "laco_model_anyres.py"} <= set(files)
    config_src = files["laco_model_config.py"]
    assert "    from .laco_compressors import list_compressors" in config_src  # was a function-level laco import
    assert "    from .laco_encoders import compress_encoder" in config_src  # the tower builder lives in config (#15)


def test_bundle_rejects_what_it_cannot_rewrite(tmp_path, monkeypatch):
    from laco.model import remote

    pkg = tmp_path / "laco_fake_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("def f():\n    import laco.ops\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="cannot bundle `import laco.ops`"):
        remote._bundle_module("laco_fake_pkg.mod")


def test_remote_code_loads_without_laco_and_generates_identical_tokens(remote_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")  # keep the user's cache clean
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(remote_dir)], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["model"].startswith("transformers_modules.") and got["processor"].startswith("transformers_modules.")
    assert got["tokens"] == _laco_tokens(remote_dir)


def test_export_cli_copies_and_adds_code(tmp_path):
    from typer.testing import CliRunner

    from laco.cli import app
    from laco.model.testing import save_tiny_mllm

    src = tmp_path / "plain"
    save_tiny_mllm(src)
    assert "auto_map" not in json.loads((src / "config.json").read_text())
    result = CliRunner().invoke(app, ["export", str(src), "--out", str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "exported"
    assert "auto_map" in json.loads((out / "config.json").read_text())
    assert "auto_map" in json.loads((out / "processor_config.json").read_text())
    assert (out / "modeling_laco.py").is_file() and not (src / "modeling_laco.py").exists()
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    again = CliRunner().invoke(app, ["export", str(src), "--out", str(out)])
    assert isinstance(again.exception, FileExistsError)  # `laco` prints it as one line (user_error_line)


def test_export_rejects_a_non_laco_folder(tmp_path):
    from laco.model.remote import export

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="not 'laco'"):
        export(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export(tmp_path / "missing")
