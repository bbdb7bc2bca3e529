"""Visual-token compressors behind one registry: ``create_compressor(name, dim, ratio, **kwargs)``.

Importing this package registers every built-in compressor.
"""

from laco.compressors.base import Compressor, create_compressor, list_compressors, register_compressor
from laco.compressors.patch_merge import PatchMergeLayer
from laco.compressors.conv import AvgPool, CAbstractor, LDPv2
from laco.compressors.attention import ToMe, TokenPacker

__all__ = [
    "AvgPool", "CAbstractor", "Compressor", "LDPv2", "PatchMergeLayer", "ToMe", "TokenPacker",
    "create_compressor", "list_compressors", "register_compressor",
]
