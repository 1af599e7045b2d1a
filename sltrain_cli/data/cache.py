"""The cache root, cache-key digests and the Hugging Face hub probe (no other data module is imported here)."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from pathlib import Path
from typing import List, Optional
from urllib.parse import urlparse

from ..configs import TokenizerConfig, UserError

_OFFLINE_HINT = ("give data.path= a local allenai/c4 mirror (README: Reproduce the paper on your cluster), or use "
                 "data=sotu (offline, the default) or data=local data.path=FILES")


def default_cache_root() -> Path:
    """$SLTRAIN_CACHE_DIR, else ~/.cache/sltrain; trained tokenizers go in tokenizers/, token ids in tokens/."""
    return Path(os.environ.get("SLTRAIN_CACHE_DIR") or "~/.cache/sltrain").expanduser()


def digest(obj) -> str:
    """16 hex digits of a JSON-able object: the cache keys of corpora, tokenizers and token ids."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_root(tok_cfg: TokenizerConfig) -> Path:
    """Where a run caches trained tokenizers and token ids: tokenizer.cache_dir, else ``default_cache_root()``."""
    return Path(tok_cfg.cache_dir).expanduser() if tok_cfg.cache_dir else default_cache_root()


def hub_unreachable(timeout: float = 3.0) -> Optional[str]:
    """None when the Hugging Face hub answers a TCP connect, else the reason (offline flag or socket error)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: List[Optional[str]] = [f"no answer from {host}:{port} within {timeout:g} s"]

    def probe() -> None:  # in a thread: a DNS lookup ignores the socket timeout and can hang
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result[0] = None
        except OSError as err:
            result[0] = f"cannot connect to {host}:{port}: {err.strerror or type(err).__name__}"

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0]


def require_c4() -> None:
    reason = hub_unreachable()
    if reason:
        raise UserError(f"data=c4 streams allenai/c4 from the Hugging Face hub, which is unreachable ({reason}); "
                        f"{_OFFLINE_HINT}")
