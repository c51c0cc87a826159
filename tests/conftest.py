import contextlib
import json
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import anthropic
import httpx
import pytest
from anthropic.lib.streaming import MessageStream

from extproc.devenv import Stack

from . import markers
from .redis_fixture import RedisServer

# pytester: tests of the suite's own plugins; stack_logs: a failed test's report shows its Stack's logs.
pytest_plugins = ["pytester", "tests.stack_logs"]


def pytest_configure(config: pytest.Config) -> None:
    # One Hyperscan compile of the default pack per test session, shared by every server the tests start.
    os.environ.setdefault("EXTPROC_DETECT__CACHE_DIR", tempfile.mkdtemp(prefix="extproc-hs-cache-"))
    # Every server a test starts serves the approvers' API on a free port, never the fixed default.
    os.environ.setdefault("EXTPROC_APPROVALS__API_ADDRESS", "127.0.0.1:0")


def start_stack(log_path: Path, **options: Any) -> Stack:
    # No drain period on stop: the tests that need one start their own server. No identity unless the
    # test asks for the dev one: said in so many words, as a server refuses to start without a choice.
    env = {"EXTPROC_SERVER__DRAIN_SECONDS": "0", **options.pop("extra_env", {})}
    if options.get("dev_identity") is None:
        env.setdefault("EXTPROC_IDENTITY__MODE", "none")
    return Stack(log_path=log_path, envoy_concurrency=1, extra_env=env, **options).start()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Envoy + extproc + demo model on free ports, shared by the end-to-end tests."""
    log = tmp_path_factory.mktemp("stack") / "stack.log"
    running = start_stack(log)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the approval store tests; each test keeps to a key prefix of its own."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


class Demo:
    """The demo model's control surface: scripted replies and the requests it received."""

    def __init__(self, url: str) -> None:
        self.url = url

    def script(self, **reply: Any) -> str:
        reply_id = reply.pop("id", uuid.uuid4().hex)
        httpx.post(f"{self.url}/_demo/replies", json={"id": reply_id, **reply}).raise_for_status()
        return str(reply_id)

    def received(self, tag: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/_demo/requests", params={"tag": tag})
        answer.raise_for_status()
        found: list[dict[str, Any]] = answer.json()
        return found


@pytest.fixture
def demo(stack: Stack) -> Demo:
    return Demo(stack.demo_url)


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex


def chat(content: str, **extra: Any) -> bytes:
    return json.dumps(
        {"model": "demo-small", "messages": [{"role": "user", "content": content}], **extra}
    ).encode()


@contextlib.contextmanager
def anthropic_stream(stack: Stack, reply: str) -> Iterator[MessageStream]:
    """The demo model's scripted ``reply`` streamed through the stack, as the official anthropic client
    reads a Messages stream."""
    client = anthropic.Anthropic(base_url=stack.url, api_key="unused", max_retries=0)
    with (
        client,
        client.messages.stream(
            model="demo-small",
            max_tokens=100,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-demo-reply": reply},
        ) as stream,
    ):
        yield stream


# -- markers: what a test starts, and which tests are slow ----------------------------------------------

# Measured with `pytest --durations` (one file at a time, the compiled rule pack already cached, so the
# first test of a file does not pay the compile): tests over about two seconds on a shared two-core
# machine, beside whole modules marked slow in their own file (tests/test_faults.py,
# tests/test_record_faults.py). A name here that no longer matches a test fails tests/test_markers.py.
SLOW: Final[frozenset[str]] = frozenset(
    {
        # in process: approval holds waited out, the exchange benchmark, a server's notifications
        "tests/test_approvals_server.py::test_a_client_leaving_during_a_hold_ends_the_wait_and_is_recorded",
        "tests/test_approvals_server.py::test_a_hold_extends_the_timeout_waits_and_sends_the_approved_body_on",
        "tests/test_bench_exchange.py::test_the_exchange_bench_reports_the_cpu_of_masked_exchanges",
        "tests/test_bench_exchange.py::test_the_exchange_bench_refuses_a_path_that_lets_a_value_through",
        "tests/test_approval_notify.py::test_the_server_announces_what_its_approval_service_is_asked",
        "tests/test_one_value.py::test_the_most_specific_rule_reports_the_value",
        "tests/test_one_value.py::test_a_rule_only_the_joined_strings_reveal_still_reaches_the_policy",
        "tests/test_policy_layering.py::test_policy_show_prints_the_effective_policy_of_the_shipped_set",
        "tests/test_stream_hold.py::test_every_sample_fed_one_character_at_a_time",
        "tests/test_stream_hold.py::test_a_match_starting_before_the_hold_is_decided",
        "tests/test_stream_final_text.py::test_every_final_text_is_exactly_what_its_deltas_assembled_to",
        "tests/test_server.py::test_serve_stops_cleanly_on_sigterm",
        "tests/test_signals.py::test_sighup_reloads_and_the_server_keeps_serving",
        "tests/test_stream_refusals.py::test_regression_a_refused_card_split_across_events_is_not_released_in_clear_on_the_cut",
        "tests/test_stream_refusals.py::test_regression_invisible_characters_alone_are_released_and_cost_linear_time",
        "tests/test_workers.py::test_workers_that_keep_dying_stop_the_service",
        "tests/test_workers.py::test_sigterm_stops_every_worker_and_each_record_verifies",
        "tests/test_workers.py::test_one_worker_keeps_the_port_exclusive",
        "tests/test_signals.py::test_a_stop_signal_drains_and_ends_the_record_with_a_signed_final_checkpoint",
        # processes: Chromium, a venv installed from the lock, extproc commands that load the rule pack
        "tests/test_approval_browser.py::test_an_approver_decides_in_the_page",
        "tests/test_approvals_cli.py::test_list_show_approve_and_deny_from_the_command_line",
        "tests/test_deploy.py::test_the_image_install_steps_give_a_working_sidecar_from_the_runtime_lock",
        "tests/test_cli.py::test_scan_keeps_the_compiled_pack_in_the_users_cache_folder",
        "tests/test_cli.py::test_audit_keygen_verify_and_show",
        "tests/test_cli.py::test_rules_check_passes_on_the_default_pack",
        "tests/test_cli.py::test_scan_mask_of_clean_text_exits_0",
        "tests/test_cli.py::test_scan_json_lines",
        "tests/test_cli.py::test_scan_finds_nothing_in_clean_text",
        "tests/test_cli.py::test_hash_list_feeds_a_hashed_rule",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markers.mark(items)
    for item in items:
        if item.nodeid.split("[")[0] in SLOW:
            item.add_marker("slow")


@pytest.fixture(autouse=True)
def no_process_in_unit_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test marked ``unit`` that starts a process fails: the marker rule (tests/markers.py) or the
    mark written on the test is wrong, and ``-m unit`` would no longer be what it says."""
    if request.node.get_closest_marker("unit") is None:
        return
    original = subprocess.Popen.__init__

    def refuse(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        pytest.fail(
            f"a test marked unit started a process ({args!r}): mark it process or envoy "
            "(tests/markers.py says how the rule decides)",
            pytrace=False,
        )
        original(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
