"""Answer reuse: the key under which two requests count as "the same question".

Pure: a job's body and options, the routing config and the reuse settings in, a key (or
None: never reused) out. Two jobs with equal keys would be routed, called and validated
the same way, so the second can take the first's accepted answer at $0 (the pipeline
side is `batchroute.reuse_run`).

What goes into the key, and why:
- the request's model and *normalised* messages: role, name and content, with content
  that differs only in ways no provider sees (a lone text part vs a plain string, CRLF vs
  LF, surrounding whitespace, Unicode normal form) made equal;
- every other body parameter (temperature, top_p, max_tokens, response_format, tools,
  seed, stop, n, logprobs, ...) as canonical JSON, except a few that never change the
  answer (`user`, `metadata`, `store`, `stream`, ...): an unknown parameter is assumed
  to matter, so the key errs on the side of paying again;
- what decides which answer is *accepted*: the task, its profile (ladder, checks, rules)
  and the line's own checks, pin and tier bounds. The same prompt with other validators
  may escalate elsewhere and end with another answer;
- a digest of the config's models and their providers (name, API model, tier, provider
  kind and URL; the simulator's settings when a model is simulated): reuse never crosses
  configs whose models differ;
- the namespace (`[reuse] namespace` in the config, default ""): projects sharing one
  database can keep their answers apart.

When a request is reused at all (`ReuseSettings.mode`):
- "auto" (default): only deterministic requests, i.e. `temperature` is 0. An absent
  temperature is *not* deterministic: OpenAI's default is 1, so two calls may differ and
  the user may want both samples;
- "on" (`--reuse`): every request, the user accepts one sample for identical requests;
- "off" (`--no-reuse`): none; such jobs get no key, so they neither reuse nor are reused.

Hostile input: the body was bounded by `batchroute.jobspec` (line size, nesting depth,
no NaN or lone surrogates) before it gets here; the walk below is flat (messages, their
parts) and the rest is hashed as `json.dumps` output, so nothing recurses past that bound.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from typing import Any

MODES = ("auto", "on", "off")
KEY_VERSION = "r1"  # bump when the key's recipe changes: old keys then simply never match
# Body keys that never change what the model answers.
IGNORED_BODY_KEYS = frozenset({
    "messages", "user", "metadata", "store", "stream", "stream_options", "service_tier",
    "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
})


class ReuseConfigError(ValueError):
    """The `[reuse]` table is unusable; the message names the key."""


@dataclass(frozen=True)
class ReuseConfig:
    """`[reuse]` in the routing config: the default mode and the namespace."""

    mode: str = "auto"
    namespace: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReuseConfig:
        mode = d.get("mode", "auto")
        if mode not in MODES:
            raise ReuseConfigError(f"reuse.mode: must be one of {', '.join(MODES)}, got {mode!r}")
        namespace = d.get("namespace", "")
        if not isinstance(namespace, str) or len(namespace) > 200:
            raise ReuseConfigError("reuse.namespace: expected a string of at most 200 "
                                   f"characters, got {namespace!r}")
        unknown = set(d) - {"mode", "namespace"}
        if unknown:
            raise ReuseConfigError(f"reuse: unknown key(s) {', '.join(sorted(unknown))}")
        return cls(mode=mode, namespace=namespace)


@dataclass(frozen=True)
class ReuseSettings:
    """What a batch's ingestion needs to key its jobs: computed once per batch (the config
    digest walks every model), small and picklable for the parser processes."""

    mode: str
    namespace: str
    config_digest: str


def settings_for(config: Any, mode: str | None = None) -> ReuseSettings:
    """The settings of a batch: `mode` from the command line (None: the config's)."""
    rc: ReuseConfig = getattr(config, "reuse", None) or ReuseConfig()
    chosen = mode or rc.mode
    if chosen not in MODES:
        raise ValueError(f"reuse mode must be one of {', '.join(MODES)}, got {chosen!r}")
    return ReuseSettings(mode=chosen, namespace=rc.namespace,
                         config_digest=config_digest(config))


def config_digest(config: Any) -> str:
    """A digest of what in the config decides who answers: each model's name, API model,
    tier and provider (kind, URL), plus the simulator's settings if a model is simulated."""
    models = []
    simulated = False
    for m in sorted(config.models.values(), key=lambda m: m.name):
        p = config.providers[m.provider]
        simulated = simulated or p.simulated
        models.append([m.name, m.api_model, m.tier, m.provider, p.kind, p.base_url])
    sim = config.simulator if simulated else {}
    text = json.dumps([models, sim], sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def deterministic(body: dict[str, Any]) -> bool:
    """Temperature 0 (int or float; not a bool). Absent means the provider's default, 1."""
    t = body.get("temperature")
    return isinstance(t, int | float) and not isinstance(t, bool) and t == 0


def _text(value: str) -> str:
    value = value.replace("\r\n", "\n").strip()
    # NFC is what most editors write; a file re-saved in NFD asks the same question.
    return value if value.isascii() else unicodedata.normalize("NFC", value)


def normalise_content(content: Any) -> Any:
    """Content as a provider reads it: a plain string, or a list of parts where only the
    text of text parts is normalised; a list of text parts only is one string (parts are
    concatenated by the providers)."""
    if isinstance(content, str):
        return _text(content)
    if isinstance(content, list):
        if content and all(isinstance(p, dict) and p.get("type") == "text"
                           and isinstance(p.get("text"), str) and set(p) <= {"type", "text"}
                           for p in content):
            return _text("".join(p["text"] for p in content))
        return [{**p, "text": _text(p["text"])} if isinstance(p, dict)
                and isinstance(p.get("text"), str) else p for p in content]
    return content


def normalise_messages(messages: list[Any]) -> list[Any]:
    """Messages without what no model sees: keys set to null, whitespace around content."""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            out.append(m)
            continue
        norm = {k: v for k, v in m.items() if v is not None and k != "content"}
        if "content" in m and m["content"] is not None:
            norm["content"] = normalise_content(m["content"])
        out.append(norm)
    return out


def _dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8", "surrogatepass")


def reuse_key(body: dict[str, Any], options: dict[str, Any], task: str, task_profile: Any,
              settings: ReuseSettings) -> str | None:
    """The job's reuse key, or None when it must never be reused (mode "off", or "auto"
    and the request is not deterministic).

    `options` is the job's batchroute options (validators, pin, min/max tier; metadata is
    left out: who pays does not change the answer); `task_profile` the config's profile
    of the task (its ladder, checks and rules)."""
    if settings.mode == "off" or (settings.mode == "auto" and not deterministic(body)):
        return None
    h = hashlib.sha256()
    for part in (
        KEY_VERSION, settings.namespace, settings.config_digest, task,
        [list(task_profile.ladder), list(task_profile.validators),
         [[r.start_tier, r.min_prompt_tokens, list(r.keywords)] for r in task_profile.rules]]
        if task_profile is not None else None,
        {k: options.get(k) for k in ("validators", "pin", "min_tier", "max_tier")},
        {k: v for k, v in body.items() if k not in IGNORED_BODY_KEYS},
        normalise_messages(body.get("messages") or []),
    ):
        # Each part length-prefixed: no two different sequences of parts hash alike.
        data = _dumps(part)
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()
