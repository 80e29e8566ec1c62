"""Human units for tables. Data stays in plain integers; only tables humanize.

Parameter counts use decimal prefixes (6.74B); bytes use binary ones (GiB = 2^30)."""
from __future__ import annotations


def params(n: int) -> str:
    """A parameter count with a decimal prefix, two decimals: 6738415616 -> "6.74B" (never GiB-style 2^30)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def nbytes(n: int) -> str:
    """Bytes with a binary prefix, two decimals: 2**31 -> "2.00 GiB"; below 1 KiB, "512 B"."""
    for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n} B"


def flops(n: int) -> str:
    """FLOPs (2 x MACs) with a decimal prefix from MFLOP up: 3.2e15 -> "3.20 PFLOP"; smaller, "840 FLOP"."""
    for scale, suffix in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n} FLOP"


def share(part: int, whole: int) -> str:
    """A share for table columns: three significant figures below 10% (0.124%), one decimal above."""
    if not whole:
        return "-"
    value = 100.0 * part / whole
    return f"{value:.3g}%" if 0 < abs(value) < 10 else f"{value:.1f}%"


def seconds(value: float) -> str:
    """A duration given in seconds, three significant figures in a readable unit (h, min, s, ms, µs, ns)."""
    for scale, suffix in ((3600, "h"), (60, "min"), (1, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if value >= scale:
            return f"{value / scale:.3g} {suffix}"
    return f"{value * 1e9:.3g} ns"


def percent(part: int, whole: int) -> str:
    """A share with four significant figures, as PEFT prints trainable% (0.1243%)."""
    return f"{100.0 * part / whole:.4g}%" if whole else "-"


def amount(value: float) -> str:
    """Hours or money: whole with thousands separators from 100, two decimals below (never an
    exponent: below 0.01 it reads "< 0.01")."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return "< 0.01" if 0 < abs(value) < 0.005 else f"{value:.2f}"
