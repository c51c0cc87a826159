"""The in-process exchange bench measures a path that masks: it refuses to report a figure for
exchanges that let the prompt's values through."""

import pytest

from bench import exchange, stream
from bench.__main__ import CARD, EMAIL, PROMPT


def test_the_exchange_bench_reports_the_cpu_of_masked_exchanges() -> None:
    report = exchange.run(0.2, PROMPT, (CARD, EMAIL), stream.answers()[1].content)
    assert report["exchanges"] > 0
    assert report["cpu_us_per_exchange"] > 0
    assert report["cpu_us_per_event"] > 0
    assert report["cpu_us_per_traced_exchange"] > 0  # it raises when no span was exported
    assert "extproc/exchange.py" in report["profile"]
    assert "extproc/mask/sse.py" in report["stream_profile"]


def test_the_exchange_bench_refuses_a_path_that_lets_a_value_through() -> None:
    with pytest.raises(RuntimeError, match="let a value through"):
        exchange.run(0.2, PROMPT, ("quarterly report",), "a short answer")
