"""laco: layer-wise visual token compression for multimodal LLMs."""

__version__ = "0.1.0"
