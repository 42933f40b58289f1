"""Without a Modal token or network every command that needs Modal says so at once, pointing at
`modal setup`, instead of hanging inside the Modal client. No test here reaches the network:
the Modal server address points at a closed local port."""

import socket
import time

import pytest
import typer
from test_remote_fixtures import offline_modal, write_run
from typer.testing import CliRunner

from zoo.remote.credentials import ModalUnavailable, check_modal_ready, check_reachable, token_source
from zoo_cli.main import app as zoo_app

runner = CliRunner()

MODAL_COMMANDS = [
    ["modal", "submit", "moons", "--gpu", "H100"],
    ["modal", "status"],
    ["modal", "logs", "some-run"],
    ["modal", "stop", "some-run"],
    ["sync"],
    ["ckpts", "--remote"],
    ["ckpts", "download", "some-run"],
    ["clean", "some-run", "--remote"],
]


def cli() -> typer.Typer:
    """The real `zoo` app, as installed."""
    return zoo_app


@pytest.fixture(autouse=True)
def no_modal(tmp_path, monkeypatch):
    """A home without ~/.modal.toml, no token variables, and a Modal server that refuses connections."""
    offline_modal(tmp_path, monkeypatch)


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("args", MODAL_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_without_a_token_every_modal_command_fails_at_once(args):
    started = time.monotonic()
    result = runner.invoke(cli(), args)
    assert time.monotonic() - started < 3
    assert result.exit_code == 1, result.output
    assert "no Modal token configured" in flat(result.output) and "modal setup" in flat(result.output)


@pytest.mark.parametrize("args", MODAL_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_with_a_token_but_no_network_every_modal_command_fails_at_once(args, monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    started = time.monotonic()
    result = runner.invoke(cli(), args)
    assert time.monotonic() - started < 3
    assert result.exit_code == 1, result.output
    assert "cannot reach Modal" in flat(result.output)


def test_tokens_are_found_where_the_modal_client_looks(tmp_path, monkeypatch):
    assert token_source() is None
    config = tmp_path / ".modal.toml"
    config.write_text('[work]\ntoken_id = "ak-1"\ntoken_secret = "as-1"\n')
    assert token_source() is None  # a profile that is not active (and not "default") is not used
    config.write_text('[work]\ntoken_id = "ak-1"\ntoken_secret = "as-1"\nactive = true\n')
    assert token_source() == f"{config} (profile work)"
    monkeypatch.setenv("MODAL_PROFILE", "other")
    assert token_source() is None
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-2")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-2")
    assert token_source() == "environment"


def test_a_broken_modal_config_is_reported(tmp_path):
    (tmp_path / ".modal.toml").write_text("this is [not toml")
    with pytest.raises(ModalUnavailable, match="not valid TOML"):
        check_modal_ready()


def test_a_server_that_answers_passes_the_check(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("MODAL_SERVER_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        check_reachable(timeout_s=2)


def test_a_server_that_accepts_but_never_speaks_tls_fails_quickly(monkeypatch):
    """What a sandbox or captive portal does: the TCP connection opens, nothing real answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("MODAL_SERVER_URL", f"https://127.0.0.1:{server.getsockname()[1]}")
        started = time.monotonic()
        with pytest.raises(ModalUnavailable, match="cannot reach Modal"):
            check_reachable(timeout_s=0.5)
        assert time.monotonic() - started < 2


def test_ckpts_falls_back_to_synced_copies_when_modal_is_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    write_run(tmp_path / "outputs", "here", archived=[5], last_step=5)
    result = runner.invoke(cli(), ["ckpts", "--outputs", str(tmp_path / "outputs")])
    assert result.exit_code == 0, result.output
    assert "remote runs not listed" in flat(result.output) and "here" in result.output
