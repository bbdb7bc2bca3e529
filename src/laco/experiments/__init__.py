"""Experiments on the embedded data: the pretrained encoder (``pretrain``) and ``laco compare`` (``compare``)."""
