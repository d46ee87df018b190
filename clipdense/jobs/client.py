"""A `JobSubmissionClient` for a dashboard address, with Ray token authentication handled here.

Ray 2.60 enables token auth by default on `ray start --head` clusters. Ray's own client only sends the token when
its process runs with `RAY_AUTH_MODE=token` (read once, at import of the C++ config), so a client started without
it fails with "Missing authentication token". We read the token ourselves, from the same places Ray does, and send
it as an explicit `Authorization: Bearer` header, which works whatever this process's auth mode is (a cluster
without auth ignores the header).
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from clipdense.config import UserError

DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"
HINT = ("copy the head's token (`ray get-auth-token` on the head; for KubeRay the cluster's Secret) into "
        "~/.ray/auth_token, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, or pass --token-file")


def read_token(token_file: str | Path | None = None) -> str | None:
    """The token to send: `token_file`, else $RAY_AUTH_TOKEN, else $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    if token_file is not None:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise UserError(f"token file not found: {path}")
        token = path.read_text().strip()
        if not token:
            raise UserError(f"token file is empty: {path}")
        return token
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    env_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if env_path:
        return read_token(env_path)
    if DEFAULT_TOKEN_PATH.is_file():
        return DEFAULT_TOKEN_PATH.read_text().strip() or None
    return None


def check_address(address: str | None) -> str:
    """The dashboard URL (`http://HEAD:8265`), or a one-line UserError saying what is wrong with it."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or ""
    if not address and os.environ.get("RAY_ADDRESS", "").startswith("http"):
        address = os.environ["RAY_ADDRESS"]
    if not address:
        raise UserError("no cluster address: pass --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")
    url = urlparse(address)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UserError(f"bad address {address!r}: expected the dashboard URL, e.g. http://127.0.0.1:8265")
    try:
        _ = url.port  # parses it
    except ValueError:
        raise UserError(f"bad address {address!r}: the port is not a number") from None
    return address.rstrip("/")


def make_client(address: str | None, token_file: str | Path | None = None):
    """Connect to the Jobs API at `address`; connection and auth failures become one-line UserErrors."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = check_address(address)
    token = read_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        what = "was rejected" if token else "is required and none was found"
        raise UserError(f"the cluster at {address} uses token authentication: the token {what} "
                        f"({_first_line(e)}); {HINT}") from None
    except ConnectionError:
        raise UserError(f"cannot reach the Ray dashboard at {address}: is the cluster up and the port forwarded "
                        "(`ray dashboard CLUSTER.yaml`, `kubectl port-forward`)?") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
