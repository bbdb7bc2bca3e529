"""``laco compare``'s text side: the embedded conversations in ChatML, the small BPE tokenizer trained on
them, and tokenised splits with labels on the answers (and ``<|im_end|>``) only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from laco.data.embedded import EmbeddedDataset

# -- text: tokenizer and tokenised splits -----------------------------------------------------------
@dataclass
class TokenizedSplit:
    """Right-padded token ids of one split at one image-token count.

    input_ids / attention_mask / labels: (N, L); labels are -100 except on scored answer tokens
    (answer text + ``<|im_end|>``). image_index: (N,) row of the split's scene arrays.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_index: torch.Tensor
    task: list[str]
    turn: list[int]

    def __len__(self) -> int:
        return len(self.image_index)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``idx``, trimmed to the longest row (no all-pad columns)."""
        mask = self.attention_mask[idx]
        n = int(mask.sum(1).max())
        return self.input_ids[idx, :n], mask[:, :n], self.labels[idx, :n]


def _image_row(path: str) -> int:
    return int(Path(path).stem)  # "images/test/000123.png" -> 123


def conversations(ds: EmbeddedDataset, split: str) -> list[tuple[list[dict[str, str]], int, int, str, int]]:
    """(messages, image row, number of scored assistant turns at the end, task, turn) per sample.

    Train: the LLaVA records, every answer scored. Val/test: the eval JSONL rendered exactly as
    ``laco.eval`` renders it (history teacher-forced), only the final answer scored. User data
    (``userdata.UserDataset``) brings its own, in the same shape.
    """
    from laco.eval.evaluator import build_messages, load_records

    if not isinstance(ds, EmbeddedDataset):
        return ds.conversations(split)
    out = []
    if split == "train":
        for rec in ds.llava(split):
            msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                    for t in rec["conversations"]]
            out.append((msgs, _image_row(rec["image"]), sum(m["role"] == "assistant" for m in msgs), rec["task"], 1))
        return out
    for rec in load_records(ds.eval_file(split)):
        msgs = build_messages(rec) + [{"role": "assistant", "content": str(rec.answer)}]
        out.append((msgs, _image_row(str(rec.images[0])), 1, rec.task, rec.turn))
    return out


def build_tokenizer(ds: EmbeddedDataset, vocab_size: int):
    """A small byte-level BPE trained on the training conversations (the model engineer's trainer)."""
    from laco.model.tokenizer import train_small_tokenizer

    texts = [m["content"].replace("<image>\n", "") for msgs, *_ in conversations(ds, "train") for m in msgs]
    return train_small_tokenizer(texts, vocab_size)


def answer_marks(tok) -> tuple[str, str]:
    """The chat template's text between a user turn's content and the assistant's answer (``head``) and after the
    answer to the end of its turn marker (``tail``, trailing whitespace dropped): ChatML gives
    ``("<|im_end|>\\n<|im_start|>assistant\\n", "<|im_end|>")``. The tail is scored with the answer (it ends the turn)."""
    user, answer = "laco-user-probe", "laco-answer-probe"
    text = tok.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                                   tokenize=False)
    if user not in text or answer not in text:
        raise ValueError("the tokenizer's chat template does not render message contents verbatim")
    a = text.index(answer)
    return text[text.index(user) + len(user):a], text[a + len(answer):].rstrip()


def tokenize_split(tok, convs: list, num_image_tokens: int, *, with_image: bool = True) -> TokenizedSplit:
    """Chat-template the conversations, expand ``<image>`` to ``num_image_tokens`` tokens, label the scored answers
    (and the template's end of turn, ``answer_marks``)."""
    head, tail = answer_marks(tok)
    texts, spans = [], []
    for msgs, _, n_scored, _, _ in convs:
        if not with_image:
            msgs = [{**m, "content": m["content"].replace("<image>\n", "")} for m in msgs]
        text = tok.apply_chat_template(msgs, tokenize=False)
        text = text.replace("<image>", "<image>" * num_image_tokens)
        # char spans of the scored answers: content + tail of the last n_scored assistant turns
        cur, found = 0, []
        for m in msgs:
            if m["role"] != "assistant":
                continue
            at = text.find(head + m["content"] + tail, cur)
            if at < 0:
                raise ValueError(f"the chat template does not render the answer {m['content']!r} verbatim after "
                                 f"{head!r}")
            start = at + len(head)
            end = start + len(m["content"]) + len(tail)
            found.append((start, end))
            cur = end
        texts.append(text)
        spans.append(found[len(found) - n_scored:])
    # the template writes every special token itself (a tokenizer's own BOS would come twice)
    enc = tok(texts, padding=True, return_offsets_mapping=True, return_tensors="pt", add_special_tokens=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]  # (N, L), (N, L, 2)
    labels = torch.full_like(ids, -100)
    for i, sp in enumerate(spans):
        for s, e in sp:
            sel = (offsets[i, :, 0] >= s) & (offsets[i, :, 1] <= e) & (offsets[i, :, 1] > offsets[i, :, 0])
            labels[i, sel] = ids[i, sel]
    image_id = tok.convert_tokens_to_ids("<image>")
    if with_image:
        counts = (ids == image_id).sum(1)
        if not bool((counts == num_image_tokens).all()):
            raise ValueError(f"expected {num_image_tokens} image tokens per sample, got {sorted(set(counts.tolist()))}")
    return TokenizedSplit(ids, enc["attention_mask"], labels, torch.tensor([c[1] for c in convs]),
                          [c[3] for c in convs], [c[4] for c in convs])
