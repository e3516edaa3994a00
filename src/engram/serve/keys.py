"""API keys and the patch ids each may use (``engram serve --patches DIR --keys FILE``).

The keys file is JSON: ``{"keys": {"KEY": ["patch-id", ...], ...}}``; ``"*"`` in a key's list
allows every patch. A request sends its key as ``Authorization: Bearer KEY`` (or ``X-API-Key:
KEY``). Without a keys file every request may name every patch (the default binding is loopback,
so only this machine can ask). With one: no key or an unknown key is 401, a patch outside the
key's set is 403 whether or not it exists (a key cannot probe for other tenants' ids), and an
allowed id with no file is 404. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path
from typing import Iterable, Mapping, Optional

from engram.errors import EngramError
from engram.fsutil import PathLike


class KeysFileError(EngramError):
    """A keys file that cannot be read; the message names the file and the fix."""


class UnauthorizedError(EngramError):
    http_status = 401


class ForbiddenError(EngramError):
    http_status = 403


ALL = "*"


class KeyRing:
    """Which patch ids each API key may use."""

    def __init__(self, allowed: Mapping[str, Iterable[str]]) -> None:
        self._allowed = {k: frozenset(v) for k, v in allowed.items()}

    @classmethod
    def load(cls, path: PathLike) -> "KeyRing":
        p = Path(path)
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KeysFileError(f"keys file {p} not found; write {{\"keys\": {{\"KEY\": [\"patch-id\", ...]}}}}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise KeysFileError(f"keys file {p} is not valid JSON ({e}); write {{\"keys\": {{\"KEY\": [ids]}}}}") from None
        keys = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(keys, dict) or not keys:
            raise KeysFileError(f"keys file {p} needs a non-empty object \"keys\": {{\"KEY\": [\"patch-id\", ...]}}")
        for k, ids in keys.items():
            if not k or not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise KeysFileError(f"keys file {p}: key {k[:4] + '...' if k else '(empty)'} must map to a list "
                                    f"of patch ids (strings; \"*\" for all)")
        return cls(keys)

    def allowed(self, key: Optional[str]) -> frozenset[str]:
        """The ids ``key`` may use (401 for a missing or unknown key)."""
        if not key:
            raise UnauthorizedError("this server needs an API key: send Authorization: Bearer KEY")
        found = None
        for k, ids in self._allowed.items():  # every key compared, in constant time each
            if hmac.compare_digest(k.encode(), key.encode()):
                found = ids
        if found is None:
            raise UnauthorizedError("unknown API key; ask the server's operator for one")
        return found

    def check(self, key: Optional[str], patch_ids: Iterable[str]) -> None:
        """403 unless ``key`` may use every id in ``patch_ids``."""
        ids = self.allowed(key)
        if ALL in ids:
            return
        for pid in patch_ids:
            if pid not in ids:
                raise ForbiddenError(f"this API key may not use patch {pid!r}")

    def visible(self, key: Optional[str], all_ids: Iterable[str]) -> list[str]:
        ids = self.allowed(key)
        return sorted(all_ids) if ALL in ids else sorted(i for i in all_ids if i in ids)
