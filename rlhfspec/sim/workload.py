"""What a simulated rollout generates: response and prompt lengths, and how drafts are accepted."""

from __future__ import annotations

import json
import math
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from rlhfspec.errors import RlhfspecError

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit integers that scrambles every bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def keyed_uniform(*keys: int) -> float:
    """A uniform in [0, 1) that depends on the integer keys alone (no generator state), so a
    simulated sample's draws do not depend on its batch, instance or the strategy's other choices."""
    h = 0
    for k in keys:
        h = _mix(h ^ (k & _MASK))
    return (h >> 11) / float(1 << 53)


def lengths(spec: str, count: int, seed: int, what: str = "lengths") -> list[int]:
    """`count` lengths from a spec: an integer (all equal), `lognormal:MEDIAN,SIGMA,CAP` (rounded,
    at least 1, at most CAP), or a trace file (a JSON list of integers, a JSON object with
    "lengths", or one integer per line) read in order; a trace must hold `count` lengths."""
    spec = spec.strip()
    if spec.isdigit():
        if int(spec) < 1:
            raise RlhfspecError(f"{what} {spec!r}: a length must be at least 1.")
        return [int(spec)] * count
    if spec.startswith("lognormal:"):
        median, sigma, cap = _lognormal(spec, what)
        rng = random.Random(seed)
        return [max(1, min(cap, round(median * math.exp(sigma * rng.gauss(0.0, 1.0))))) for _ in range(count)]
    trace = read_trace(spec, what)
    if len(trace) != count:
        raise RlhfspecError(f"{what} trace {spec} holds {len(trace)} lengths for {count} samples; "
                            f"set the prompts and samples to match ({len(trace)} in all).")
    return trace


def _lognormal(spec: str, what: str) -> tuple[float, float, int]:
    parts = spec.removeprefix("lognormal:").split(",")
    try:
        median, sigma, cap = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError):
        raise RlhfspecError(f"{what} {spec!r} is not lognormal:MEDIAN,SIGMA,CAP (e.g. lognormal:400,1.0,4096).") from None
    if median <= 0 or sigma < 0 or cap < 1:
        raise RlhfspecError(f"{what} {spec!r}: MEDIAN must be > 0, SIGMA >= 0 and CAP >= 1.")
    return median, sigma, cap


def cap_of(spec: str) -> int | None:
    """The CAP of a lognormal spec (None for other specs)."""
    return _lognormal(spec.strip(), "lengths")[2] if spec.strip().startswith("lognormal:") else None


def read_trace(path: str, what: str = "lengths") -> list[int]:
    p = Path(path)
    if not p.is_file():
        raise RlhfspecError(f"{what} {path!r} is not an integer, lognormal:MEDIAN,SIGMA,CAP, or an existing trace file.")
    text = p.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = text.split()
    if isinstance(data, dict):
        data = data.get("lengths")
    try:
        out = [int(x) for x in data]
    except (TypeError, ValueError):
        raise RlhfspecError(f"{what} trace {path} is not a list of integers (a JSON list, {{\"lengths\": [...]}}, or one per line).") from None
    if not out or min(out) < 1:
        raise RlhfspecError(f"{what} trace {path} must hold at least one length, each at least 1.")
    return out


@dataclass
class AcceptanceProfile:
    """Per drafter, p[j]: the probability that draft token j + 1 is accepted given that all before
    it were (positions past the list take its last value). Counting a position the drafter could
    not fill (an n-gram drafter finding no match) as a rejection, as the selector counts it."""

    rates: dict[str, list[float]] = field(default_factory=dict)
    seed: int = 0
    _bases: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name, ps in self.rates.items():
            if not ps or any(not 0.0 <= p <= 1.0 for p in ps):
                raise RlhfspecError(f"acceptance of drafter {name!r} must be one or more probabilities in [0, 1]; got {ps}.")

    @property
    def drafters(self) -> list[str]:
        return list(self.rates)

    def accepted(self, drafter: str, sample_id: int, position: int, n: int) -> int:
        """How many of n drafts proposed at this position of this sample are accepted: each in
        turn with its p[j] until the first rejection, drawn from keyed uniforms."""
        ps = self.rates.get(drafter)
        if ps is None:
            raise RlhfspecError(f"drafter {drafter!r} has no acceptance profile; the profile has {', '.join(self.rates) or 'none'}.")
        base = self._bases.get((drafter, sample_id))
        if base is None:  # keyed_uniform's state after (seed, drafter, sample), kept: it is most of the work
            base = self._bases[(drafter, sample_id)] = _mix(_mix(_mix(self.seed & _MASK) ^ zlib.crc32(drafter.encode())) ^ (sample_id & _MASK))
        at = _mix(base ^ (position & _MASK))
        for j in range(n):
            if (_mix(at ^ j) >> 11) / float(1 << 53) >= ps[min(j, len(ps) - 1)]:
                return j
        return n

    def mean_tokens(self, drafter: str, n: int) -> float:
        """Expected tokens a step emits for one sample drafting n: 1 + sum_k prod_{j<k} p[j]."""
        ps, total, reach = self.rates[drafter], 1.0, 1.0
        for j in range(n):
            reach *= ps[min(j, len(ps) - 1)]
            total += reach
        return total

    @classmethod
    def parse(cls, spec: str, seed: int = 0) -> AcceptanceProfile:
        """`draft=0.8,0.7,0.6;ngram=0.3` (per-position rates per drafter), or a JSON file of
        {drafter: [rates]} (as `bench sim-validate` writes them)."""
        spec = spec.strip()
        if spec and "=" not in spec:
            p = Path(spec)
            if not p.is_file():
                raise RlhfspecError(f"acceptance {spec!r} is neither DRAFTER=P1,P2,...[;DRAFTER=...] nor an existing JSON file.")
            try:
                data = json.loads(p.read_text())
                return cls({str(k): [float(x) for x in v] for k, v in data.items()}, seed)
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                raise RlhfspecError(f"acceptance file {spec} is not a JSON object of drafter -> list of probabilities.") from None
        rates = {}
        for part in filter(None, (x.strip() for x in spec.split(";"))):
            name, _, values = part.partition("=")
            try:
                rates[name.strip()] = [float(v) for v in values.split(",")]
            except ValueError:
                raise RlhfspecError(f"acceptance {part!r} is not DRAFTER=P1,P2,... with probabilities in [0, 1].") from None
            if not name.strip():
                raise RlhfspecError(f"acceptance {part!r} names no drafter (DRAFTER=P1,P2,...).")
        return cls(rates, seed)

    @classmethod
    def from_records(cls, records, seed: int = 0) -> AcceptanceProfile:
        """The per-position rates of real steps (StepRecords): at position j, drafts accepted over
        drafts reached (asked for, with every earlier one accepted)."""
        reached: dict[str, list[float]] = {}
        kept: dict[str, list[float]] = {}
        for r in records:
            if r.drafter is None:
                continue
            rd, kd = reached.setdefault(r.drafter, []), kept.setdefault(r.drafter, [])
            for n, a in zip(r.n, r.accepted):
                for j in range(min(n, a + 1)):
                    if j >= len(rd):
                        rd.append(0.0)
                        kd.append(0.0)
                    rd[j] += 1
                    kd[j] += j < a
        return cls({d: [k / r for k, r in zip(kept[d], rd) if r] for d, rd in reached.items() if rd}, seed)
