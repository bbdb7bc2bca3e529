"""LLaVA-format data: loading, validation of bad records, and the collator (labels, images, truncation)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image

from laco.data import BadRecordError, LlavaCollator, load_llava, write_toy_llava
from laco.data.collator import IGNORE_INDEX
from laco.model.modeling import LaCoForConditionalGeneration
from laco.model.testing import tiny_laco_config, tiny_laco_processor



@pytest.fixture(scope="module")
def processor():
    return tiny_laco_processor(tiny_laco_config())


def _rec(rid, images, *turns):
    rec = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}
    if images is not None:
        rec["image"] = images
    return rec


def _image(path, size=64, colour=(200, 30, 30)):
    Image.new("RGB", (size, size), colour).save(path)
    return path.name


# -- loading ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_load_json_and_jsonl_with_lazy_images(tmp_path, fmt):
    path = write_toy_llava(tmp_path, n=5, fmt=fmt)
    ds = load_llava(path)  # image folder defaults to the data file's folder
    assert len(ds) == 5 and not ds.bad_records
    assert ds.records.column_names == ["id", "images", "videos", "conversations"]
    assert ds.records[0]["images"] == ["images/00000.png"]  # paths are stored; images opened on access
    s = ds[2]
    assert s["id"] == "toy-00002"
    assert s["images"][0].size == (64, 64) and s["images"][0].mode == "RGB"
    assert [m["role"] for m in s["messages"]] == ["user", "assistant"]
    assert s["messages"][1]["content"] == "A blue square."


def test_load_in_memory_records_and_hf_dataset(tmp_path):
    import datasets

    _image(tmp_path / "a.png")
    recs = [_rec("x", "a.png", ("human", "<image>\nHi?"), ("gpt", "Hello.")),
            _rec("t", None, ("system", "Be brief."), ("human", "2+2?"), ("gpt", "4."), ("human", "3+3?"), ("gpt", "6."))]
    ds = load_llava(recs, tmp_path)
    assert [ds[i]["id"] for i in range(2)] == ["x", "t"]
    assert ds[1]["images"] == [] and [m["role"] for m in ds[1]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    hf = datasets.Dataset.from_list([recs[0]])
    assert load_llava(hf, tmp_path)[0]["id"] == "x"


BAD = {
    "missing image": (_rec("m1", "nope.png", ("human", "<image>\nQ"), ("gpt", "A")), "image file not found"),
    "unreadable image": (_rec("u1", "broken.png", ("human", "<image>\nQ"), ("gpt", "A")), "cannot be opened"),
    "too many placeholders": (_rec("c1", "ok.png", ("human", "<image><image>\nQ"), ("gpt", "A")), "2 '<image>' placeholder(s) but 1 image"),
    "placeholder without image": (_rec("c2", None, ("human", "<image>\nQ"), ("gpt", "A")), "1 '<image>' placeholder(s) but 0 image"),
    "image without placeholder": (_rec("c3", "ok.png", ("human", "Q"), ("gpt", "A")), "0 '<image>' placeholder(s) but 1 image"),
    "conversations not a list": ({"id": "f1", "conversations": "hi"}, "non-empty list of turns"),
    "empty conversation": (_rec("f2", None), "non-empty list of turns"),
    "turn without value": ({"id": "f3", "conversations": [{"from": "human"}]}, "turn 0 must be"),
    "unknown role": (_rec("f4", None, ("human", "Q"), ("bot", "A")), "unknown role 'bot'"),
    "starts with assistant": (_rec("f5", None, ("gpt", "A"), ("human", "Q")), "must alternate"),
    "two user turns": (_rec("f6", None, ("human", "Q"), ("human", "Q2"), ("gpt", "A")), "must alternate"),
    "no assistant turn": (_rec("f7", None, ("human", "Q")), "no assistant turn"),
    "image in answer": (_rec("f8", "ok.png", ("human", "Q"), ("gpt", "<image>")), "images belong in user turns"),
    "bad image field": (_rec("f9", 3, ("human", "Q"), ("gpt", "A")), "'image' must be a path"),
    "record not an object": (["x"], "must be a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_record_is_reported_with_its_id(tmp_path, case):
    _image(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    record, reason = BAD[case]
    good = _rec("good", "ok.png", ("human", "<image>\nWhat?"), ("gpt", "Red."))
    data = tmp_path / "d.json"
    data.write_text(json.dumps([good, record]))
    with pytest.raises(BadRecordError, match="#1") as err:
        load_llava(data, on_bad_record="raise")
    assert reason in str(err.value)
    if isinstance(record, dict) and "id" in record:
        assert repr(record["id"]) in str(err.value)
    ds = load_llava(data, on_bad_record="skip")
    assert len(ds) == 1 and ds[0]["id"] == "good"  # never trained on
    (bad,) = ds.bad_records
    assert bad.index == 1 and reason in bad.reason
    ds.write_report(tmp_path / "report.jsonl")
    assert json.loads((tmp_path / "report.jsonl").read_text())["index"] == 1


def test_missing_image_under_a_relative_folder_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    recs = [_rec("m", "nope.png", ("human", "<image>\nQ"), ("gpt", "A"))]
    with pytest.raises(BadRecordError) as err:
        load_llava(recs, "imgs", on_bad_record="raise")
    assert f"looked for {tmp_path.resolve() / 'imgs' / 'nope.png'}" in str(err.value)


def test_image_that_fails_to_decode_later(tmp_path, processor, caplog):
    # passes the cheap "exists" check at load time, fails when the sample is read
    (tmp_path / "bad.png").write_bytes(b"garbage")
    _image(tmp_path / "ok.png")
    recs = [_rec("ok", "ok.png", ("human", "<image>\nQ"), ("gpt", "A")),
            _rec("late", "bad.png", ("human", "<image>\nQ"), ("gpt", "A"))]
    strict = load_llava(recs, tmp_path, check_images="exists", on_bad_record="raise")
    with pytest.raises(BadRecordError, match="'late'.*cannot be decoded"):
        strict[1]
    lenient = load_llava(recs, tmp_path, check_images="exists", on_bad_record="skip")
    with caplog.at_level(logging.WARNING):
        assert lenient[1] is None
    assert "late" in caplog.text and lenient.bad_records[-1].id == "late"
    collate = LlavaCollator(processor, 256)
    batch = collate([lenient[0], lenient[1]])
    assert batch["input_ids"].shape[0] == 1 and collate.stats.dropped_bad == 1


def test_bad_sources_and_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_llava(tmp_path / "missing.json")
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(ValueError, match="expected .json or .jsonl"):
        load_llava(tmp_path / "d.csv")
    (tmp_path / "d.json").write_text('{"id": 1}')
    with pytest.raises(ValueError, match="must hold a list"):
        load_llava(tmp_path / "d.json")
    (tmp_path / "e.jsonl").write_text('{"id": 1}\n{oops\n')
    with pytest.raises(ValueError, match="e.jsonl:2: not valid JSON"):
        load_llava(tmp_path / "e.jsonl")
    with pytest.raises(ValueError, match="on_bad_record"):
        load_llava([], on_bad_record="ignore")
    with pytest.raises(ValueError, match="check_images"):
        load_llava([], check_images="decode")
    with pytest.raises(TypeError, match="LLaVA source"):
        load_llava(42)
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_llava([], tmp_path / "nope")
    with pytest.raises(ValueError, match="no usable records.*'b'"):
        load_llava([_rec("b", None, ("human", "Q"))], on_bad_record="skip")


# -- collator ------------------------------------------------------------------------------------
def _assistant_text(tok, batch, row):
    ids = batch["input_ids"][row][batch["labels"][row] != IGNORE_INDEX]
    return tok.decode(ids)


def test_labels_cover_only_assistant_turns(tmp_path, processor):
    _image(tmp_path / "a.png")
    rec = _rec("mt", "a.png", ("system", "Short answers."), ("human", "<image>\nColour?"), ("gpt", "Red."),
               ("human", "Shape?"), ("gpt", "A square."))
    ds = load_llava([rec], tmp_path)
    collate = LlavaCollator(processor, 512)
    batch = collate([ds[0]])
    assert _assistant_text(processor.tokenizer, batch, 0) == "Red.<|im_end|>\nA square.<|im_end|>\n"
    # the whole rendered conversation, tokenised at once by the processor, gives the same ids
    text = processor.apply_chat_template(ds[0]["messages"])
    whole = processor(text=[text], images=ds[0]["images"], return_tensors="pt")
    assert torch.equal(whole["input_ids"][0], batch["input_ids"][0])
    assert torch.equal(whole["pixel_values"], batch["pixel_values"])
    # image tokens: exactly num_image_tokens per image, never labels
    is_image = batch["input_ids"] == processor.image_token_id
    assert int(is_image.sum()) == processor.num_image_tokens
    assert bool((batch["labels"][is_image] == IGNORE_INDEX).all())


def test_batch_padding_images_in_placeholder_order(tmp_path, processor):
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    for i, c in enumerate(colours):
        _image(tmp_path / f"{i}.png", colour=c)
    recs = [_rec("two", ["0.png", "1.png"], ("human", "<image> and <image>: same?"), ("gpt", "No, they differ.")),
            _rec("text", None, ("human", "Hi"), ("gpt", "Hello.")),
            _rec("one", "2.png", ("human", "<image>\nColour?"), ("gpt", "Blue."))]
    ds = load_llava(recs, tmp_path)
    collate = LlavaCollator(processor, 512, pad_to_multiple_of=8)
    batch = collate([ds[0], ds[1], ds[2]])
    b, t = batch["input_ids"].shape
    assert b == 3 and t % 8 == 0
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    # red, green, blue in order: SigLIP normalisation maps 250 -> about +0.96 in that channel
    assert batch["pixel_values"][:, :, 0, 0].argmax(-1).tolist() == [0, 1, 2]
    lengths = batch["attention_mask"].sum(-1)
    for row in range(3):
        n = int(lengths[row])
        assert bool((batch["attention_mask"][row, :n] == 1).all()) and bool((batch["attention_mask"][row, n:] == 0).all())
        assert bool((batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all())
        assert bool((batch["labels"][row, n:] == IGNORE_INDEX).all())
    per_row = (batch["input_ids"] == processor.image_token_id).sum(-1).tolist()
    assert per_row == [2 * processor.num_image_tokens, 0, processor.num_image_tokens]
    text_only = collate([ds[1]])
    assert "pixel_values" not in text_only


def test_anyres_tiles_expand_each_placeholder(tmp_path):
    config = tiny_laco_config(image_grid_pinpoints=[[64, 64], [64, 128], [128, 64]], use_image_newline=True)
    proc = tiny_laco_processor(config)
    Image.new("RGB", (128, 64), (10, 200, 10)).save(tmp_path / "wide.png")  # base + 1 x 2 tiles
    recs = [_rec("w", "wide.png", ("human", "<image>\nQ"), ("gpt", "A")),
            _rec("two", ["wide.png", "wide.png"], ("human", "<image>\nQ"), ("gpt", "A"), ("human", "and <image>?"),
                 ("gpt", "B"))]
    ds = load_llava(recs, tmp_path)
    batch = LlavaCollator(proc, 512)([ds[0], ds[1]])
    lay = config.image_layout((64, 128))
    assert lay.num_inputs == 3
    assert batch["pixel_values"].shape[0] == 3 + 2  # the 2-image sample: untiled, across its turns
    assert batch["image_sizes"].tolist() == [[64, 128]] * 3 and batch["batch_num_images"].tolist() == [1, 2]
    per_row = (batch["input_ids"] == proc.image_token_id).sum(-1).tolist()
    assert per_row == [lay.num_tokens, 2 * (proc.num_image_tokens + 1)]
    model = LaCoForConditionalGeneration(config).eval()
    assert model(**{k: v for k, v in batch.items() if k != "labels"}).logits.shape[:2] == batch["input_ids"].shape


def test_truncation_never_cuts_image_tokens(tmp_path, processor, caplog):
    _image(tmp_path / "a.png")
    long_answer = "A red square. " * 20
    recs = [_rec("long", "a.png", ("human", "<image>\nDescribe."), ("gpt", long_answer)),
            _rec("late-image", "a.png", ("human", "Some words first " * 10 + "<image>"), ("gpt", "Red."))]
    ds = load_llava(recs, tmp_path)
    full = LlavaCollator(processor, 4096).encode(ds[0])
    limit = len(full.input_ids) - 10
    collate = LlavaCollator(processor, limit)
    with caplog.at_level(logging.WARNING):
        batch = collate([ds[0]])
    assert "truncating sample 'long'" in caplog.text
    assert batch["input_ids"].shape[1] == limit
    assert torch.equal(batch["input_ids"][0], full.input_ids[:limit])
    assert collate.stats.truncated == 1
    # a limit inside the second sample's image tokens: dropped, not cut
    enc = LlavaCollator(processor, 4096).encode(ds[1])
    first_image = int((enc.input_ids == processor.image_token_id).nonzero()[0])
    collate = LlavaCollator(processor, first_image + 3)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert collate.encode(ds[1]) is None
    assert "dropping sample 'late-image'" in caplog.text and "cut image tokens" in caplog.text
    assert collate.stats.dropped_overflow == 1
    with pytest.raises(ValueError, match="'long' has .* tokens > max_length"):
        LlavaCollator(processor, limit, on_overflow="raise").encode(ds[0])
    assert LlavaCollator(processor, limit, on_overflow="drop").encode(ds[0]) is None


def test_collator_rejects_bad_settings(processor):
    with pytest.raises(ValueError, match="on_overflow"):
        LlavaCollator(processor, on_overflow="cut")
    with pytest.raises(ValueError, match="max_length"):
        LlavaCollator(processor, max_length=1)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        LlavaCollator(processor, pad_to_multiple_of=0)


# -- video and multi-image (LLaVA-OneVision) ----------------------------------------------------------
def _frames(folder, n, size=(70, 50)):
    """``n`` frames of size (W, H) in ``folder``, named so that name order is frame order."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (20 * i, 100, 200 - 20 * i)).save(folder / f"{i:05d}.png")
    return folder.name


def test_video_records_load_collate_and_run(tmp_path):
    """A video as a frame folder (<video>), as a frame list (LLaVA-NeXT's <image> marker), next to an image; token
    counts from the processor, labels -100 on video tokens, frames sampled uniformly with max_frames."""
    from laco.model.testing import tiny_onevision

    model, proc = tiny_onevision()
    _frames(tmp_path / "clip", 5)
    _image(tmp_path / "a.png")
    frame_list = [f"clip/{i:05d}.png" for i in (0, 1, 2)]
    recs = [_rec("folder", None, ("human", "<video>\nWhat happens?"), ("gpt", "It fades.")),
            {**_rec("list", None, ("human", "<image>\nAnd here?"), ("gpt", "The same.")), "video": frame_list},
            {**_rec("both", "a.png", ("human", "<image> then <video>"), ("gpt", "Red, then fading.")),
             "videos": ["clip"]}]
    recs[0]["video"] = "clip"
    ds = load_llava(recs, tmp_path, max_frames=3)
    assert ds.records.column_names == ["id", "images", "videos", "conversations"]
    assert ds.records[0]["videos"] == [["clip/00000.png", "clip/00002.png", "clip/00004.png"]]  # linspace(0, 4, 3)
    assert ds.records[1]["videos"] == [frame_list] and "<video>" in ds.records[1]["conversations"][0]["value"]
    s = ds[2]
    assert len(s["images"]) == 1 and [len(v) for v in s["videos"]] == [3] and s["videos"][0][0].size == (70, 50)
    batch = LlavaCollator(proc, 512)([ds[i] for i in range(3)])
    assert batch["pixel_values_videos"].shape == (3, 3, 3, 64, 64)
    per_video = proc.video_tokens(3)
    assert per_video == 3 * 16 + 1  # 4x4 tokens per frame (LaCo r=2 inside), one newline for the video
    video_id = model.config.video_token_id
    assert (batch["input_ids"] == video_id).sum(-1).tolist() == [per_video] * 3
    assert (batch["input_ids"] == proc.image_token_id).sum(-1).tolist() == [0, 0, proc.image_tokens((64, 64))]
    assert not (batch["labels"][batch["input_ids"] == video_id] != IGNORE_INDEX).any()
    assert (batch["labels"] != IGNORE_INDEX).any(-1).all()
    # the frames are the processor's own preprocessing of the decoded frames, in order
    expected = proc(text="<video>", videos=[s["videos"][0]])["pixel_values_videos"][0]
    assert torch.equal(batch["pixel_values_videos"][2], expected)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert out.logits.shape[:2] == batch["input_ids"].shape
    # videos of different lengths in one batch: a list, which the model takes too
    mixed = load_llava(recs[:2], tmp_path, max_frames=None)
    batch = LlavaCollator(proc, 512)([mixed[0], mixed[1]])
    assert [v.shape[0] for v in batch["pixel_values_videos"]] == [5, 3]
    assert (batch["input_ids"] == video_id).sum(-1).tolist() == [proc.video_tokens(5), proc.video_tokens(3)]
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})


VIDEO_BAD = {
    "missing-frame": ({"video": ["clip/00000.png", "clip/00009.png"]}, "<video>", "video 0 frame 1: image file not found"),
    "missing-folder": ({"video": "nowhere"}, "<video>", "video frame folder not found"),
    "empty-folder": ({"video": "empty"}, "<video>", "holds no image files"),
    "video-file": ({"video": "movie.mp4"}, "<video>", "video files are not decoded"),
    "placeholders": ({"video": "clip"}, "<video> <video>", "2 '<video>' placeholder(s) but 1 video(s)"),
    "no-placeholder": ({"video": "clip"}, "plain text", "0 '<video>' placeholder(s) but 1 video(s)"),
    "bad-field": ({"video": 3}, "<video>", "'video' must be a frame folder"),
    "bad-videos": ({"videos": "clip"}, "<video>", "'videos' must be a list of videos"),
}


@pytest.mark.parametrize("case", sorted(VIDEO_BAD))
def test_bad_video_records_are_named(tmp_path, case):
    _frames(tmp_path / "clip", 2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "movie.mp4").write_bytes(b"\x00")
    extra, text, reason = VIDEO_BAD[case]
    rec = {**_rec("v1", None, ("human", text), ("gpt", "A")), **extra}
    with pytest.raises(BadRecordError, match="'v1'") as err:
        load_llava([rec], tmp_path)
    assert reason in str(err.value)


def test_video_in_an_assistant_turn_and_without_a_video_model(tmp_path, processor):
    _frames(tmp_path / "clip", 2)
    rec = {**_rec("v2", None, ("human", "Q"), ("gpt", "<video>")), "video": "clip"}
    with pytest.raises(BadRecordError, match="contains '<video>'"):
        load_llava([rec], tmp_path)
    # a model without a video token: the collator names the sample and says so
    rec = {**_rec("v3", None, ("human", "<video> Q"), ("gpt", "A")), "video": "clip"}
    ds = load_llava([rec], tmp_path)
    with pytest.raises(ValueError, match="sample 'v3'.*takes no video"):
        LlavaCollator(processor, 256)([ds[0]])


def test_frame_that_fails_to_decode_later(tmp_path, caplog):
    from laco.model.testing import tiny_onevision

    _frames(tmp_path / "clip", 2)
    (tmp_path / "clip" / "00001.png").write_bytes(b"garbage")
    rec = {**_rec("late", None, ("human", "<video> Q"), ("gpt", "A")), "video": "clip"}
    with pytest.raises(BadRecordError, match="'late'.*video 0 frame cannot be decoded"):
        load_llava([rec], tmp_path, check_images="exists")[0]
    lenient = load_llava([rec], tmp_path, check_images="exists", on_bad_record="skip")
    with caplog.at_level(logging.WARNING):
        assert lenient[0] is None
    _, proc = tiny_onevision()
    collate = LlavaCollator(proc, 256)
    assert collate([lenient[0]])["input_ids"].shape[0] == 0 and collate.stats.dropped_bad == 1
