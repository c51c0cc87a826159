"""The generated corpus of ``make eval``: the same documents for a seed, every planted value valid by its
own check (so a miss is the pack's), every decoy failing that check or standing without the words that
would say what it is, and a report row per entity."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from types import SimpleNamespace

from bench import corpus
from extproc.model import Finding

SIZE = 2 * len(corpus.SHAPES)  # every shape twice


@cache
def _documents() -> list[corpus.Document]:
    return corpus.generate(seed=7, documents=SIZE)


def test_the_generator_is_deterministic_and_a_document_depends_on_its_index_only() -> None:
    first, again = _documents(), corpus.generate(seed=7, documents=SIZE)
    assert first == again
    assert corpus.generate(seed=7, documents=5) == first[:5]
    assert [d.text for d in corpus.generate(seed=8, documents=5)] != [d.text for d in first[:5]]


def test_every_shape_is_generated_and_spans_label_their_values() -> None:
    documents = _documents()
    assert len({d.shape.split(" (")[0] for d in documents}) >= 18
    for doc in documents:
        for span in (*doc.planted, *doc.decoys):
            assert doc.text[span.start : span.end] == span.value, (doc.shape, span)
    spans = [(s.start, s.end) for d in documents[:1] for s in (*d.planted, *d.decoys)]
    assert len(spans) == len(set(spans))


def test_every_planted_value_passes_its_own_validator() -> None:
    planted = [(doc.shape, span) for doc in _documents() for span in doc.planted]
    assert len(planted) > 500
    invalid = [
        (shape, span.entity, span.value)
        for shape, span in planted
        if not corpus.valid(span.entity, span.value)
    ]
    assert invalid == []


def test_every_decoy_fails_its_validator_or_lacks_its_context() -> None:
    kinds = set()
    for doc in _documents():
        for span in doc.decoys:
            kinds.add(span.kind)
            if span.kind == "context":
                assert corpus.valid(span.entity, span.value), span
                assert not corpus.has_context(span.entity, doc.text), (doc.shape, span)
            else:
                assert not corpus.valid(span.entity, span.value), (doc.shape, span)
    assert kinds == {"checksum", "placeholder", "example", "context"}


def test_published_examples_and_placeholders_are_decoys() -> None:
    values = {span.value for doc in _documents() for span in doc.decoys}
    assert {"AKIAIOSFODNN7EXAMPLE", "sk_test_4eC39HqLyjWDarjtT1zdp7dc"} <= values
    assert any(v.startswith("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkw") for v in values)
    assert any(v.startswith("DE") and not corpus.valid("IBAN_CODE", v.replace(" ", "")) for v in values)


@dataclass
class _Pack:
    """Reports every planted value of ``found`` entities (masking it) and the first decoy of each document."""

    found: frozenset[str]
    documents: dict[str, corpus.Document]
    detector: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(rules=[]))

    def mask_text(self, text: str) -> tuple[str, list[Finding]]:
        doc = self.documents[text]
        findings = [
            Finding(s.entity, s.entity, s.start, s.end) for s in doc.planted if s.entity in self.found
        ]
        if doc.decoys:
            decoy = doc.decoys[0]
            findings.append(Finding("decoy", decoy.entity, decoy.start, decoy.end))
        findings.append(Finding("stray", "IP_ADDRESS", 0, 0))  # an empty span overlaps nothing
        masked = text
        for f in findings:
            masked = (
                masked.replace(text[f.start : f.end], "#" * (f.end - f.start)) if f.end > f.start else masked
            )
        return masked, findings


def test_the_report_has_a_row_per_entity_with_recall_leaks_decoys_and_stray_findings() -> None:
    documents = _documents()
    entities = {s.entity for d in documents for s in (*d.planted, *d.decoys)}
    pack = _Pack(frozenset({"EMAIL_ADDRESS", "IBAN_CODE"}), {d.text: d for d in documents})
    scores = corpus.evaluate(pack, documents)
    assert set(scores) == entities | {"IP_ADDRESS"}
    assert scores["EMAIL_ADDRESS"].found == scores["EMAIL_ADDRESS"].planted > 0
    assert scores["EMAIL_ADDRESS"].leaked == 0
    assert scores["US_SSN"].found == 0
    assert scores["US_SSN"].leaked == scores["US_SSN"].planted > 0
    assert scores["IP_ADDRESS"].stray == len(documents)
    total = corpus.totals(scores)
    assert total.decoys_reported == sum(1 for d in documents if d.decoys)
    lines = corpus.markdown(scores, documents, seed=7)
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| entity")]
    assert len(table) == len(scores) + 1  # the totals line, then an entity per row
    assert all(any(line.startswith(f"| {entity} |") for line in table) for entity in entities)
    assert any(line.startswith("Target recall >= 99% and decoys reported <= 1%") for line in lines)
