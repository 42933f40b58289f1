"""Is Modal usable from here?  Answered in well under a second, before any Modal call.

Without a token the Modal client fails with an AuthError; with a token but no network it
retries for about a minute before a ConnectionError.  `zoo modal ...`, `zoo sync` and the
remote side of `zoo ckpts`/`zoo clean` call `check_modal_ready` first, which reads the token
the way the Modal client does (MODAL_TOKEN_ID/MODAL_TOKEN_SECRET, else the active profile of
~/.modal.toml or $MODAL_CONFIG_PATH) and opens one TCP connection to the Modal server with a
short timeout, and otherwise says what is wrong and what to run.
"""

import importlib.util
import os
import socket
import ssl
import threading
import tomllib
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_SERVER_URL = "https://api.modal.com"
SETUP_HINT = (
    "run `modal setup` once (it opens a browser to create a token), "
    "or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"
)


class ModalUnavailable(RuntimeError):
    """Modal cannot be used from here: no token, no network. The message says what to do."""


def modal_config_path() -> Path:
    return Path(os.environ.get("MODAL_CONFIG_PATH") or Path.home() / ".modal.toml")


def _profiles() -> dict[str, dict]:
    path = modal_config_path()
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ModalUnavailable(
            f"{path} is not valid TOML ({exc}); fix or delete it, then {SETUP_HINT}"
        ) from exc


def _active_profile(profiles: dict[str, dict]) -> str:
    """The Modal client's rule: $MODAL_PROFILE, else the profile marked active, else 'default'."""
    if os.environ.get("MODAL_PROFILE"):
        return os.environ["MODAL_PROFILE"]
    return next((name for name, values in profiles.items() if values.get("active") is True), "default")


def token_source() -> str | None:
    """Where a Modal token comes from ('environment', '~/.modal.toml (profile x)'), or None."""
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return "environment"
    profiles = _profiles()
    name = _active_profile(profiles)
    profile = profiles.get(name, {})
    if profile.get("token_id") and profile.get("token_secret"):
        return f"{modal_config_path()} (profile {name})"
    return None


def check_token() -> str:
    """Raise ModalUnavailable unless a Modal token is configured; return where it comes from."""
    source = token_source()
    if source is None:
        raise ModalUnavailable(f"no Modal token configured: {SETUP_HINT}")
    return source


def server_url() -> str:
    if os.environ.get("MODAL_SERVER_URL"):
        return os.environ["MODAL_SERVER_URL"]
    profiles = _profiles()
    return profiles.get(_active_profile(profiles), {}).get("server_url", DEFAULT_SERVER_URL)


def check_reachable(timeout_s: float = 4.0) -> None:
    """Connect to the Modal server (and for https, complete a TLS handshake), within `timeout_s`.

    A bare TCP connection proves little: sandboxes and captive networks accept connections to
    any address.  A TLS handshake with a certificate valid for the host does prove a path.
    """
    url = server_url()
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s) as sock:
                if parsed.scheme == "https":
                    with ssl.create_default_context().wrap_socket(sock, server_hostname=host):
                        pass
            outcome.append(None)
        except OSError as exc:  # ssl.SSLError and socket.timeout are OSErrors too
            outcome.append(exc)

    # getaddrinfo ignores socket timeouts; a daemon thread bounds the whole attempt.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise ModalUnavailable(
            f"cannot reach Modal at {url}: no answer within {timeout_s:.0f}s; check the network"
        )
    if outcome[0] is not None:
        raise ModalUnavailable(
            f"cannot reach Modal at {url} ({outcome[0]}); check the network or proxy settings"
        )


def check_modal_package() -> None:
    if importlib.util.find_spec("modal") is None:
        raise ModalUnavailable(
            "the modal package is not installed: pip install 'zoo[remote]', then run `modal setup`"
        )


def check_modal_ready(timeout_s: float = 4.0) -> str:
    """Raise ModalUnavailable unless modal is installed, a token configured and the server answers.

    Returns where the token came from.
    """
    check_modal_package()
    source = check_token()
    check_reachable(timeout_s)
    return source
