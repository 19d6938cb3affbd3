"""`nanoseek serve` under schemathesis: requests generated from its own OpenAPI schema (valid and broken ones) never
get a 500 or hang past their time limit, and the server still answers after them."""

from __future__ import annotations

import pytest

from test_serve import checkpoint, loaded, request, serving  # noqa: F401 - the model fixtures of test_serve

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")


CASES = [("POST", "/v1/chat/completions", mode) for mode in ("positive", "negative")] + [
    ("POST", "/v1/completions", mode) for mode in ("positive", "negative")] + [
    ("GET", path, "positive") for path in ("/v1/models", "/health", "/metrics")]  # no parameters to break


@pytest.fixture(scope="module")
def live(loaded):  # noqa: F811
    with serving(loaded, max_len=64) as live:  # a short cache keeps each generated request short
        yield live


@pytest.mark.parametrize("method, path, mode", CASES)  # requests the schema allows, and ones it forbids
def test_no_request_the_schema_allows_or_breaks_gets_a_500_or_hangs(live, method, path, mode):
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operation = schema[path][method]
    examples = 25 if method == "POST" else 5

    @hypothesis.given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    @hypothesis.settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    def check(case):
        response = case.call(timeout=20)  # the server's 64-token cache bounds every request far below this
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]

    check()


def test_the_server_still_answers_after_the_fuzzing(live):
    status, reply = request(f"{live.url}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                                "max_tokens": 3})
    assert status == 200 and reply["usage"]["completion_tokens"] == 3
    assert request(f"{live.url}/health")[1]["in_flight"] == 0
