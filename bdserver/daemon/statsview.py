"""`bdserver stats` for a person: one line per device from the daemon's `stats` reply.

Hit ratio (chunk lookups served by the node cache), bytes fetched from the registry (compressed, as
on the wire) against the device size, read latency percentiles (what the kernel waited for) and
errors (reads failed with EIO; chunks that failed verification in brackets). `--watch` adds the
read and fetch rates since the previous refresh. Machines use `--json`, which is the reply as is.
"""

from __future__ import annotations

from typing import Any

COLUMNS = ["DEVICE", "HITS", "FETCHED / SIZE", "P50", "P99", "ERRORS"]
RATE_COLUMNS = ["READ/s", "FETCH/s"]


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _ms(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:.2f}s"
    return f"{v:.2f}ms" if v < 10 else f"{v:.0f}ms"


def _counters(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    s = d.get("stats") or {}
    dev = s.get("device")
    return s, dev if isinstance(dev, dict) else {}


def row(d: dict[str, Any], prev: dict[str, Any] | None = None, dt: float = 0.0) -> list[str]:
    """The cells of one device; with `prev` (the same device `dt` seconds earlier) the rates too."""
    s, dev = _counters(d)
    if d.get("status") == "error" or not s:
        why = str(d.get("error") or "not served")
        cells = [d["id"], "-", "-", "-", "-", f"{d.get('status', '?')}: {why[:60]}"]
        return cells + (["-", "-"] if prev is not None else [])
    hits, misses = dev.get("chunk_hits", 0), dev.get("chunk_misses", 0)
    hit = f"{100 * hits / (hits + misses):.1f}%" if hits + misses else "-"
    size = d.get("size") or 0
    if d.get("kind") == "lazy":
        fetched = dev.get("fetched_bytes", 0)
        share = f" ({100 * fetched / size:.1f}%)" if size else ""
        traffic = f"{human_bytes(fetched)} / {human_bytes(size)}{share}"
    else:  # a local file or an on-node conversion: nothing is fetched on reads
        traffic = f"local / {human_bytes(size)}"
    lat = s.get("latency_ms") or {}
    errors = str(s.get("read_errors", 0))
    if dev.get("integrity_errors"):
        errors += f" ({dev['integrity_errors']} verify)"
    cells = [d["id"], hit, traffic, _ms(lat.get("p50", 0.0)), _ms(lat.get("p99", 0.0)), errors]
    if prev is not None:
        ps, pdev = _counters(prev)
        rate = (lambda now, before: f"{human_bytes(max(0, now - before) / dt)}/s") if dt > 0 else (lambda *_: "-")
        cells += [rate(s.get("bytes_read", 0), ps.get("bytes_read", 0)),
                  rate(dev.get("fetched_bytes", 0), pdev.get("fetched_bytes", 0))]
    return cells


def table(devices: list[dict[str, Any]], prev: dict[str, dict[str, Any]] | None = None, dt: float = 0.0) -> str:
    """Aligned columns, the image reference last (it is the long one)."""
    head = COLUMNS + (RATE_COLUMNS if prev is not None else []) + ["IMAGE"]
    rows = [head]
    for d in devices:
        before = (prev or {}).get(d["id"], d) if prev is not None else None
        rows.append(row(d, before, dt) + [d.get("ref", "")])
    widths = [max(len(r[k]) for r in rows) for k in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    if not devices:
        lines.append("(no devices)")
    return "\n".join(lines)
