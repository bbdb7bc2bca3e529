"""laco's version (one place: ``laco.__version__``, the model card and remote-code bundles read it)."""

__version__ = "0.1.0"
