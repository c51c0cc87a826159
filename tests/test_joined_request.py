"""Every string of one JSON document is also read as one text: a value split across content parts, or
across messages, is found and masked in each piece that holds part of it (extproc.mask.bodies
``mask_across_strings``). Each case was a way to deliver a value in clear: every string was scanned alone."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.detect.rules import load_rules
from extproc.errors import ExtProcError
from extproc.mask import Inspector
from extproc.mask.bodies import BufferedJson

from .rules_fixture import hyperscan_cache

ROOT = Path(__file__).resolve().parents[1]
INSPECTOR = Inspector.build(load_rules([ROOT / "rules"]), hash_key=b"k" * 24, cache_dir=hyperscan_cache())
CARD = "4111 1111 1111 1111"
TOKEN = "ghp_9Btr3dQAjQvDjPO9iaZzBjJK5LJbgr7uwliM"


def masked(document: Any) -> tuple[Any, list[str]]:
    processor = BufferedJson(INSPECTOR, 1 << 20, ExtProcError("too large"), ExtProcError("invalid"))
    processor.feed(json.dumps(document).encode())
    return json.loads(processor.finish()), [f.entity for f in processor.findings]


def chat(*messages: Any) -> dict[str, Any]:
    return {"model": "demo-small", "messages": list(messages)}


def parts(*texts: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": text} for text in texts]


def test_a_card_in_two_content_parts_of_one_message_is_masked() -> None:
    out, entities = masked(chat({"role": "user", "content": parts("my card 4111 1111", " 1111 1111 ok")}))
    assert out["messages"][0]["content"] == parts("my card **** **** **** 1111", " ok")
    assert "CREDIT_CARD" in entities


def test_a_card_across_two_messages_is_masked_even_with_their_roles_between() -> None:
    out, _ = masked(
        chat({"role": "user", "content": "pay 41"}, {"role": "assistant", "content": "11111111111111 now"})
    )
    assert [m["content"] for m in out["messages"]] == ["pay ************1111", " now"]


def test_a_token_across_two_messages_is_masked() -> None:
    out, entities = masked(
        chat({"role": "user", "content": TOKEN[:18]}, {"role": "user", "content": TOKEN[18:]})
    )
    assert [m["content"] for m in out["messages"]] == ["[REDACTED:GITHUB_TOKEN]", ""]
    assert entities == ["GITHUB_TOKEN"]


def test_a_card_spread_over_many_parts_is_masked_in_every_piece() -> None:
    pieces = [CARD[i : i + 3] for i in range(0, len(CARD), 3)]
    out, _ = masked(chat({"role": "user", "content": parts(*pieces)}))
    texts = [part["text"] for part in out["messages"][0]["content"]]
    assert "".join(texts) == "**** **** **** 1111"


def test_values_whole_in_one_string_are_masked_once_and_nothing_else_changes() -> None:
    document = chat({"role": "user", "content": "hello"}, {"role": "user", "content": f"card {CARD}"})
    out, entities = masked(document)
    assert [m["content"] for m in out["messages"]] == ["hello", "card **** **** **** 1111"]
    assert len(entities) == len(INSPECTOR.mask_text(f"card {CARD}")[1])  # no finding counted twice
    clean = chat({"role": "user", "content": "order 4111"}, {"role": "user", "content": "shipped 22"})
    assert masked(clean) == (clean, [])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(CARD) - 1), min_size=1, max_size=5, unique=True))
def test_however_a_card_is_cut_into_messages_no_digit_but_the_last_four_is_left(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(CARD)]
    pieces = [CARD[a:b] for a, b in itertools.pairwise(bounds)]
    pieces[0], pieces[-1] = "card " + pieces[0], pieces[-1] + " thanks"
    out, _ = masked(chat(*({"role": "user", "content": piece} for piece in pieces)))
    joined = "".join(m["content"] for m in out["messages"])
    assert joined == "card **** **** **** 1111 thanks"


@pytest.mark.parametrize("key", ["role", "type", "model"])
def test_labels_do_not_join_the_text(key: str) -> None:
    """A label between two halves neither breaks the value apart nor joins it: labels stay out."""
    document = {"a": "card 4111 1111", key: "x", "b": " 1111 1111"}
    out, _ = masked(document)
    assert out == {"a": "card **** **** **** 1111", key: "x", "b": ""}


def test_another_field_between_the_halves_does_not_break_the_value_apart() -> None:
    """Strings of one key name are also read together: a `refusal` or a `name` between two `content`
    halves would otherwise stand between them in the joined text."""
    document = {
        "choices": [
            {"message": {"content": "card 4111 1111", "refusal": "no"}},
            {"message": {"name": "x", "content": " 1111 1111 ok"}},
        ]
    }
    out, _ = masked(document)
    contents = [choice["message"]["content"] for choice in out["choices"]]
    assert "".join(contents) == "card **** **** **** 1111 ok"
    assert [choice["message"].get("refusal") for choice in out["choices"]] == ["no", None]


def test_a_false_match_across_strings_never_cuts_a_value_of_one_string_short() -> None:
    """Joined, the end of a card and the next string read as an e-mail address ("1111jane@..."): strings
    are masked alone first, so the joined reading meets replacements, not the card's digits."""
    out, _ = masked({"a": ["x", {"b": f"card {CARD}"}], "e": "jane@example.com"})
    assert out == {"a": ["x", {"b": "card **** **** **** 1111"}], "e": "[REDACTED:EMAIL_ADDRESS]"}


def test_regression_a_value_found_only_with_the_words_of_another_message_is_masked() -> None:
    # The SSN rule needs its keyword nearby: "my ssn is" in one message, the number alone in the next.
    # Read joined, it is found, inside one string: it must be masked there, not left to that string's
    # own scan, which cannot see the keyword.
    assert INSPECTOR.mask_text("536228726")[1] == []
    document = chat({"role": "user", "content": "my ssn is "}, {"role": "user", "content": "536228726"})
    out, entities = masked(document)
    assert "536228726" not in json.dumps(out)
    assert entities == ["US_SSN"]
