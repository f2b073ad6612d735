"""The model hub, seen from a load: whether it can be reached at all (found in seconds, not after the
retries), and whether a checkpoint is in the local cache."""
from __future__ import annotations

# How long the reachability probe of the hub may take; a hub slower than this is left to
# huggingface_hub's own retries.
HUB_PROBE_SECONDS = 5.0


def hub_unreachable(endpoint: str | None = None) -> str | None:
    """Why the model hub certainly cannot be reached from here, found in seconds; None when it
    may be reachable (it answers, it is slow, or a proxy stands between).

    Without this, huggingface_hub retries an unresolvable host for about two and a half
    minutes before the load fails.
    """
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy knows
    url = urlparse(endpoint or constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
            result.append(None)
        except socket.gaierror:
            result.append(f"the name {host} cannot be resolved (no network?)")
        except OSError as err:
            result.append(f"{host}:{port} refuses connections ({err.strerror or err})"
                          if isinstance(err, ConnectionRefusedError) else None)

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(HUB_PROBE_SECONDS)
    return result[0] if result else None


def is_cached(model_path: str, revision: str | None) -> bool:
    """Whether the hub cache holds ``model_path``'s config (a load can then go offline)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model_path, "config.json", revision=revision), str)
    except ValueError:  # not a valid repo id
        return False
