"""One model, many tenants: each request names its patches by id and is answered with them read
over the shared tables (``model(ids, patches=[...])``), which are never written.

A request's life: its API key may use the ids it names (``keys``; 401 / 403), each id is
resolved to the current version of its file (``store``; 404 unknown, 503 half-written, 409 made
for another model), the stack is checked against the served table's content and merged
(``engram.patches.overlay``; 409 when it breaks the stacking rule), then the model runs under
one lock (two forward passes at once on a few cores would only be slower). The versions a
request resolved are the ones its whole answer uses, even if a file is replaced meanwhile.

Shape legend
    T prompt tokens    V vocab
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Optional

import torch

from engram.config import PatchServeConfig, SamplingConfig, ServeLimits
from engram.errors import EngramError, RequestTooLargeError
from engram.fsutil import PathLike
from engram.inspect.server import RequestSlots
from engram.patches.overlay import PatchStack, table_content_fingerprint
from engram.patches.patchfile import PatchError
from engram.serve.keys import KeyRing
from engram.serve.state_cache import PromptStates, generate_with_states
from engram.serve.store import LoadedPatch, PatchConflictError, PatchStore


class ServeRequestError(EngramError):
    """A request body the tenant server cannot answer (a missing or mistyped field)."""


def logits_digest(logits: torch.Tensor) -> str:
    """sha256 of the float32 bytes of ``logits`` (what a client compares to check two answers)."""
    return hashlib.sha256(logits.detach().float().contiguous().numpy().tobytes()).hexdigest()


class TenantService(RequestSlots):
    """The served model, its patch store and keys, and one lock around forward passes."""

    def __init__(self, model: Any, tokenizer: Any, store: PatchStore, keys: Optional[KeyRing] = None,
                 config: Optional[PatchServeConfig] = None, limits: Optional[ServeLimits] = None,
                 table_file: Optional[PathLike] = None, states: Optional[PromptStates] = None) -> None:
        if getattr(model, "hasher", None) is None:
            raise EngramError("the model has no Engram layers, so there are no tables to read patches over; "
                              "serve a run trained with an engram-* preset or a retrofit adapter")
        self.model, self.tokenizer, self.store, self.keys = model.eval(), tokenizer, store, keys
        self.config, self.limits = config or PatchServeConfig(), limits or ServeLimits()
        self.table_file = table_file
        self.states = states  # --state-cache: prompts start from their prefix's stored state
        self.hash_fingerprint = model.hasher.fingerprint()
        self._fingerprints: dict[str, str] = {}  # table dtype -> the served content's fingerprint
        self._lock = threading.Lock()
        self.requests_served = 0
        self._open_slots(self.limits)

    # ------------------------------------------------------------------ patches
    def base_fingerprint(self, dtype: str) -> str:
        """The served tables' content fingerprint for patches of table dtype ``dtype`` (computed once)."""
        with self._lock:
            fp = self._fingerprints.get(dtype)
            if fp is None:
                fp = table_content_fingerprint(self.model, dtype, self.table_file)
                self._fingerprints[dtype] = fp
            return fp

    def resolve(self, key: Optional[str], patch_ids: Any) -> tuple[list[LoadedPatch], Optional[list[Any]]]:
        """A request's ``patches`` -> (the versions resolved, the model's ``patches=``: None without
        the field, else a list of the checked and merged stack, [] for an empty one)."""
        if patch_ids is None:
            return [], None
        if not isinstance(patch_ids, list) or not all(isinstance(i, str) for i in patch_ids):
            raise ServeRequestError("field 'patches' must be a list of patch ids (strings)")
        if len(patch_ids) > self.config.max_stack:
            raise ServeRequestError(f"{len(patch_ids)} patches named; the limit is {self.config.max_stack}")
        for pid in patch_ids:
            self.store.path(pid)  # a bad id is 400 before anything else
        if self.keys is not None:
            self.keys.check(key, patch_ids)
        loaded = [self.store.get(pid) for pid in patch_ids]
        if not loaded:
            return [], []
        patches = [lp.patch for lp in loaded]
        try:
            stack = PatchStack(patches, self.base_fingerprint(patches[0].dtype), self.hash_fingerprint)
        except PatchError as e:
            raise PatchConflictError(f"patches {patch_ids}: {e}") from None
        return loaded, [stack]

    def patch_list(self, key: Optional[str]) -> dict[str, Any]:
        ids = self.store.ids()
        visible = self.keys.visible(key, ids) if self.keys is not None else ids
        return {"patches": visible}

    # ------------------------------------------------------------------ requests
    def _ids(self, payload: dict[str, Any]) -> torch.Tensor:
        if "ids" in payload:
            ids = payload["ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool)
                                                               for i in ids):
                raise ServeRequestError("field 'ids' must be a non-empty list of token ids (integers)")
        elif "prompt" in payload:
            text = payload["prompt"]
            if not isinstance(text, str) or not text:
                raise ServeRequestError("field 'prompt' must be a non-empty string")
            if len(text) > self.limits.max_chars:
                raise RequestTooLargeError(f"prompt has {len(text)} characters; the limit is {self.limits.max_chars}")
            if self.tokenizer is None:
                raise ServeRequestError("this server has no tokenizer; send token ids as 'ids'")
            ids = self.tokenizer.encode(text).ids
            if not ids:
                raise ServeRequestError("the prompt encodes to no tokens; send some text")
        else:
            raise ServeRequestError("give the input as 'prompt' (text) or 'ids' (token ids)")
        return torch.tensor([ids], dtype=torch.long)  # [1,T]

    @staticmethod
    def _used(loaded: list[LoadedPatch]) -> list[dict[str, Any]]:
        return [{"id": lp.id, "patch_id": lp.patch.patch_id, "name": lp.patch.name} for lp in loaded]

    def logits(self, key: Optional[str], payload: dict[str, Any]) -> dict[str, Any]:
        """The next-token logits after the input, with the request's patches."""
        ids = self._ids(payload)
        loaded, stack = self.resolve(key, payload.get("patches"))
        with self._lock, torch.no_grad():
            logits = self.model(ids, patches=stack).logits[0]  # [T,V]
            self.requests_served += 1
        top = torch.topk(logits[-1], min(5, logits.shape[-1]))
        return {"tokens": int(ids.shape[1]), "digest": logits_digest(logits), "logits": logits[-1].tolist(),
                "top": [{"id": int(i), "logit": float(v)} for v, i in zip(top.values, top.indices)],
                "patches": self._used(loaded)}

    def generate(self, key: Optional[str], payload: dict[str, Any]) -> dict[str, Any]:
        """A continuation of the input (greedy unless 'temperature' > 0), with the request's patches."""
        ids = self._ids(payload)
        loaded, stack = self.resolve(key, payload.get("patches"))
        fields = {k: payload[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed") if k in payload}
        for k, v in fields.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ServeRequestError(f"field {k!r} must be a number, got {type(v).__name__}")
        fields.setdefault("max_new_tokens", 32)
        fields.setdefault("temperature", 0.0)
        if fields["max_new_tokens"] > self.config.max_new_tokens:
            raise RequestTooLargeError(f"max_new_tokens={fields['max_new_tokens']}; the limit is "
                                       f"{self.config.max_new_tokens}")
        sampling = SamplingConfig(**{k: (int(v) if k in ("max_new_tokens", "top_k", "seed") else float(v))
                                     for k, v in fields.items()})
        report = None
        with self._lock:
            if self.states is None:
                out = self.model.generate(ids, sampling, patches=stack)
            else:
                out, report = generate_with_states(self.model, ids, sampling, self.states, patches=stack)
            self.requests_served += 1
        new = out[0, ids.shape[1]:].tolist()
        res: dict[str, Any] = {"ids": new, "patches": self._used(loaded)}
        if report is not None:
            res["state_cache"] = {k: v for k, v in report.as_dict().items() if k != "refused"}
        if self.tokenizer is not None:
            res["completion"] = self.tokenizer.decode(new)
        return res

    def health(self) -> dict[str, Any]:
        res = {"ok": True, "requests_served": self.requests_served, "inflight": self.inflight,
               "patch_cache": self.store.stats()}
        if self.states is not None:
            res["state_cache"] = self.states.stats()
        return res
