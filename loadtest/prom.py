"""Prometheus text exposition: scrape, select series, and histogram_quantile.

Stdlib only. `histogram_quantile` follows Prometheus's own function: find the bucket the
rank falls in and interpolate linearly between its lower and upper bound; a rank in the
+Inf bucket answers the highest finite bound.
"""

import math
import re
import urllib.request

_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)
            labels_s, value_s = rest.rsplit("}", 1)
            labels = tuple(sorted(_LABEL.findall(labels_s)))
        else:
            name, value_s = line.split(None, 1)
            labels = ()
        try:
            out[(name.strip(), labels)] = float(value_s.split()[0])
        except (ValueError, IndexError):
            pass
    return out


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> Samples:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as r:
        return parse(r.read().decode())


def total(s: Samples, name: str, **match: str) -> float:
    """Sum of the series of `name` whose labels include `match`."""
    return sum(
        v for (n, labels), v in s.items()
        if n == name and all(dict(labels).get(k) == want for k, want in match.items())
    )


def buckets(s: Samples, name: str, **match: str) -> list[tuple[float, float]]:
    """Cumulative (le, count) of histogram `name` (without `_bucket`), summed over the
    series matching `match`, sorted by bound."""
    acc: dict[float, float] = {}
    for (n, labels), v in s.items():
        if n != name + "_bucket":
            continue
        d = dict(labels)
        if all(d.get(k) == want for k, want in match.items()):
            le = float(d["le"])  # "+Inf" parses as inf
            acc[le] = acc.get(le, 0.0) + v
    return sorted(acc.items())


def delta(after: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    b = dict(before)
    return [(le, c - b.get(le, 0.0)) for le, c in after]


def histogram_quantile(q: float, bkts: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile over cumulative (le, count) buckets."""
    if not bkts or not math.isinf(bkts[-1][0]) or len(bkts) < 2:
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    observations = bkts[-1][1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = next(i for i, (_, c) in enumerate(bkts) if c >= rank)
    if b == len(bkts) - 1:
        return bkts[-2][0]
    if b == 0 and bkts[0][0] <= 0:
        return bkts[0][0]
    start, below = (0.0, 0.0) if b == 0 else bkts[b - 1]
    end, count = bkts[b][0], bkts[b][1] - below
    if count <= 0:
        return end
    return start + (end - start) * ((rank - below) / count)


def lowest(bkts: list[tuple[float, float]], n: float) -> list[tuple[float, float]]:
    """The cumulative buckets of the `n` lowest observations of `bkts`: each count capped
    at `n`. When a series mixes two populations and one lies wholly below the other (the
    sidecar's rejections under its queued admissions), this is the lower one's histogram."""
    return [(le, min(c, n)) for le, c in bkts]


def count_le(bkts: list[tuple[float, float]], bound: float) -> float:
    """Observations at or below `bound`, which must be one of the bucket bounds."""
    return next((c for le, c in bkts if le == bound), math.nan)
