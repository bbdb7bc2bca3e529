"""Remote-code export: a saved LaCo model that loads with ``trust_remote_code=True`` where laco is not installed.

``add_remote_code(folder)`` writes the code next to the weights and points ``auto_map`` at it::

    configuration_laco.py   from .laco_model_config import LaCoConfig            (entry files, named as HF names them)
    modeling_laco.py        from .laco_model_modeling import LaCoForConditionalGeneration
    processing_laco.py      from .laco_model_processing import LaCoProcessor
    laco_model_config.py    laco/model/config.py, laco imports rewritten to relative ones
    laco_ops_grid.py ...    every other module of the import closure, one flat file each

The bundle is generated from the installed laco source, never kept by hand: the import closure of
``laco.model.{config,modeling,processing}`` (imports inside functions included) is followed through the
source, every module becomes one flat file (``laco/ops/grid.py`` -> ``laco_ops_grid.py``; a package's
``__init__.py`` -> ``laco_ops.py``) and every ``from laco.x import name`` becomes ``from .laco_x import name``.
transformers' dynamic-module loader copies a folder's files that are named by ``from .name import`` lines
(recursively) and refuses a file whose imports name a package that is not installed, so no ``laco`` import
may remain (``bundle_sources`` raises if one would). The output depends only on the source: deterministic.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from pathlib import Path

#: entry file (without .py) -> (laco module, class); auto_map points at these
ENTRIES: dict[str, tuple[str, str]] = {
    "configuration_laco": ("laco.model.config", "LaCoConfig"),
    "modeling_laco": ("laco.model.modeling", "LaCoForConditionalGeneration"),
    "processing_laco": ("laco.model.processing", "LaCoProcessor"),
}
#: auto_map of config.json (processor_config.json gets the AutoProcessor entry)
CONFIG_AUTO_MAP = {
    "AutoConfig": "configuration_laco.LaCoConfig",
    "AutoModelForImageTextToText": "modeling_laco.LaCoForConditionalGeneration",
    "AutoProcessor": "processing_laco.LaCoProcessor",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": CONFIG_AUTO_MAP["AutoProcessor"]}
ROOT = "laco"


def flat_name(module: str) -> str:
    """``laco.model.config`` -> ``laco_model_config`` (the bundle's file name, without .py)."""
    return module.replace(".", "_")


def _source_file(module: str) -> Path | None:
    """The installed source file of ``module`` (a package: its ``__init__.py``); None if it is not a module."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def _laco_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of laco (module level, in functions, under TYPE_CHECKING), in source order."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == ROOT for a in node.names):
            found.append(node)
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == ROOT):
            found.append(node)
    return sorted(found, key=lambda n: n.lineno)


def _rewrite(node: ast.Import | ast.ImportFrom, where: str) -> tuple[list[str], list[str]]:
    """(replacement lines without indentation, laco modules they need) for one laco import statement."""
    if isinstance(node, ast.Import) or node.level:
        raise ValueError(f"{where}: cannot bundle `{ast.unparse(node)}`; write `from laco.x import name`")
    lines, needs, names = [], [], []
    for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        if alias.name != "*" and _source_file(sub) is not None:  # a submodule: `from laco.model import anyres`
            # `from . import x` is invisible to transformers' file copier; the first line names the file for it
            lines += [f"from .{flat_name(sub)} import __name__ as _{flat_name(sub)}  # noqa: F401 (copies the file)",
                      f"from . import {flat_name(sub)} as {alias.asname or alias.name}"]
            needs.append(sub)
        else:
            names.append(alias.name + (f" as {alias.asname}" if alias.asname else ""))
    if names:
        if node.module == ROOT:  # laco/__init__.py is the lazy CLI-facing package: not bundled
            raise ValueError(f"{where}: cannot bundle `{ast.unparse(node)}`; import from the defining laco submodule")
        lines.insert(0, f"from .{flat_name(node.module)} import {', '.join(names)}")
        needs.append(node.module)
    return lines, needs


def _bundle_module(module: str) -> tuple[str, list[str]]:
    """(the flat file's text, the laco modules it imports) for one module of the closure."""
    path = _source_file(module)
    if path is None:
        raise ValueError(f"{module} is not importable from the installed laco")
    text = path.read_text(encoding="utf-8")
    src = text.splitlines()
    needs: list[str] = []
    for node in reversed(_laco_imports(ast.parse(text, filename=str(path)))):  # bottom-up: line numbers stay valid
        where = f"{module} line {node.lineno}"
        indent = src[node.lineno - 1][: node.col_offset]
        if indent.strip():
            raise ValueError(f"{where}: an import sharing its line with other code cannot be rewritten")
        lines, deps = _rewrite(node, where)
        src[node.lineno - 1 : node.end_lineno] = [indent + line for line in lines]
        needs += deps
    rel = path.relative_to(_source_file(ROOT).parent.parent).as_posix()
    header = f"# Generated by `laco export` from {rel}; do not edit (regenerate with laco).\n"
    return header + "\n".join(src) + "\n", needs


def bundle_sources() -> dict[str, str]:
    """File name -> text of the remote-code bundle: the import closure of the entry modules + the entry files."""
    files: dict[str, str] = {}
    todo = [module for module, _ in ENTRIES.values()]
    done: set[str] = set()
    while todo:
        module = todo.pop()
        if module in done:
            continue
        done.add(module)
        text, needs = _bundle_module(module)
        files[f"{flat_name(module)}.py"] = text
        todo += needs
    for entry, (module, cls) in ENTRIES.items():
        files[f"{entry}.py"] = (f"# Generated by `laco export`: the class auto_map names (code in {flat_name(module)}.py).\n"
                                f"from .{flat_name(module)} import {cls}\n\n__all__ = [\"{cls}\"]\n")
    return dict(sorted(files.items()))


def _add_auto_map(path: Path, auto_map: dict[str, str]) -> None:
    from laco.io import atomic_write_text

    data = json.loads(path.read_text(encoding="utf-8"))
    data["auto_map"] = {**data.get("auto_map", {}), **auto_map}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def add_remote_code(folder: str | os.PathLike) -> list[str]:
    """Write the bundle into a saved LaCo folder and ``auto_map`` into its config.json / processor_config.json
    (whichever exist). Returns the written code files' names. Idempotent."""
    from laco.io import atomic_write_text

    folder = Path(folder)
    config_file, processor_file = folder / "config.json", folder / "processor_config.json"
    if not config_file.is_file() and not processor_file.is_file():
        raise FileNotFoundError(f"{folder} has neither config.json nor processor_config.json: not a saved LaCo model")
    if config_file.is_file():
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        if model_type != "laco":
            raise ValueError(f"{config_file} has model_type {model_type!r}, not 'laco'")
    files = bundle_sources()
    for name, text in files.items():
        atomic_write_text(folder / name, text)
    if config_file.is_file():
        _add_auto_map(config_file, CONFIG_AUTO_MAP)
    if processor_file.is_file():
        _add_auto_map(processor_file, PROCESSOR_AUTO_MAP)
    return list(files)


def export(model_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """``laco export``: add remote code to ``model_dir`` in place, or to a copy of it at ``out_dir`` (must not exist)."""
    import shutil

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a saved LaCo model")
    target = model_dir
    if out_dir is not None and Path(out_dir).resolve() != model_dir.resolve():
        target = Path(out_dir)
        if target.exists():
            raise FileExistsError(f"{target} exists; choose a new folder (or omit --out to export in place)")
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model_dir, tmp)
        add_remote_code(tmp)
        os.replace(tmp, target)  # the folder appears complete or not at all
        return target
    add_remote_code(target)
    return target
