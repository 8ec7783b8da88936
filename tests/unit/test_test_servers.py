"""tests/servers.py: which nats-server the ``nats_server`` fixture starts.

The Docker path itself is not exercised here (no Docker engine on this machine): the
selection is, with the engine probe injected, and the real probe against a socket that
does not exist.
"""

from __future__ import annotations

from tests.servers import choose_test_server, docker_engine_problem


def no_probe() -> str | None:
    raise AssertionError("the Docker engine was probed although CHORA_TEST_DOCKER is not set")


def test_without_the_variable_the_embedded_server_is_chosen_and_docker_is_not_probed():
    for env in ({}, {"CHORA_TEST_DOCKER": ""}, {"CHORA_TEST_DOCKER": "0"}, {"CHORA_TEST_DOCKER": "no"}):
        choice = choose_test_server(env, probe=no_probe)
        assert choice.kind == "embedded", env
        assert "CHORA_TEST_DOCKER is not set" in choice.reason


def test_with_the_variable_and_no_engine_the_embedded_server_is_chosen_and_the_reason_is_given():
    choice = choose_test_server({"CHORA_TEST_DOCKER": "1"}, probe=lambda: "FileNotFoundError: no socket")
    assert choice.kind == "embedded"
    assert "CHORA_TEST_DOCKER=1 but no Docker engine answers" in choice.reason
    assert "FileNotFoundError: no socket" in choice.reason


def test_with_the_variable_and_an_engine_that_answers_docker_is_chosen():
    for value in ("1", "true", "YES"):
        choice = choose_test_server({"CHORA_TEST_DOCKER": value}, probe=lambda: None)
        assert choice.kind == "docker", value
        assert "nats:2" in choice.reason
    choice = choose_test_server({"CHORA_TEST_DOCKER": "1", "CHORA_TEST_DOCKER_IMAGE": "nats:2.11"}, probe=lambda: None)
    assert choice.kind == "docker" and "nats:2.11" in choice.reason


def test_the_real_probe_reports_an_engine_that_does_not_answer(tmp_path):
    problem = docker_engine_problem({"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})
    assert problem is not None and "FileNotFoundError" in problem, problem
