"""Embedded scenes: real Fashion-MNIST items (or generated), fixed disjoint splits, LLaVA + eval formats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from laco.data import embedded as E

SMALL = dict(num_train=40, num_val=12, num_test=20)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = E.EmbeddedDataConfig(**SMALL)
    return E.build_embedded_dataset(cfg, tmp_path_factory.mktemp("emb") / "a", progress=False)


def test_build_is_deterministic(built, tmp_path):
    again = E.build_embedded_dataset(E.EmbeddedDataConfig(**SMALL), tmp_path / "b", progress=False)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(built.scenes[split].images, again.scenes[split].images)
        assert (built.root / f"{split}.json").read_text() == (again.root / f"{split}.json").read_text()
    assert (built.root / "test.jsonl").read_text() == (again.root / "test.jsonl").read_text()


def test_reuses_a_built_folder(built):
    again = E.build_embedded_dataset(built.config, built.root, progress=False)
    np.testing.assert_array_equal(again.scenes["test"].labels, built.scenes["test"].labels)


def test_splits_use_disjoint_items():
    src = E.get_item_source("auto")
    sizes = {k: len(v[0]) for k, v in src.pools.items()}
    if src.name == "fashion_mnist":
        assert sizes == {"train": 54000, "val": 6000, "test": 10000}
        full = E._read_idx(E.fashion_mnist_dir() / "train-images-idx3-ubyte.gz")
        # train and val are complementary slices of the training file; test is the separate test file
        np.testing.assert_array_equal(np.concatenate([src.pools["train"][0], src.pools["val"][0]]), full)
    # different seeds per split: the scenes differ
    a = E.scenes_for_split("train", 8, source=src)
    b = E.scenes_for_split("test", 8, source=src)
    assert not np.array_equal(a.images, b.images)


def test_scene_geometry_and_labels(built):
    s = built.scenes["test"]
    assert s.images.shape == (SMALL["num_test"], 64, 64, 3) and s.images.dtype == np.uint8
    assert s.labels.shape == (SMALL["num_test"], 4) and s.labels.min() >= 0 and s.labels.max() < 10
    # exactly one coloured (non-gray) dot region per scene: pixels where channels differ
    coloured = (s.images.max(-1).astype(int) - s.images.min(-1).astype(int)) > 50
    assert (coloured.reshape(len(s), -1).sum(1) == 9).all()  # a 3 x 3 dot


def test_llava_records(built):
    recs = built.llava("train")
    assert len(recs) == SMALL["num_train"]
    for r in recs:
        conv = r["conversations"]
        assert conv[0]["from"] == "human" and conv[0]["value"].startswith("<image>\n")
        assert [t["from"] for t in conv] in (["human", "gpt"], ["human", "gpt", "human", "gpt"])
        assert (built.root / r["image"]).is_file()


def test_position_answers_match_labels(built):
    s, names = built.scenes["train"], built.class_names
    for r in built.llava("train"):
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        if r["task"] == "position":
            i = int(r["id"].split("-")[1])
            pos = next(p for p in E.POSITIONS if q.endswith(f"at the {p}?"))
            assert a == names[s.labels[i, E.POSITIONS.index(pos)]]


def test_eval_file_validates_and_has_two_turn_probe(built):
    from laco.eval.evaluator import load_records

    recs = load_records(built.eval_file("test"))
    assert all(r.images and r.images[0].is_file() for r in recs)
    t2 = [r for r in recs if r.turn == 2]
    assert t2, "the test file needs two-turn probe records"
    for r in t2:
        assert r.task == "multiturn" and len(r.history) == 1 and r.answer in E.DOT_COLOURS
    rows = [json.loads(x) for x in built.eval_file("test").read_text().splitlines()]
    assert {r["metric"] for r in rows} <= {"exact", "numeric"}


def test_generated_fallback_warns(tmp_path, monkeypatch):
    monkeypatch.setenv("LACO_FASHION_MNIST", str(tmp_path / "missing"))
    with pytest.warns(UserWarning, match="PIL-generated"):
        src = E.get_item_source("auto")
    assert src.name == "generated" and src.class_names == E.GENERATED_CLASSES
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        E.load_fashion_mnist()
    s = E.compose_scenes(*src.pools["test"], 4, 0, E.EmbeddedDataConfig(), src.class_names, src.name)
    assert s.images.shape == (4, 64, 64, 3) and s.source == "generated"


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="source"):
        E.EmbeddedDataConfig(source="imagenet")
    with pytest.raises(ValueError, match="unknown tasks"):
        E.EmbeddedDataConfig(task_weights={"colour": 1.0})
    with pytest.raises(ValueError, match="unknown split"):
        E.scenes_for_split("dev", 2)


def test_truncated_cache_is_rebuilt(tmp_path):
    cfg = E.EmbeddedDataConfig(**SMALL)
    first = E.build_embedded_dataset(cfg, tmp_path / "c", progress=False)
    arrays = first.root / "arrays.npz"
    good = arrays.read_bytes()
    arrays.write_bytes(good[: len(good) // 3])  # a kill or a full disk mid-copy
    with pytest.warns(UserWarning, match="arrays.npz does not match its checksum.*rebuilding"):
        again = E.build_embedded_dataset(cfg, first.root, progress=False)
    assert arrays.read_bytes() == good
    np.testing.assert_array_equal(again.scenes["train"].images, first.scenes["train"].images)
