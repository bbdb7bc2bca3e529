"""The import layering of ``src/laco`` (docs/architecture.md, "Layers"): no module imports a package above
its own, and there are no import cycles, neither between modules nor between packages.

Every import counts, also those inside functions (laco keeps heavy imports lazy, but a lazy import is still
a dependency). Layers, low to high; a module may import its own layer and the layers below::

    0  laco.io, laco.safety, laco._version        file writes, guards and the version every layer uses
    1  laco.ops                                   token-grid ops
    2  laco.compressors                           compressors, the method/layer grammar (spec)
    3  laco.encoders, laco.flops                  the layer loop, analytic FLOPs
    4  laco.model                                 the HF MLLM, conversion, encoder sources
    5  laco.data, laco.train                      data, collator, image folders; training, optimiser
    6  laco.eval, laco.bench, laco.experiments, laco.serve
    7  laco.cli, laco (the lazy facade), laco.__main__
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = {
    "laco.io": 0, "laco.safety": 0, "laco._version": 0,
    "laco.ops": 1,
    "laco.compressors": 2,
    "laco.encoders": 3, "laco.flops": 3,
    "laco.model": 4,
    "laco.data": 5, "laco.train": 5,
    "laco.eval": 6, "laco.bench": 6, "laco.experiments": 6, "laco.serve": 6,
    "laco.cli": 7, "laco.__main__": 7, "laco": 7,
}
#: justified exceptions (module -> module), each named in docs/architecture.md
ALLOWED = {
    # `python -m laco.train` (what accelerate launch / torchrun need) is an entry point that runs `laco train`:
    # a program, not library code, so it may call the CLI above its package
    ("laco.train.__main__", "laco.cli"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / "laco").rglob("*.py")):
        parts = p.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The laco modules ``name`` imports anywhere in its file (``from pkg import sub`` names the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # "laco.model.modeling.X" -> the module that defines it
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _layer(module: str) -> tuple[str, int]:
    key = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return key, LAYERS[key]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    assert all(m == "laco" or m.startswith("laco.") for m in _modules())
    missing = [m for m in _modules() if not any(m == k or m.startswith(k + ".") for k in LAYERS)]
    assert not missing, f"modules without a layer (add them to LAYERS and docs/architecture.md): {missing}"


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for src, targets in _graph().items():
        (skey, slayer) = _layer(src)
        for t in sorted(targets):
            tkey, tlayer = _layer(t)
            if tlayer > slayer and (src, t) not in ALLOWED and (src, tkey) not in ALLOWED:
                upward.append(f"{src} (layer {slayer}) imports {t} (layer {tlayer})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules():
    graph = {s: {t for t in ts if (s, _layer(t)[0]) not in ALLOWED} for s, ts in _graph().items()}
    # a package's __init__ re-exports its submodules: submodule -> own package edges are not dependencies
    graph = {s: {t for t in ts if not s.startswith(t + ".")} for s, ts in graph.items()}
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"


def test_no_import_cycles_between_packages():
    graph: dict[str, set[str]] = {}
    for s, ts in _graph().items():
        sk = _layer(s)[0]
        graph.setdefault(sk, set()).update(_layer(t)[0] for t in ts if _layer(t)[0] != sk and (s, _layer(t)[0]) not in ALLOWED)
    assert not _cycles(graph), f"package cycles: {_cycles(graph)}"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The test itself can fail: a lazy upward import inside a function is found."""
    fake = tmp_path / "laco"
    (fake / "ops").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "ops" / "__init__.py").write_text("def f():\n    from laco.cli import app\n    from . import grid\n")
    (fake / "ops" / "grid.py").write_text("")
    (fake / "cli.py").write_text("")
    modules = {"laco": fake / "__init__.py", "laco.ops": fake / "ops" / "__init__.py",
               "laco.ops.grid": fake / "ops" / "grid.py", "laco.cli": fake / "cli.py"}
    assert _imports("laco.ops", modules["laco.ops"], modules) == {"laco.cli", "laco.ops.grid"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
