"""ICE servers handed to clients in `welcome`: the embedded TURN server and configured ones.

Credentials are coturn's shared-secret ("TURN REST") form, fresh for every session and valid for
``ice.credential_ttl_s``, so the same secret works with our server and with coturn's
``use-auth-secret``.
"""

from __future__ import annotations

from typing import Any

from turn.credentials import rest_credentials

from ..config import Config
from .session import Session


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class IceServers:
    """Builds the `ice_servers` list of `welcome` for one session."""

    def __init__(self, cfg: Config, turn_secret: str | None) -> None:
        self.cfg = cfg
        self.turn_secret = turn_secret

    def __call__(self, session: Session, host: str) -> list[dict[str, Any]]:
        cfg = self.cfg
        ttl = cfg.ice.credential_ttl_s
        out: list[dict[str, Any]] = []
        if self.turn_secret and cfg.turn.enabled:
            h = _url_host(cfg.turn.public_host or host)
            port = cfg.turn.port
            user, password = rest_credentials(self.turn_secret, session.identity, ttl)
            urls = [f"stun:{h}:{port}", f"turn:{h}:{port}?transport=udp"]
            if cfg.turn.tcp:
                urls.append(f"turn:{h}:{port}?transport=tcp")
            if cfg.server.tls_cert and cfg.server.tls_key and cfg.turn.tls_port:
                urls.append(f"turns:{h}:{cfg.turn.tls_port}?transport=tcp")
            out.append({"urls": urls, "username": user, "credential": password})
        for server in cfg.ice.servers:
            urls_v = server["urls"]
            entry: dict[str, Any] = {"urls": [urls_v] if isinstance(urls_v, str) else urls_v}
            if "secret" in server:
                entry["username"], entry["credential"] = rest_credentials(
                    server["secret"], session.identity, ttl
                )
            elif "username" in server:
                entry["username"] = server["username"]
                entry["credential"] = server.get("credential", "")
            out.append(entry)
        return out
