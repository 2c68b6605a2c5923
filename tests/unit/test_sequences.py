"""Shared sequence helpers (unimrg/models/sequences.py) used by every adapter's batch builders."""

import pytest

from unimrg.models.sequences import IGNORE_INDEX, cut_conversation, pad_right


def test_pad_right_gives_ids_and_the_real_token_mask():
    ids, mask = pad_right([[5, 6, 7], [8]], value=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]


def test_cut_conversation_refuses_a_cut_through_the_image_or_past_every_answer():
    ids, labels = [1, 9, 9, 2, 3], [IGNORE_INDEX] * 3 + [2, 3]
    assert cut_conversation("k", ids, labels, 4, image_token_id=9, image_tokens=2) == (ids[:4], labels[:4])
    with pytest.raises(ValueError, match=r"'k'.*max_length=2 cuts the image tokens; raise model.max_length"):
        cut_conversation("k", ids, labels, 2, image_token_id=9, image_tokens=2)
    with pytest.raises(ValueError, match=r"no answer tokens left within max_text_len=3; raise model.max_text_len"):
        cut_conversation("k", ids, labels, 3, field="max_text_len")
