"""Data for LaCo MLLMs: LLaVA-format records and the training collator (plus embedded generators).

    from laco.data import load_llava, LlavaCollator
    ds = load_llava("train.json", image_folder="images/", on_bad_record="skip")   # validated, images lazy
    collate = LlavaCollator(processor, max_length=2048)                           # chat template + labels
    batch = collate([ds[0], ds[1]])   # input_ids, attention_mask, labels (B, T); pixel_values (n_img, 3, H, W)

``laco.data.embedded`` builds offline evaluation/training scenes in the same LLaVA format.
"""

from laco.data.collator import IGNORE_INDEX, CollatorStats, EncodedSample, LlavaCollator
from laco.data.llava import (
    BadRecord,
    BadRecordError,
    LlavaDataset,
    load_llava,
    normalize_record,
    read_records,
    write_toy_llava,
)

__all__ = [
    "IGNORE_INDEX", "BadRecord", "BadRecordError", "CollatorStats", "EncodedSample", "LlavaCollator", "LlavaDataset",
    "load_llava", "normalize_record", "read_records", "write_toy_llava",
]
