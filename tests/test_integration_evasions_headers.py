"""Issue 12, class 6 (headers and URLs), through real Envoy 1.40, extproc and the demo model, both ways:
what the model receives of the request's headers and path, and what the client receives of the answer's
headers. Each case was a way through before headers and the URL were scanned."""

from typing import Any

import httpx
import pytest

from extproc.devenv import Stack

from .conftest import Demo, chat

CARD = "4111 1111 1111 1111"
DIGITS = "4111111111111111"
MASKED = "**** **** **** 1111"  # the default pack masks a card but for its last four digits
MASKED_DIGITS = "************1111"


def post(stack: Stack, tag: str, path: str = "/v1/chat/completions", **kwargs: Any) -> httpx.Response:
    headers = [("content-type", "application/json"), ("x-test-tag", tag), *kwargs.pop("headers", [])]
    return httpx.post(f"{stack.url}{path}", content=chat("hi"), headers=headers, timeout=30, **kwargs)


def seen(demo: Demo, tag: str) -> dict[str, Any]:
    [request] = demo.received(tag)
    assert isinstance(request, dict)
    return request


def values(request: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in request["header_list"] if key == name]


# -- the request, as the model receives it -------------------------------------------------------------


def test_a_card_in_a_request_header_reaches_the_model_masked(stack: Stack, demo: Demo, tag: str) -> None:
    assert post(stack, tag, headers=[("x-debug", f"card={CARD}")]).status_code == 200
    assert values(seen(demo, tag), "x-debug") == [f"card={MASKED}"]


def test_a_card_as_a_request_header_name_never_reaches_the_model(stack: Stack, demo: Demo, tag: str) -> None:
    assert post(stack, tag, headers=[(f"x-{DIGITS}", "1")]).status_code == 200
    assert DIGITS not in str(seen(demo, tag)["header_list"])


SPACED = "****%20****%20****%201111"


@pytest.mark.parametrize(
    ("query", "masked"),
    [
        (DIGITS, MASKED_DIGITS),
        ("4111+1111+1111+1111", SPACED),
        ("4111%201111%201111%201111", SPACED),
        ("".join(f"%{ord(c):02X}" for c in DIGITS), MASKED_DIGITS),
        ("".join(f"%25{ord(c):02X}" for c in DIGITS), MASKED_DIGITS),
    ],
    ids=["plain", "plus-as-space", "encoded-separator", "encoded-digits", "double-encoded-digits"],
)
def test_a_card_in_the_query_reaches_the_model_masked(
    stack: Stack, demo: Demo, tag: str, query: str, masked: str
) -> None:
    assert post(stack, tag, path=f"/v1/chat/completions?card={query}").status_code == 200
    assert seen(demo, tag)["raw_path"] == f"/v1/chat/completions?card={masked}"


def test_an_email_in_the_path_reaches_the_model_masked(stack: Stack, demo: Demo, tag: str) -> None:
    path = "/v1/chat/completions?user=jane.doe%40example.com"
    assert post(stack, tag, path=path).status_code == 200
    assert seen(demo, tag)["raw_path"] == "/v1/chat/completions?user=%5BREDACTED%3AEMAIL_ADDRESS%5D"


def test_a_card_split_across_repeated_request_headers_reaches_the_model_masked(
    stack: Stack, demo: Demo, tag: str
) -> None:
    assert post(stack, tag, headers=[("x-note", "4111 1111"), ("x-note", "1111 1111")]).status_code == 200
    received = values(seen(demo, tag), "x-note")
    assert received == [MASKED, ""]  # the whole value masked, in the first piece


def test_a_card_in_the_host_header_is_refused_and_never_reaches_the_model(
    stack: Stack, demo: Demo, tag: str
) -> None:
    answer = post(stack, tag, headers=[("host", f"{DIGITS}.example.com")])
    assert (answer.status_code, answer.json()["error"]) == (403, "header_not_maskable")
    assert DIGITS not in answer.text
    assert demo.received(tag) == []


def test_a_card_at_the_end_of_a_long_request_header_reaches_the_model_masked(
    stack: Stack, demo: Demo, tag: str
) -> None:
    # Under the demo model's own 8 KiB header limit; Envoy's is 60 KiB, extproc's MAX_HEADER_CHARS.
    assert post(stack, tag, headers=[("x-long", "a " * 3_000 + CARD)]).status_code == 200
    [value] = values(seen(demo, tag), "x-long")
    assert value.endswith(MASKED)


# -- the answer, as the client receives it ---------------------------------------------------------------


def scripted(stack: Stack, demo: Demo, headers: object, *, stream: bool = False) -> httpx.Response:
    reply = demo.script(content="fine", headers=headers)
    return httpx.post(
        f"{stack.url}/v1/chat/completions",
        content=chat("hi", stream=stream),
        headers={"content-type": "application/json", "x-demo-reply": reply},
        timeout=30,
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_card_in_a_response_header_reaches_the_client_masked(
    stack: Stack, demo: Demo, stream: bool
) -> None:
    answer = scripted(stack, demo, {"x-debug": f"card={CARD}"}, stream=stream)
    assert answer.status_code == 200
    assert answer.headers["x-debug"] == f"card={MASKED}"
    assert "fine" in answer.text


def test_a_token_in_a_location_query_reaches_the_client_masked(stack: Stack, demo: Demo) -> None:
    answer = scripted(
        stack, demo, {"location": f"https://example.test/cb?mail=jane.doe%40example.com&c={DIGITS}"}
    )
    assert answer.headers["location"] == (
        f"https://example.test/cb?mail=%5BREDACTED%3AEMAIL_ADDRESS%5D&c={MASKED_DIGITS}"
    )


def test_a_card_in_one_of_repeated_set_cookie_headers_is_masked_and_the_others_kept(
    stack: Stack, demo: Demo
) -> None:
    cookies = [["set-cookie", "a=1"], ["set-cookie", f"b={DIGITS}"], ["set-cookie", "c=3"]]
    answer = scripted(stack, demo, cookies)
    assert answer.headers.get_list("set-cookie") == ["a=1", f"b={MASKED_DIGITS}", "c=3"]


def test_a_card_in_a_response_content_type_is_refused_before_anything_reaches_the_client(
    stack: Stack, demo: Demo
) -> None:
    reply = demo.script(raw_b64="e30=", content_type=f"application/json; x={DIGITS}")
    answer = httpx.post(
        f"{stack.url}/v1/chat/completions",
        content=chat("hi"),
        headers={"content-type": "application/json", "x-demo-reply": reply},
        timeout=30,
    )
    assert (answer.status_code, answer.json()["error"]) == (502, "upstream_header_not_maskable")
    assert DIGITS not in answer.text
    assert DIGITS not in str(answer.headers)
