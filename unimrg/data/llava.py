"""LLaVA conversation records (the LLaVA-665K ``llava_v1_5_mix665k.json`` format), parsed and checked.

A record::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

Records without ``"image"`` are text-only (ShareGPT turns in LLaVA-665K). The ``<image>``
placeholder of an image record may stand at the start or the end of the first human turn; it is
moved to the front (``"<image>\\n" + text``), as LLaVA's ``preprocess_multimodal`` does
(haotian-liu/LLaVA, llava/train/train.py), so every consumer sees one layout.

Every problem raises ``LlavaFormatError`` naming the file, the record index and its id.
The scene generator (unimrg.data.scenes) writes such records; the LLaVA ingestion reuses this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

IMAGE_TOKEN = "<image>"
HUMAN, GPT = "human", "gpt"


class LlavaFormatError(ValueError):
    """A record that does not follow the LLaVA conversation format."""


@dataclass(frozen=True)
class LlavaRecord:
    id: str
    image: str | None                    # relative image path; None for a text-only record
    conversations: list[dict[str, str]]  # alternating human / gpt turns, human first, gpt last

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.image is not None:
            out["image"] = self.image
        out["conversations"] = self.conversations
        return out


def _where(source: str, index: int | None, rid: Any) -> str:
    at = source if index is None else f"{source}: record {index}"
    return f"{at} (id={rid!r})" if rid is not None else at


def parse_record(obj: Any, *, source: str = "<record>", index: int | None = None) -> LlavaRecord:
    """Check one LLaVA record and return it with the ``<image>`` placeholder at the front.

    Args:
        obj: the decoded JSON object.
        source: file (or shard/key) the record came from, for error messages.
        index: position of the record in its file, for error messages.
    """
    rid = obj.get("id") if isinstance(obj, dict) else None
    where = _where(source, index, rid)

    def fail(problem: str) -> LlavaFormatError:
        return LlavaFormatError(f"{where}: {problem}")

    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object with 'id' and 'conversations', got {type(obj).__name__}")
    if "id" not in obj or not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        raise fail("missing or non-string 'id'")
    image = obj.get("image")
    if image is not None:
        if isinstance(image, list):
            raise fail("multi-image records ('image' is a list) are not supported; split them into "
                       "single-image records")
        if not isinstance(image, str) or not image:
            raise fail(f"'image' must be a non-empty path string, got {image!r}")
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise fail("'conversations' must be a non-empty list of {'from', 'value'} turns")

    turns: list[dict[str, str]] = []
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise fail(f"turn {k} must be an object with a string 'value', got {turn!r:.80}")
        role = turn.get("from")
        expected = HUMAN if k % 2 == 0 else GPT
        if role != expected:
            raise fail(f"turn {k} is from {role!r}, expected {expected!r} (turns alternate "
                       f"human/gpt and start with human)")
        turns.append({"from": role, "value": turn["value"]})
    if turns[-1]["from"] != GPT:
        raise fail("the last turn is from 'human'; it has no answer to train on -- drop it")

    placeholders = [k for k, t in enumerate(turns) if IMAGE_TOKEN in t["value"]]
    count = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if image is None:
        if count:
            raise fail(f"text-only record (no 'image') contains {count} {IMAGE_TOKEN} placeholder(s)")
    else:
        if count != 1 or placeholders != [0]:
            raise fail(f"an image record needs exactly one {IMAGE_TOKEN} placeholder, in the first human "
                       f"turn; found {count} in turns {placeholders}")
        text = turns[0]["value"].replace(IMAGE_TOKEN, "").strip()
        turns[0] = {"from": HUMAN, "value": f"{IMAGE_TOKEN}\n{text}".strip()}
    return LlavaRecord(id=str(obj["id"]), image=image, conversations=turns)


def iter_llava_objects(path: str | Path) -> Iterator[tuple[str, int | None, Any]]:
    """``(source, index, obj)`` of every record of a LLaVA ``.json`` (a list of records) or ``.jsonl``
    (one record per line) file, undecoded: ``parse_record(obj, source=source, index=index)`` checks one
    and names it as "FILE: record I" (.json) or "FILE: line N" (.jsonl).

    The file's syntax is checked here, whole: a file that cannot be read, is not valid JSON (the error
    names the line and column) or is not a list raises ``LlavaFormatError`` before any record is given
    out, so a caller that reads every file first fails before it writes anything."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlavaFormatError(f"{path}: cannot read ({e})") from e
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                out.append((f"{path}: line {n + 1}", None, json.loads(line)))
            except json.JSONDecodeError as e:
                raise LlavaFormatError(f"{path}: line {n + 1} is not valid JSON ({e.msg} at column {e.colno}); "
                                       f"fix or remove that line") from e
        return iter(out)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LlavaFormatError(f"{path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg}); expected a "
                               f"list of LLaVA records (or use a .jsonl file with one record per line)") from e
    if not isinstance(data, list):
        raise LlavaFormatError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return ((str(path), i, obj) for i, obj in enumerate(data))


def iter_llava_file(path: str | Path) -> Iterator[LlavaRecord]:
    """Records of a LLaVA ``.json`` / ``.jsonl`` file; the first problem raises ``LlavaFormatError``."""
    for source, index, obj in iter_llava_objects(path):
        yield parse_record(obj, source=source, index=index)


def load_llava_file(path: str | Path) -> list[LlavaRecord]:
    return list(iter_llava_file(path))


def parse_record_bytes(data: bytes, *, source: str) -> LlavaRecord:
    """One record stored as a JSON part of a webdataset sample (e.g. ``<key>.json`` in a shard)."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlavaFormatError(f"{source}: not valid JSON ({e})") from e
    return parse_record(obj, source=source)


def dialogue_turns(conv: list[dict[str, str]], key: str) -> list[tuple[str, str]]:
    """(role, text) of a conversation as a model formats it: a leading non-human (system / gpt) turn
    dropped, as LLaVA-style trainers do; then human / gpt must alternate with at least one answer.

    Args:
        conv: the turns of an ``UnderstandingBatch`` sample.
        key: the sample's key, named in errors.
    """
    turns = list(conv)
    if turns and turns[0].get("from") != HUMAN:
        turns = turns[1:]
    if not any(t.get("from") == GPT for t in turns):
        raise ValueError(f"understanding sample {key!r}: conversation has no human→gpt turn: {conv!r}")
    out = []
    for j, turn in enumerate(turns):
        role, expected = turn.get("from"), HUMAN if j % 2 == 0 else GPT
        if role != expected:
            raise ValueError(f"understanding sample {key!r}: turn {j} is from {role!r}, expected "
                             f"{expected!r} (LLaVA conversations alternate human/gpt)")
        out.append((role, turn.get("value", "")))
    return out
