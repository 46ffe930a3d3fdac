"""Seed statistics: mean, sample standard deviation, 95 % confidence interval of the mean, and
whether two configurations differ beyond their seed-to-seed noise (Welch's t-test, 5 %).

Student-t quantiles come from a small table (no SciPy dependency); beyond 30 degrees of freedom
the normal quantile 1.96 is used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# t_{0.975, df} for df = 1..30.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: float) -> float:
    """The two-sided 95 % Student-t quantile for `df` degrees of freedom (interpolated; df >= 1)."""
    if df >= len(_T975) + 1:
        return 1.96
    lo = max(int(math.floor(df)), 1)
    frac = df - lo
    a = _T975[lo - 1]
    b = _T975[lo] if lo < len(_T975) else 1.96
    return a + (b - a) * frac


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float
    """Sample standard deviation (n - 1); 0 for one value."""
    ci95: float
    """Half-width of the 95 % confidence interval of the mean (t_{0.975, n-1} * std / sqrt(n));
    NaN for one value (no spread is known)."""

    def text(self, digits: int = 2) -> str:
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.ci95:.{digits}f}"


def summarize(values: Sequence[float]) -> Summary:
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("summarize: no values")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return Summary(1, mean, 0.0, float("nan"))
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Summary(n, mean, std, t975(n - 1) * std / math.sqrt(n))


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """(mean of `a` minus mean of `b`, half-width of its 95 % confidence interval by Welch's
    t-test); None when either has fewer than two values (no noise estimate)."""
    if len(a) < 2 or len(b) < 2:
        return None
    sa, sb = summarize(a), summarize(b)
    va, vb = sa.std**2 / sa.n, sb.std**2 / sb.n
    if va + vb == 0:
        return sa.mean - sb.mean, 0.0
    df = (va + vb) ** 2 / ((va**2 / (sa.n - 1)) + (vb**2 / (sb.n - 1)))
    return sa.mean - sb.mean, t975(df) * math.sqrt(va + vb)


def differ(a: Sequence[float], b: Sequence[float]) -> bool | None:
    """Whether the means of `a` and `b` differ at the 5 % level (Welch's t-test); None when either
    has fewer than two values (no noise estimate)."""
    w = welch(a, b)
    return None if w is None else abs(w[0]) > w[1]
