"""LLaVA conversation records: parsing, placeholder normalisation, and errors that name file + record."""

import json

import pytest

from unimrg.data.llava import (LlavaFormatError, load_llava_file, parse_record, parse_record_bytes)


def rec(**kw):
    base = {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
                              {"from": "gpt", "value": "White and red."},
                              {"from": "human", "value": "What feature can be seen on the back?"},
                              {"from": "gpt", "value": "An advertisement."}]}
    base.update(kw)
    return base


def test_multi_turn_image_record():
    r = parse_record(rec())
    assert r.id == "000000033471" and r.has_image and r.image.endswith(".jpg")
    assert [t["from"] for t in r.conversations] == ["human", "gpt", "human", "gpt"]
    assert r.conversations[0]["value"] == "<image>\nWhat are the colors of the bus?"
    assert r.to_json() == rec()


def test_trailing_placeholder_moves_to_the_front():
    r = parse_record(rec(conversations=[{"from": "human", "value": "Describe it.\n<image>"},
                                        {"from": "gpt", "value": "A bus."}]))
    assert r.conversations[0]["value"] == "<image>\nDescribe it."


def test_text_only_record():
    r = parse_record({"id": 7, "conversations": [{"from": "human", "value": "Hi"},
                                                 {"from": "gpt", "value": "Hello"}]})
    assert not r.has_image and r.image is None and r.id == "7"
    assert "image" not in r.to_json()


@pytest.mark.parametrize("obj, message", [
    ([1, 2], "expected a JSON object"),
    (rec(id=None), "'id'"),
    (rec(image=["a.jpg", "b.jpg"]), "multi-image"),
    (rec(image=""), "non-empty path"),
    (rec(conversations=[]), "non-empty list"),
    (rec(conversations=[{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "x"}]),
     "exactly one <image>"),
    (rec(conversations=[{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]),
     "exactly one <image>"),
    (rec(conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                        {"from": "human", "value": "<image>\nq2"}, {"from": "gpt", "value": "a2"}]),
     "first human turn"),
    ({"id": "t", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
     "text-only record"),
    (rec(conversations=[{"from": "gpt", "value": "<image>\nq"}, {"from": "human", "value": "a"}]),
     "turn 0 is from 'gpt'"),
    (rec(conversations=[{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": 3}]),
     "turn 1"),
    (rec(conversations=[{"from": "human", "value": "<image>\nq"}]), "last turn is from 'human'"),
])
def test_invalid_records_raise_with_id_and_source(obj, message):
    with pytest.raises(LlavaFormatError, match=message) as e:
        parse_record(obj, source="llava.json", index=3)
    assert "llava.json: record 3" in str(e.value)
    if isinstance(obj, dict) and obj.get("id"):
        assert repr(obj["id"]) in str(e.value)


def test_json_file_error_names_file_record_and_id(tmp_path):
    good = rec()
    bad = rec(id="bad-one", conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}])
    f = tmp_path / "mix.json"
    f.write_text(json.dumps([good, good, bad]))
    with pytest.raises(LlavaFormatError) as e:
        load_llava_file(f)
    assert str(f) in str(e.value) and "record 2" in str(e.value) and "'bad-one'" in str(e.value)
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    f.write_text(json.dumps([good, text_only]))
    recs = load_llava_file(f)
    assert [r.has_image for r in recs] == [True, False]


def test_jsonl_and_broken_json(tmp_path):
    f = tmp_path / "mix.jsonl"
    f.write_text(json.dumps(rec()) + "\n\n" + json.dumps(rec(id="2")) + "\n")
    assert [r.id for r in load_llava_file(f)] == ["000000033471", "2"]
    f.write_text(json.dumps(rec()) + "\n{not json\n")
    with pytest.raises(LlavaFormatError, match="line 2"):
        load_llava_file(f)
    g = tmp_path / "broken.json"
    g.write_text("[{")
    with pytest.raises(LlavaFormatError, match=str(g)):
        load_llava_file(g)
    with pytest.raises(LlavaFormatError, match="expected a JSON list"):
        g.write_text("{}")
        load_llava_file(g)
    with pytest.raises(LlavaFormatError, match="shard-0.tar:k.json: not valid JSON"):
        parse_record_bytes(b"\xff\xfe", source="shard-0.tar:k.json")


def test_dialogue_turns_as_models_format_them():
    from unimrg.data.llava import dialogue_turns
    conv = [{"from": "gpt", "value": "system-ish opener"}, {"from": "human", "value": "<image>\nQ"},
            {"from": "gpt", "value": "A"}]
    assert dialogue_turns(conv, "k") == [("human", "<image>\nQ"), ("gpt", "A")]   # leading non-human dropped
    with pytest.raises(ValueError, match="'k'.*no human→gpt turn"):
        dialogue_turns([{"from": "human", "value": "Q"}], "k")
    with pytest.raises(ValueError, match="turn 1 is from 'human', expected 'gpt'"):
        dialogue_turns([{"from": "human", "value": "Q"}, {"from": "human", "value": "Q2"},
                        {"from": "gpt", "value": "A"}], "k")
