"""Small statistics shared by the summary and the reports. Pure."""

from __future__ import annotations


def wilson(k: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials (95% by default)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_text(k: float, n: int) -> str:
    """'0.873 (95% CI 0.851-0.892)': k right of n, with Wilson's interval."""
    low, high = wilson(k, n)
    return f"{k / n:.3f} (95% CI {low:.3f}-{high:.3f})"
