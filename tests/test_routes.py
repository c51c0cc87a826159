"""The model paths the proxy forwards (routes.model) and each API's output-token limit."""

import pytest

from extproc.errors import ConfigError
from extproc.routes import DEFAULT_MODEL_PATHS, check_pattern, is_model_path, output_token_field, within
from extproc.settings import load_settings


@pytest.mark.parametrize(
    ("path", "forwarded"),
    [
        ("/v1/chat/completions", True),
        ("/api/chat", True),
        ("/api/generate", True),
        ("/generate_stream", True),
        ("/completion", True),
        ("/api/pull", False),  # changes the server: not forwarded
        ("/api/chat/", False),  # an exact path is exact
        ("/completions", False),
        ("/v1", False),
        ("/v1/../api/pull", False),  # a server resolving the dot segments would serve /api/pull
        ("/v1/%2E%2E/api/pull", False),  # the same, percent-encoded
        ("/v1//chat/completions", False),
        ("/v1/chat\\..\\..\\api", False),
        ("", False),
    ],
)
def test_which_paths_are_forwarded_by_default(path: str, forwarded: bool) -> None:
    assert is_model_path(path, DEFAULT_MODEL_PATHS) is forwarded


@pytest.mark.parametrize("pattern", ["v1/", "/v1/*", "/api/chat?x=1", "/api//chat", "/v1/../", "/a b"])
def test_a_pattern_envoy_could_not_match_as_written_is_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="model path"):
        check_pattern(pattern)
    with pytest.raises(ConfigError):
        load_settings(None, routes={"model": [pattern]})


def test_the_settings_default_to_the_documented_paths() -> None:
    assert load_settings(None).routes.model == list(DEFAULT_MODEL_PATHS)
    with pytest.raises(ConfigError):
        load_settings(None, routes={"model": []})


@pytest.mark.parametrize(
    ("route", "field"),
    [
        ("/v1/chat/completions", ("max_tokens",)),
        ("/v1/responses", ("max_output_tokens",)),
        ("/api/chat", ("options", "num_predict")),
        ("/api/generate", ("options", "num_predict")),
        ("/generate", ("parameters", "max_new_tokens")),
        ("/completion", ("n_predict",)),
    ],
)
def test_a_cap_is_written_in_the_apis_own_spelling(route: str, field: tuple[str, ...]) -> None:
    assert output_token_field(route) == field


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        (0, True),
        (100, True),
        (101, False),
        (-1, False),
        (-2, False),
        (None, False),
        (True, False),
        (5.0, False),
    ],
    ids=["zero", "limit", "over", "unlimited", "fill-context", "null", "bool", "float"],
)
def test_only_a_count_up_to_the_limit_keeps_to_it(value: object, kept: bool) -> None:
    assert within(value, 100) is kept
