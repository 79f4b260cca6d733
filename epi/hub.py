"""Is the Hugging Face hub usable? Answered in seconds, where the hub libraries would retry for a minute."""

from __future__ import annotations

import os
import socket

MODELS = ("HF_HUB_OFFLINE",)
DATASETS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")  # the environment switches that keep each library offline


def offline_env(switches: tuple[str, ...]) -> str | None:
    """The offline switch that is set, if any: the hub library then reads only its local cache."""
    for name in switches:
        if os.environ.get(name) == "1":
            return f"{name}=1 is set"
    return None


def unreachable_reason(switches: tuple[str, ...]) -> str | None:
    """Why nothing can be fetched from the hub now, or None when it answers."""
    reason = offline_env(switches)
    if reason:
        return reason
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return "the Hugging Face hub is not reachable from this machine"
    return None
