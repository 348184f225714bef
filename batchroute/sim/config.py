"""How the simulated provider behaves, per model name.

Answer *quality* (``fail_rate``) is a deterministic function of the request, so a
benchmark run twice routes the same prompts the same way; everything else here is a
per-call probability drawn from the seeded fault RNG, so retries and failover get
exercised the way a flaky real provider would exercise them.

The TOML shape is the ``[simulator]`` table of the routing config. TOML keys are
always strings, hence ``error_rates`` accepts ``"429"`` as well as ``429``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class SimConfigError(ValueError):
    """The ``[simulator]`` table is unusable; the message names the offending key."""



def _check_table(cls: Any, d: Any, where: str) -> None:
    """A table of known keys only: a typo'd key would otherwise leave a test or benchmark
    silently without the fault or limit it meant to set."""
    if not isinstance(d, dict):
        raise SimConfigError(f"{where}: expected a table, got {d!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise SimConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
                             f"(known: {', '.join(sorted(known))})")

@dataclass
class SimModel:
    """Behaviour of one simulated model. Rates are probabilities in [0, 1]."""

    fail_rate: float = 0.0
    fail_rates: dict[str, float] = field(default_factory=dict)
    """Per answer kind (``json``, ``choices``, ``summary``, ``code``, ``text``, see
    ``answers.KINDS``), overriding ``fail_rate``: real models are bad at some tasks and good
    at others, which is what the adaptive cascade (``batchroute.cascade``) learns."""
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    error_rates: dict[int, float] = field(default_factory=dict)
    timeout_rate: float = 0.0
    hang_s: float = 30.0
    empty_rate: float = 0.0
    malformed_rate: float = 0.0
    length_rate: float = 0.0
    content_filter_rate: float = 0.0
    retry_after_s: float | None = 1.0
    rpm: int | None = None
    tpm: int | None = None
    context_window: int = 128_000

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model") -> SimModel:
        """Parse one model table; unknown keys are errors because a typo'd fault rate
        would otherwise silently leave a test or benchmark without its faults."""
        _check_table(cls, d, where)
        kwargs: dict[str, Any] = {}
        for name in _RATES:
            if name in d:
                kwargs[name] = _rate(d[name], f"{where}.{name}")
        for name in ("latency_ms", "latency_jitter_ms", "hang_s"):
            if name in d:
                kwargs[name] = _non_negative(d[name], f"{where}.{name}")
        if "retry_after_s" in d:
            value = d["retry_after_s"]
            kwargs["retry_after_s"] = (
                None if value is None else _non_negative(value, f"{where}.retry_after_s")
            )
        for name in ("rpm", "tpm"):
            if name in d:
                kwargs[name] = _limit(d[name], f"{where}.{name}")
        if "context_window" in d:
            window = _limit(d["context_window"], f"{where}.context_window")
            if window is None:
                raise SimConfigError(f"{where}.context_window: required to be an integer")
            kwargs["context_window"] = window
        if "error_rates" in d:
            kwargs["error_rates"] = _error_rates(d["error_rates"], f"{where}.error_rates")
        if "fail_rates" in d:
            kwargs["fail_rates"] = _fail_rates(d["fail_rates"], f"{where}.fail_rates")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (string status keys), accepted back by :meth:`from_dict` and by
        ``POST /_sim/models/{name}``."""
        d = dataclasses.asdict(self)
        d["error_rates"] = {str(code): rate for code, rate in self.error_rates.items()}
        return d


@dataclass
class SimBatch:
    """Behaviour of the simulated provider batch APIs (``[simulator.batch]``).

    Real batches finish "within 24 hours"; tests need seconds, hence ``delay_s``.
    ``expire_fraction`` makes every batch expire after processing only that fraction of its
    requests (the rest end ``expired``), the case a batch pipeline must send on.
    The limits default to the providers' published ones (OpenAI: 50,000 requests and
    200 MB per input file; Anthropic: 100,000 requests or 256 MB per batch); tests lower
    them to check the error shapes without building 200 MB files.
    """

    delay_s: float = 1.0
    expire_fraction: float | None = None
    # Only the first this many batches created expire (None: every batch).
    expire_batches: int | None = None
    openai_max_requests: int = 50_000
    openai_max_bytes: int = 200 * 1024 * 1024
    anthropic_max_requests: int = 100_000
    anthropic_max_bytes: int = 256 * 1024 * 1024

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "simulator.batch") -> SimBatch:
        d = d or {}
        _check_table(cls, d, where)
        kwargs: dict[str, Any] = {}
        if "delay_s" in d:
            kwargs["delay_s"] = _non_negative(d["delay_s"], f"{where}.delay_s")
        if d.get("expire_fraction") is not None:
            kwargs["expire_fraction"] = _rate(d["expire_fraction"], f"{where}.expire_fraction")
        if d.get("expire_batches") is not None:
            kwargs["expire_batches"] = _limit(d["expire_batches"], f"{where}.expire_batches")
        for name in ("openai_max_requests", "openai_max_bytes", "anthropic_max_requests",
                     "anthropic_max_bytes"):
            if name in d:
                value = _limit(d[name], f"{where}.{name}")
                if value is None:
                    raise SimConfigError(f"{where}.{name}: required to be an integer")
                kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SimConfig:
    """All simulated models plus server-wide limits.

    ``default`` answers for any model name not in ``models``: the simulator serves every
    name, so a config typo shows up as odd behaviour in stats rather than as a 404 storm.
    Model tables do not inherit from ``default``; each is complete on its own.
    """

    models: dict[str, SimModel] = field(default_factory=dict)
    default: SimModel = field(default_factory=SimModel)
    seed: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    window_s: float = 60.0
    """Length of the sliding window rpm/tpm are counted over. Real providers count per
    minute; tests shorten it (with the client's ``rate_window_s``) to cover several windows
    in seconds."""
    replay: str | None = None
    """A replay dataset (JSONL, see ``batchroute.replay``): when set, completions return the
    recorded answers of real models instead of made-up ones (see ``sim/replay.py``)."""
    batch: SimBatch = field(default_factory=SimBatch)
    """The Files + Batches and Message Batches APIs (``sim/batches.py``)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SimConfig:
        """Parse the ``[simulator]`` table (``None`` or ``{}`` gives a fault-free sim)."""
        d = d or {}
        where = "simulator"
        if not isinstance(d, dict):
            raise SimConfigError(f"{where}: expected a table, got {d!r}")
        unknown = sorted(set(d) - {"models", "default", "seed", "rpm", "tpm", "window_s",
                                  "replay", "batch"})
        if unknown:
            raise SimConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
        models_t = d.get("models", {})
        if not isinstance(models_t, dict):
            raise SimConfigError(f"{where}.models: expected a table, got {models_t!r}")
        seed = d.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise SimConfigError(f"{where}.seed: expected an integer, got {seed!r}")
        return cls(
            models={
                str(name): SimModel.from_dict(t, f'{where}.models."{name}"')
                for name, t in models_t.items()
            },
            default=SimModel.from_dict(d.get("default", {}), f"{where}.default"),
            seed=seed,
            rpm=_limit(d.get("rpm"), f"{where}.rpm"),
            tpm=_limit(d.get("tpm"), f"{where}.tpm"),
            window_s=_window(d.get("window_s", 60.0), f"{where}.window_s"),
            replay=_replay_path(d.get("replay"), f"{where}.replay"),
            batch=SimBatch.from_dict(d.get("batch"), f"{where}.batch"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": {name: m.to_dict() for name, m in self.models.items()},
            "default": self.default.to_dict(),
            "seed": self.seed,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "window_s": self.window_s,
            "replay": self.replay,
            "batch": self.batch.to_dict(),
        }

    def model(self, name: str) -> SimModel:
        return self.models.get(name, self.default)


_RATES = ("fail_rate", "timeout_rate", "empty_rate", "malformed_rate", "length_rate",
          "content_filter_rate")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SimConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _rate(value: Any, where: str) -> float:
    rate = _number(value, where)
    if not 0.0 <= rate <= 1.0:
        raise SimConfigError(f"{where}: must be between 0 and 1, got {value!r}")
    return rate


def _non_negative(value: Any, where: str) -> float:
    number = _number(value, where)
    if number < 0:
        raise SimConfigError(f"{where}: must be >= 0, got {value!r}")
    return number


def _limit(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SimConfigError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _replay_path(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise SimConfigError(f"{where}: expected the path of a replay JSONL file, got {value!r}")
    return value


def _window(value: Any, where: str) -> float:
    window = _number(value, where)
    if window <= 0:
        raise SimConfigError(f"{where}: must be > 0, got {value!r}")
    return window


def _fail_rates(value: Any, where: str) -> dict[str, float]:
    from batchroute.sim.answers import KINDS

    if not isinstance(value, dict):
        raise SimConfigError(f"{where}: expected a table of answer kind -> rate, got {value!r}")
    unknown = sorted(set(value) - set(KINDS))
    if unknown:
        raise SimConfigError(f"{where}: unknown answer kind(s) {', '.join(map(repr, unknown))} "
                             f"(known: {', '.join(KINDS)})")
    return {str(kind): _rate(rate, f"{where}.{kind}") for kind, rate in value.items()}


def _error_rates(value: Any, where: str) -> dict[int, float]:
    if not isinstance(value, dict):
        raise SimConfigError(f"{where}: expected a table of status code -> rate, got {value!r}")
    rates: dict[int, float] = {}
    for key, rate in value.items():
        try:
            code = int(key)
        except (TypeError, ValueError):
            raise SimConfigError(f"{where}: {key!r} is not an HTTP status code") from None
        if not 400 <= code <= 599:
            raise SimConfigError(f"{where}: {code} is not an error status (400-599)")
        rates[code] = _rate(rate, f"{where}.{key}")
    if sum(rates.values()) > 1.0 + 1e-9:
        raise SimConfigError(f"{where}: rates add up to more than 1")
    return rates
