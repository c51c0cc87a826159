"""Context for keyword rules beyond their window (extproc/detect/context.py): the header of a table
column however far above the value, the key of a JSON value, and keywords in the pack's languages. Streams
find what block mode finds in these texts, however they are cut."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.detect.context import ROW_CHARS, TABLE_LINES, Keywords, label_forms
from extproc.detect.engine import Detector
from extproc.detect.rules import load_rules
from extproc.errors import ExtProcError
from extproc.mask import Inspector
from extproc.mask.bodies import BufferedJson, JsonMasker
from extproc.mask.sse import EventStream

from . import test_stream_hold as stream_hold

ROOT = Path(__file__).resolve().parents[1]
SSN, SIN, PHONE = "594743681", "126 464 460", "0470 12 34 56"


@pytest.fixture(scope="module")
def inspector() -> Inspector:
    cache = os.environ.get("EXTPROC_DETECT__CACHE_DIR")
    return Inspector.build(
        load_rules([ROOT / "rules"]), hash_key=b"k" * 32, cache_dir=Path(cache) if cache else None
    )


@pytest.fixture(scope="module")
def default(inspector: Inspector) -> Detector:
    return inspector.detector


def found(detector: Detector, text: str, label: str | None = None) -> list[tuple[str, str]]:
    return [(f.rule_id, text[f.start : f.end]) for f in detector.scan(text, label=label)]


def csv(header: str, row: str, rows: int = 50, filler: str = "Person {i},x{i},y{i}") -> str:
    """A CSV table: ``header``, ``rows`` rows of filler, then ``row``; no keyword near the last row."""
    body = "".join(filler.format(i=i) + "\n" for i in range(rows))
    return f"{header}\n{body}{row}\n"


def markdown(header: str, row: str, rows: int = 50) -> str:
    columns = header.count("|") - 1
    body = "".join("| " + " | ".join(f"row {i}" for _ in range(columns)) + " |\n" for i in range(rows))
    return f"{header}\n|{'---|' * columns}\n{body}{row}\n"


# -- table columns -------------------------------------------------------------------------------------


def test_a_csv_header_names_its_whole_column(default: Detector) -> None:
    text = csv("name,ssn,phone", f"Jane Doe,{SSN},{PHONE}")
    assert text.index(SSN) > 50 * 10  # far beyond the keyword window
    assert found(default, text) == [("us-ssn-keyword", SSN), ("phone-number-keyword", PHONE)]
    # a semicolon or a tab, as spreadsheets export
    assert found(default, text.replace(",", ";")) == found(default, text)
    assert found(default, text.replace(",", "\t")) == found(default, text)
    text = csv("Name,SIN", f"Jane Doe,{SIN}")
    assert found(default, text) == [("ca-sin", SIN)]


def test_a_markdown_header_names_its_whole_column(default: Detector) -> None:
    text = markdown("| Name | SIN | Phone |", f"| Jane | {SIN} | {PHONE} |")
    assert found(default, text) == [("ca-sin", SIN), ("phone-number-keyword", PHONE)]
    # the row before the |---| line is the header, whatever is just above it
    text = "Here is the list | as asked\n" + text
    assert found(default, text) == [("ca-sin", SIN), ("phone-number-keyword", PHONE)]
    text = markdown("| Name | Telefon |", f"| Jane | {PHONE} |")
    assert found(default, text) == [("phone-number-keyword", PHONE)]


def test_a_header_whose_words_are_joined_names_its_column_too(default: Detector) -> None:
    """``steuer_id``, ``Steuer.ID``: the keyword (``steuer id``) is only in the header read with its words
    split, which the test that a rule's keywords are anywhere in the text must read too."""
    tax_id = "35732834615"
    for header in ("steuer_id", "Steuer.ID", "steuer-id"):
        assert found(default, csv(f"name,{header}", f"Jane Doe,{tax_id}")) == [("de-tax-id", tax_id)], header
        text = markdown(f"| Name | {header} |", f"| Jane | {tax_id} |")
        assert found(default, text) == [("de-tax-id", tax_id)], header


def test_without_a_keyword_in_the_header_nothing_is_found(default: Detector) -> None:
    assert found(default, csv("name,id,number", f"Jane Doe,{SSN},{PHONE}")) == []
    assert found(default, markdown("| Name | Id | Number |", f"| Jane | {SIN} | {PHONE} |")) == []
    # the keyword names another column
    assert found(default, csv("ssn,name,id", f"x,Jane Doe,{SSN}")) == []
    # the first row of a table is its header, not one of its values
    assert found(default, "intro\n\n" + f"{SSN},name\nx,y\n") == []


def test_a_quoted_field_is_one_cell(default: Detector) -> None:
    filler = '"Doe, J{i}","a, b",x'
    # quote-aware, the value is in the ssn column; counting every comma, it would be in none
    assert found(default, csv("name,note,ssn", f'"Doe, Jane","a, b",{SSN}', filler=filler)) == [
        ("us-ssn-keyword", SSN)
    ]
    # quote-aware, the value is in the city column; counting every comma, it would be in the ssn one
    assert found(default, csv("name,city,ssn", f'"Doe, Jane",{SSN},Boston', filler=filler)) == []
    # a quoted header cell, with an escaped quote in another
    assert found(default, csv('"name","the ""id""","SSN"', f'"Doe, Jane",x,"{SSN}"', filler=filler)) == [
        ("us-ssn-keyword", SSN)
    ]


def test_a_value_the_validator_refuses_is_not_found_in_its_column(default: Detector) -> None:
    assert found(default, csv("name,ssn", "Jane,666123456")) == []  # no 666 area
    assert found(default, csv("name,ssn", "Jane,078051120")) == []  # the voided advertising number
    assert found(default, markdown("| Name | SIN |", "| Jane | 046 454 286 |")) == []  # starts with 0
    assert found(default, markdown("| Name | SIN |", "| Jane | 126 464 461 |")) == []  # Luhn


def test_tables_are_bounded(default: Detector) -> None:
    within = csv("name,ssn", f"Jane,{SSN}", rows=TABLE_LINES - 1)
    assert found(default, within) == [("us-ssn-keyword", SSN)]
    assert found(default, csv("name,ssn", f"Jane,{SSN}", rows=TABLE_LINES + 1)) == []
    # about 70 KiB of rows: beyond the characters a header is looked for
    assert found(default, csv("name,ssn", f"Jane,{SSN}", rows=700, filler="P{i}," + "z" * 100)) == []
    # a blank line, a line without the delimiter or a line longer than a row ends the table
    for breaker in ("", "Totals", "a," + "b" * ROW_CHARS):
        assert found(default, csv("name,ssn", f"{breaker}\nJane,{SSN}")) == [], breaker
        assert found(default, csv("name,ssn", f"Jane,1\nJane,{SSN}")) != []
    # a value further into its row than a row can be has no column
    assert found(default, csv("name,ssn", f"{'z' * ROW_CHARS},{SSN}")) == []
    assert found(default, csv("name,ssn", f"{'z' * (ROW_CHARS - 1)},{SSN}")) != []


def test_a_header_cell_reads_as_a_label(default: Detector) -> None:
    # "SIN" reads "sin: ", which the keyword "sin:" finds; "business" holds "sin" but is no label for it
    assert found(default, csv("name,business", f"Jane,{SIN}")) == []
    # a column named T is not a phone column: short keywords count in running text only
    assert found(default, csv("name,t", f"Jane,{PHONE}")) == []
    assert label_forms("phoneNumber") == ("phonenumber: ", "phone number: ")
    assert label_forms("T") == ()


# -- JSON keys -----------------------------------------------------------------------------------------


def masked_json(inspector: Inspector, document: object) -> tuple[object, list[str]]:
    masker = JsonMasker(inspector)
    masker.prime(document)
    out = masker.value(json.loads(json.dumps(document)))
    return out, sorted(f.rule_id for f in masker.findings)


def test_a_json_key_names_its_value(inspector: Inspector) -> None:
    cases: list[tuple[object, list[str]]] = [
        ({"ssn": SSN}, ["us-ssn-keyword"]),
        ({"employee": {"sin": SIN}}, ["ca-sin"]),
        ({"employees": [{"name": "Jane", "SIN": SIN}]}, ["ca-sin"]),
        ({"phones": [PHONE, "0470 98 76 54"]}, ["phone-number-keyword", "phone-number-keyword"]),
        ({"phoneNumber": PHONE}, ["phone-number-keyword"]),
        ({"Telefonnummer": PHONE}, ["phone-number-keyword"]),
        ({"numéro de téléphone": "01 23 45 67 89"}, ["phone-number-keyword"]),
        ({"burgerservicenummer": "211299972"}, ["nl-bsn"]),
        ({"ssn": int(SSN)}, ["us-ssn-keyword"]),  # a number under such a key, however short
        # the key is far from the value in the text, and the same value under another key is no value
        ({"sin": {"history": ["x" * 200], "current": SIN}}, []),
        ({"business": SIN, "order": SSN, "id": PHONE}, []),
    ]
    for document, rules in cases:
        out, findings = masked_json(inspector, document)
        assert findings == rules, document
        if rules:
            assert SSN not in json.dumps(out), out
            assert SIN not in json.dumps(out), out


def test_a_value_clean_under_one_key_is_still_read_under_another(inspector: Inspector) -> None:
    masker = JsonMasker(inspector)
    assert masker.value({"order": SSN}) == {"order": SSN}
    assert masker.value({"ssn": SSN}) == {"ssn": "[REDACTED:US_SSN]"}


def test_a_json_body_and_a_stream_field_read_their_keys(inspector: Inspector) -> None:
    body = json.dumps({"rows": [{"name": "Jane", "ssn": SSN}]}).encode()
    processor = BufferedJson(inspector, 1 << 20, ExtProcError("too large"), ExtProcError("invalid"))
    out = processor.feed(body) + processor.finish()
    assert SSN not in out.decode()
    events = EventStream(inspector, 1 << 16, ExtProcError("too large"))
    # a field no dialect knows, split across events: read by its path, with its key as the label
    out = events.feed(b'data: {"ssn": "5947"}\n\ndata: {"ssn": "43681"}\n\n') + events.finish()
    assert b"5947" not in out, out
    assert b"43681" not in out, out


# -- keywords in the pack's languages -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Telefon: 030 1234567",
        "Tel. 030 1234567",
        "T: 030 1234567",
        "Dr. Weber\nT: 030 1234567",
        "Tél. : 01 23 45 67 89",
        "Téléphone 01 23 45 67 89",
        "Teléfono: 912 345 678",
        "Telefone: (11) 98765-4321",
        "Handy: 0171 1234567",
        "Mobil: 0171 1234567",
        "Mobile: 07700 900123",
        "Cell 212 555 0187",
        "Portable : 06 12 34 56 78",
        "Móvil: 612 345 678",
        "Cellulare 333 123 4567",
        "Mobiel: 06 12345678",
    ],
)
def test_phone_keywords_in_the_pack_languages(default: Detector, text: str) -> None:
    assert [rule for rule, _ in found(default, text)] == ["phone-number-keyword"], text


@pytest.mark.parametrize(
    "text",
    ["Input: 4155550176", "Result: 0470 12 34 56", "Count: 1234567", "AT:0123456789", "first: 030 1234567"],
)
def test_a_short_keyword_counts_at_the_start_of_a_word_only(default: Detector, text: str) -> None:
    assert found(default, text) == []


def test_a_keyword_starting_with_a_space_matches_at_any_word_start() -> None:
    keywords = Keywords([" t:", "phone"])
    for text, expected in [
        ("T: 1", True),
        ("x\nT: 1", True),
        ("(t: 1", True),
        ("at: 1", False),
        ("input: 1", False),
        ("my phone 1", True),
    ]:
        assert keywords.in_window(text, 0, len(text)) is expected, text
    # the character before the window decides, not the window's edge
    assert not keywords.in_window("at: 1", 1, 5)
    assert not keywords.in_label(label_forms("T"))
    assert keywords.in_label(label_forms("Phone"))


# -- streams find what block mode finds ----------------------------------------------------------------

TEXTS = [
    csv("name,ssn,phone", f"Jane Doe,{SSN},{PHONE}"),
    csv("name,note,ssn", f'"Doe, Jane","a, b",{SSN}', filler='"Doe, J{i}","a, b",x'),
    markdown("| Name | SIN | Phone |", f"| Jane | {SIN} | {PHONE} |"),
    markdown("| Name | Id | Number |", f"| Jane | {SIN} | {PHONE} |"),
    "Here is the list | as asked\n" + markdown("| Name | SIN |", f"| Jane | {SIN} |"),
    "x" * 3000 + "\n" + csv("name,ssn", f"Jane,{SSN}") + "y" * 3000 + "\n" + csv("a,b", f"Jane,{SSN}"),
    f"name,ssn\nx,1\n{'z' * (ROW_CHARS + 10)}\nJane,{SSN}\n",
    f"name,ssn\n{'q,' * (ROW_CHARS // 2)}{SSN}\nJane,{SSN}\n",
]


def streamed(
    detector: Detector, text: str, sizes: list[int], label: str | None = None
) -> list[tuple[str, int, int]]:
    released, found_ = stream_hold.streamed(detector, text, sizes, label)
    assert released == text
    return found_


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(TEXTS),
    st.lists(st.integers(min_value=1, max_value=400), max_size=40),
)
def test_streams_find_what_block_mode_finds_in_tables(default: Detector, text: str, sizes: list[int]) -> None:
    assert streamed(default, text, sizes) == stream_hold.block(default, text)


def test_every_table_fed_one_character_at_a_time(default: Detector) -> None:
    for text in TEXTS:
        assert streamed(default, text, [1] * len(text)) == stream_hold.block(default, text), text[:40]
    assert stream_hold.block(default, TEXTS[0]) != []
    assert stream_hold.block(default, TEXTS[3]) == []


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["ssn", "employee_sin", "phone", "order"]),
    st.sampled_from([SSN, SIN, PHONE, f"see {SSN} and {PHONE}"]),
    st.lists(st.integers(min_value=1, max_value=6), max_size=10),
)
def test_a_labelled_stream_finds_what_a_labelled_scan_finds(
    default: Detector, label: str, text: str, sizes: list[int]
) -> None:
    assert streamed(default, text, sizes, label) == stream_hold.block(default, text, label)
