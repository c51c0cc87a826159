"""Streamed answers (SSE, ``stream: true``): what scanning costs a client reading tokens as they come.

extproc masks a token stream on the assembled text and holds back only what a match still in progress
could cover. That hold is invisible in a request/response benchmark but is exactly what a chat user
feels, so the same scripted answer from the demo model is read through three paths in the same run:

  envoy    (unscanned)  client -> Envoy (no ext_proc filter) -> demo model
  floor    (unscanned)  client -> Envoy -> a do-nothing ext_proc server (bench/floor.py) -> demo model
  extproc  (scanned)    client -> Envoy -> ext_proc (answer scanned as it streams) -> demo model

The floor echoes every streamed chunk as it comes: what it adds over Envoy alone is the price of a
Python ext_proc server in the stream at all, and extproc over the floor the price of scanning.

The client (aiohttp) parses the SSE body incrementally and timestamps every event on arrival, from
the moment the request is sent. Per answer and path it measures:

  first byte     time to the first byte of the body (the response headers come before it);
  first token    time to the first event whose ``choices[0].delta.content`` is not empty: the
                 time to first token a user sees, which includes whatever the scanner holds back;
  duration       time to the end of the body;
  lag            for each received chat event, the characters the model had sent by then
                 (event index * ``chunk_chars``, the demo's role event being index 0) minus the
                 characters delivered so far: how far the scanner holds the text back. This relies on
                 the scanner keeping one event per model event (it does; the ``events`` column shows
                 if that ever changes). A mask changes the length of the text it replaces, so after a
                 masked value the lag of the scanned path is off by that difference;
  added per event  one path's arrival time of an event index minus another's (extproc vs envoy,
                 extproc vs floor, floor vs envoy), median and p95 over the events of a run: how much
                 later each event reaches the client once the stream flows (the hold shows in first
                 token and lag, not here).

Answers: ``prose`` (~1500 characters of plain words), ``secrets`` (the same kind of prose with a card
number and an e-mail address, each split across several events; the scanned text must come back with
``**** **** **** 1111`` and ``[REDACTED:EMAIL_ADDRESS]``, anything else is reported as an error),
both paced by the demo model at a fixed delay per event (20 ms); and ``throughput``, an 8 KiB answer
with no pacing, for events/s and MB/s (SSE body bytes; the scanned path re-serialises each event
compactly, so its events are a few bytes shorter: events/s is the like-for-like figure), read as
``concurrency`` streams at once per path (8 by default): events/s is every stream's events over the
time from the first request to the last end.

How paced answers are measured. The demo paces with ``asyncio.sleep``, whose overshoot on a shared
machine drifts by tens to hundreds of milliseconds over a 375-event answer, differently in every
request: two requests run one after the other differ at the same event index by far more than what
the scanner adds (a few ms). So a paced answer is read in two passes:

  start pass   the paths one after the other (alternating which goes first), each request stopped
               at its first token: first byte and first token, free of any other request's load;
  stream pass  all paths at the same time, the same script: the demo's handlers share one event
               loop, so their sleeps wake together and the streams are paced alike. Duration,
               events, lag and added per event come from here. A control run of Envoy against Envoy
               this way differs by about 0.2 ms per event (which request the demo starts first).

The unpaced answer is read one path after the other, whole (paths at once would share CPUs).
Each measurement is repeated (5 runs by default) and the medians are reported, with scanned/unscanned
ratios taken within the run: machines here are shared and noisy, so compare the ratios, not absolute
numbers across runs.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

UNSCANNED, FLOOR, SCANNED = "envoy", "floor", "extproc"
# Added per event: the later path of each pair against the earlier.
COMPARED = ((SCANNED, UNSCANNED), (SCANNED, FLOOR), (FLOOR, UNSCANNED))
CARD = "4111 1111 1111 1111"
CARD_MASKED = "**** **** **** 1111"  # the default pack keeps a card's last four digits
EMAIL = "jane.doe@example.com"
EMAIL_MASKED = "[REDACTED:EMAIL_ADDRESS]"
REQUEST = json.dumps(
    {
        "model": "demo-small",
        "messages": [{"role": "user", "content": "Write a status update for the support team."}],
        "stream": True,
    }
).encode()
_VOCABULARY = (
    "the team shipped a steady release this week and the support queue is shorter than it was "
    "before the holidays most customers asked about delivery dates refunds and the new reports "
    "page we expect the next update to land early next month after review with the product group "
    "please read the notes below and reply with any questions you would like us to answer"
)
_WORDS = _VOCABULARY.split()
_SEPARATOR = re.compile(rb"\r\n\r\n|\n\n|\r\r")


@dataclass(frozen=True)
class Answer:
    """A scripted answer: the demo model streams ``content`` ``chunk_chars`` characters per event,
    pausing ``delay_ms`` before each; through extproc the client must receive ``masked``."""

    name: str
    content: str
    chunk_chars: int
    delay_ms: int
    masked: str

    @property
    def model_events(self) -> int:
        """Content events the model sends (plus a role event first and a finish event last)."""
        return -(-len(self.content) // self.chunk_chars)

    def sent_by(self, index: int) -> int:
        """Characters the model had sent when it sent chat event ``index`` (0: the role event)."""
        return min(index * self.chunk_chars, len(self.content))


@dataclass
class Received:
    """One streamed answer as the client saw it; times in seconds since the request was sent."""

    started: float = 0.0  # time.perf_counter() when the request was sent
    status: int = 0
    headers_s: float = 0.0
    first_byte_s: float | None = None
    first_token_s: float | None = None
    end_s: float = 0.0
    body_bytes: int = 0
    arrivals: list[float] = field(default_factory=list)  # one per chat event
    delivered: list[int] = field(default_factory=list)  # content characters received up to that event
    text: str = ""
    done: bool = False
    error_event: str | None = None

    def lag(self, answer: Answer) -> list[int]:
        return [answer.sent_by(index) - got for index, got in enumerate(self.delivered)]


class SseParser:
    """Splits an SSE byte stream into (event name, data) pairs as the bytes arrive."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        self._buffer += data
        events: list[tuple[str, str]] = []
        while (found := _SEPARATOR.search(self._buffer)) is not None:
            raw, self._buffer = self._buffer[: found.start()], self._buffer[found.end() :]
            name, lines = "message", []
            for line in raw.decode("utf-8", "replace").splitlines():
                key, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if key == "event":
                    name = value
                elif key == "data":
                    lines.append(value)
            if lines:
                events.append((name, "\n".join(lines)))
        return events


def prose(chars: int, seed: int) -> str:
    """Plain sentences of common words, about ``chars`` long, that no rule of the default pack flags."""
    pick = random.Random(seed)
    sentences: list[str] = []
    size = 0
    while size < chars:
        words = [pick.choice(_WORDS) for _ in range(pick.randint(8, 16))]
        sentence = " ".join(words).capitalize() + "."
        sentences.append(sentence)
        size += len(sentence) + 1
    return " ".join(sentences)[:chars].rsplit(" ", 1)[0].rstrip(".") + "."


def answers(
    chars: int = 1500, chunk_chars: int = 4, delay_ms: int = 20, throughput_chars: int = 8192
) -> list[Answer]:
    """The scripted answers: two paced (prose, prose with a card and an e-mail) and one unpaced."""
    text = prose(chars, seed=1)
    first, second = (max(0, text.rfind(" ", 0, len(text) * k // 3)) for k in (1, 2))
    head, middle, tail = text[:first], text[first:second].strip(), text[second:].strip()
    template = "{head} The card {card} is on file. {middle} Write to {email} for a copy. {tail}"
    with_secrets = template.format(head=head, middle=middle, tail=tail, card=CARD, email=EMAIL)
    masked = template.format(head=head, middle=middle, tail=tail, card=CARD_MASKED, email=EMAIL_MASKED)
    unpaced = prose(throughput_chars, seed=3)
    return [
        Answer("prose", text, chunk_chars, delay_ms, masked=text),
        Answer("secrets", with_secrets, chunk_chars, delay_ms, masked=masked),
        Answer("throughput", unpaced, chunk_chars, 0, masked=unpaced),
    ]


async def fetch(
    session: aiohttp.ClientSession, url: str, reply_id: str, *, until_first_token: bool = False
) -> Received:
    """Send one streamed chat request and timestamp every event of the answer as it arrives; with
    ``until_first_token``, drop the connection once a token has arrived instead of reading on."""
    got = Received()
    parser = SseParser()
    headers = {"content-type": "application/json", "x-demo-reply": reply_id}
    got.started = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", data=REQUEST, headers=headers) as response:
        got.status = response.status
        got.headers_s = time.perf_counter() - got.started
        async for data in response.content.iter_any():
            now = time.perf_counter() - got.started
            if got.first_byte_s is None:
                got.first_byte_s = now
            got.body_bytes += len(data)
            for name, payload in parser.feed(data):
                _record(got, name, payload, now)
            if until_first_token and got.first_token_s is not None:
                response.close()
                break
    got.end_s = time.perf_counter() - got.started
    return got


def _record(got: Received, name: str, payload: str, now: float) -> None:
    if name == "error":
        got.error_event = payload
        return
    if payload.strip() == "[DONE]":
        got.done = True
        return
    try:
        chunk = json.loads(payload)
    except ValueError:
        return
    if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
        return
    content = ""
    if chunk["choices"] and isinstance(chunk["choices"][0], dict):
        delta = chunk["choices"][0].get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            content = delta["content"]
    if content and got.first_token_s is None:
        got.first_token_s = now
    got.text += content
    got.arrivals.append(now)
    got.delivered.append(len(got.text))


def problem(got: Received, expected: str | None) -> tuple[str | None, bool]:
    """What is wrong with a received answer, if anything, and whether its timings are still usable.
    ``expected`` is the text the whole answer must carry; None for an answer stopped at its first token.
    """
    if got.status != 200:
        return f"status {got.status}", False
    if got.error_event is not None:
        return f"stream ended with an error event: {got.error_event[:200]}", False
    if expected is None:
        return (None, True) if got.first_token_s is not None else ("no token arrived", False)
    if not got.done:
        return "stream ended without [DONE]", False
    if got.text == expected:
        return None, True
    secrets = (("card", CARD), ("e-mail", EMAIL))
    leaks = [what for what, value in secrets if value in got.text and value not in expected]
    if leaks:
        return f"{' and '.join(leaks)} reached the client unmasked", True
    at = next(
        (i for i, (a, b) in enumerate(zip(got.text, expected, strict=False)) if a != b),
        min(len(got.text), len(expected)),
    )
    return (
        f"text differs from the expected at character {at}: got {got.text[at : at + 40]!r}, "
        f"expected {expected[at : at + 40]!r}"
    ), True


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(scanned: float | None, unscanned: float | None) -> float | None:
    if scanned is None or unscanned is None or unscanned <= 0:
        return None
    return scanned / unscanned


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


_START_KEYS = ("headers_ms", "first_byte_ms", "first_token_ms")
_STREAM_KEYS = ("duration_ms", "events", "body_bytes", "lag_chars_median", "events_per_s", "mb_per_s")


def _start_summary(got: Received) -> dict[str, Any]:
    return {
        "headers_ms": _ms(got.headers_s),
        "first_byte_ms": _ms(got.first_byte_s),
        "first_token_ms": _ms(got.first_token_s),
    }


def _stream_summary(got: Received, answer: Answer) -> dict[str, Any]:
    lag = got.lag(answer) or [0]
    return {
        "duration_ms": _ms(got.end_s),
        "events": len(got.arrivals),
        "body_bytes": got.body_bytes,
        "lag_chars_median": statistics.median(lag),
        "lag_chars_max": max(lag),
        "events_per_s": len(got.arrivals) / got.end_s,
        "mb_per_s": got.body_bytes / got.end_s / 1e6,
    }


def _path_summary(starts: list[Received], streams: list[Received], answer: Answer) -> dict[str, Any]:
    """Medians over the runs of one path: start figures from ``starts``, stream figures from ``streams``."""
    runs = {
        "start": [_start_summary(got) for got in starts],
        "stream": [_stream_summary(got, answer) for got in streams],
    }
    summary: dict[str, Any] = {"runs_ok": min(len(starts), len(streams))}
    for part, keys in (("start", _START_KEYS), ("stream", _STREAM_KEYS)):
        for key in keys:
            summary[key] = _median([r[key] for r in runs[part] if r[key] is not None])
    summary["lag_chars_max"] = max((r["lag_chars_max"] for r in runs["stream"]), default=None)
    summary["runs"] = runs
    return summary


def _added_per_event(pairs: list[tuple[Received, Received]]) -> dict[str, float | None]:
    """The later path's minus the earlier path's arrival (on one clock) of each event index of streams
    read together: median and p95 over the events of each pair, then the median over the pairs."""
    medians: list[float] = []
    p95s: list[float] = []
    for earlier, later in pairs:
        added = [
            (later.started + s - earlier.started - u) * 1000
            for u, s in zip(earlier.arrivals, later.arrivals, strict=False)
        ]
        if added:
            medians.append(statistics.median(added))
            p95s.append(percentile(added, 0.95))
    return {"median_ms": _median(medians), "p95_ms": _median(p95s)}


_ONE_BY_ONE = "one path after the other"


class _Runner:
    """Reads one answer through the paths, collecting what failed in ``errors`` rather than raising."""

    def __init__(self, session: aiohttp.ClientSession, paths: dict[str, str], errors: list[str]) -> None:
        self.session = session
        self.paths = paths
        self.errors = errors

    def order(self, run: int) -> list[str]:
        """The paths in the order of this run: alternating, so neither always goes first."""
        return list(self.paths) if run % 2 == 0 else list(reversed(self.paths))

    async def read(self, answer: Answer, name: str, where: str, *, whole: bool = True) -> Received | None:
        expected = (answer.masked if name == SCANNED else answer.content) if whole else None
        try:
            got = await fetch(self.session, self.paths[name], answer.name, until_first_token=not whole)
        except (aiohttp.ClientError, TimeoutError) as error:
            self.errors.append(f"{answer.name}/{name} {where}: {type(error).__name__}: {error}")
            return None
        wrong, usable = problem(got, expected)
        if wrong is not None:
            self.errors.append(f"{answer.name}/{name} {where}: {wrong}")
        return got if usable else None

    async def measure(self, answer: Answer, runs: int, concurrency: int) -> dict[str, Any]:
        starts: dict[str, list[Received]] = {name: [] for name in self.paths}
        streams: dict[str, list[Received]] = {name: [] for name in self.paths}
        together: list[dict[str, Received]] = []
        aggregate: dict[str, list[float]] = {name: [] for name in self.paths}
        for run in range(runs):
            if answer.delay_ms == 0:  # unpaced: one path after the other, ``concurrency`` streams each
                for name in self.order(run):
                    began = time.perf_counter()
                    reads = [self.read(answer, name, f"run {run + 1}") for _ in range(concurrency)]
                    got_all = [got for got in await asyncio.gather(*reads) if got is not None]
                    elapsed = time.perf_counter() - began
                    if len(got_all) == concurrency:
                        aggregate[name].append(sum(len(got.arrivals) for got in got_all) / elapsed)
                    starts[name].extend(got_all)
                    streams[name].extend(got_all)
                continue
            for name in self.order(run):  # start pass
                got = await self.read(answer, name, f"start run {run + 1}", whole=False)
                if got is not None:
                    starts[name].append(got)
                await asyncio.sleep(2 * answer.delay_ms / 1000 + 0.05)  # the demo notices the hang-up
            order = self.order(run)  # stream pass: every path at once
            both = await asyncio.gather(*(self.read(answer, n, f"stream run {run + 1}") for n in order))
            read = {name: got for name, got in zip(order, both, strict=True) if got is not None}
            for name, got in read.items():
                streams[name].append(got)
            together.append(read)
        summaries = {name: _path_summary(starts[name], streams[name], answer) for name in self.paths}
        paced = answer.delay_ms > 0
        for name, summary in summaries.items():
            summary["events_per_s_all_streams"] = None if paced else _median(aggregate[name])
        start_pass = _ONE_BY_ONE + (", stopped at the first token" if paced else "")
        compared = [(later, earlier) for later, earlier in COMPARED if {later, earlier} <= set(self.paths)]
        added: dict[str, dict[str, float | None]] = {}
        ratios: dict[str, dict[str, float | None]] = {}
        for later, earlier in compared:
            label = f"{later}/{earlier}"
            pairs = [(r[earlier], r[later]) for r in together if earlier in r and later in r]
            added[f"{later} vs {earlier}"] = _added_per_event(pairs)
            keys = ("first_byte_ms", "first_token_ms", "duration_ms", "events_per_s", "mb_per_s")
            ratios[label] = {k: _ratio(summaries[later][k], summaries[earlier][k]) for k in keys}
            ratios[label]["events_per_s_all_streams"] = _ratio(
                summaries[later]["events_per_s_all_streams"], summaries[earlier]["events_per_s_all_streams"]
            )
        return {
            "chars": len(answer.content),
            "chunk_chars": answer.chunk_chars,
            "delay_ms": answer.delay_ms,
            "model_events": answer.model_events,
            "concurrency": 1 if paced else concurrency,
            "passes": {"start": start_pass, "stream": "every path at once" if paced else _ONE_BY_ONE},
            "paths": summaries,
            "added_per_event": added if paced else {},
            "ratios": ratios,
        }


async def _run(
    demo_url: str, paths: dict[str, str], answers: list[Answer], runs: int, token: str, concurrency: int
) -> dict[str, Any]:
    errors: list[str] = []
    longest = max(a.model_events * a.delay_ms / 1000 for a in answers)
    timeout = aiohttp.ClientTimeout(total=longest + 60)
    caller = {"authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, headers=caller, connector=connector) as session:
        warm_up = Answer("warm-up", prose(64, seed=4), 4, 0, masked="")
        for answer in [*answers, warm_up]:
            script = {"id": answer.name, "content": answer.content, "chunk_chars": answer.chunk_chars}
            script["delay_ms"] = answer.delay_ms
            async with session.post(demo_url + "/_demo/replies", json=script) as response:
                response.raise_for_status()
        for url in paths.values():  # open a connection to each path and warm extproc up
            for _ in range(3):
                await fetch(session, url, warm_up.name)
        runner = _Runner(session, paths, errors)
        measured = {answer.name: await runner.measure(answer, runs, concurrency) for answer in answers}
    return {"runs": runs, "answers": measured, "errors": errors}


def run(
    demo_url: str,
    paths: dict[str, str],
    *,
    token: str = "",
    runs: int = 5,
    chars: int = 1500,
    chunk_chars: int = 4,
    delay_ms: int = 20,
    throughput_chars: int = 8192,
    concurrency: int = 8,
) -> dict[str, Any]:
    """Measure the scripted answers through ``paths`` (name to URL: envoy, floor, extproc), as the
    caller holding ``token``; the report ``markdown`` renders."""
    scripted = answers(chars, chunk_chars, delay_ms, throughput_chars)
    return asyncio.run(_run(demo_url, paths, scripted, runs, token, concurrency))


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    answers = report["answers"]
    paced = {name: a for name, a in answers.items() if a["delay_ms"] > 0}
    unpaced = {name: a for name, a in answers.items() if a["delay_ms"] == 0}
    lines = [
        f"Streamed answers, {report['when']}, {machine['cpus']} CPUs, medians of {report['runs']} runs; "
        f"{UNSCANNED} = Envoy alone, {FLOOR} = Envoy + a do-nothing ext_proc server, "
        f"{SCANNED} = Envoy + extproc (scanned)",
        "",
        "| answer | path | first byte ms | first token ms | duration ms | events | lag chars p50 "
        "| lag chars max |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in answers.items():
        label = f"{name} ({a['chars']} chars, {a['chunk_chars']}/event, {a['delay_ms']} ms)"
        for path, p in a["paths"].items():
            lines.append(
                f"| {label} | {path} | {_fmt(p['first_byte_ms'])} | {_fmt(p['first_token_ms'])} "
                f"| {_fmt(p['duration_ms'])} | {_fmt(p['events'], '.0f')} "
                f"| {_fmt(p['lag_chars_median'], '.0f')} | {_fmt(p['lag_chars_max'], '.0f')} |"
            )
            label = ""
    lines += [
        "",
        "First byte and first token: one path after the other. Paced answers' duration, events, lag "
        "and added per event: every path read at once, so the demo paces them alike (see bench/stream.py).",
        "",
        "| answer | compared | first token ratio | added per event ms p50 | p95 | duration ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, a in paced.items():
        label = name
        for compared, added in a["added_per_event"].items():
            r = a["ratios"][compared.replace(" vs ", "/")]
            lines.append(
                f"| {label} | {compared} | {_fmt(r['first_token_ms'], '.2f', 'x')} "
                f"| {_fmt(added['median_ms'], '.2f')} | {_fmt(added['p95_ms'], '.2f')} "
                f"| {_fmt(r['duration_ms'], '.2f', 'x')} |"
            )
            label = ""
    for name, a in unpaced.items():
        lines += [
            "",
            f"Unpaced answer {name!r}: {a['model_events']} token events, {a['concurrency']} streams at once "
            "per path, one path after the other.",
            "",
            "| path | events/s (all streams) | events/s (one stream) | MB/s (one stream, SSE body) |",
            "|---|---:|---:|---:|",
        ]
        for path, p in a["paths"].items():
            lines.append(
                f"| {path} | {_fmt(p['events_per_s_all_streams'], '.0f')} | {_fmt(p['events_per_s'], '.0f')} "
                f"| {_fmt(p['mb_per_s'], '.2f')} |"
            )
        lines += ["", "| ratio | events/s (all streams) |", "|---|---:|"]
        for label, r in a["ratios"].items():
            lines.append(f"| {label} | {_fmt(r['events_per_s_all_streams'], '.2f', 'x')} |")
    lines += ["", f"errors: {len(report['errors'])}"]
    lines += [f"- {error}" for error in report["errors"]]
    return "\n".join(lines) + "\n"
