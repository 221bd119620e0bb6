"""
The HTML stats page: one table of rules and one of backends per listener,
every value escaped (names, endpoints and reasons come from rules files and
from clients). The page's script and style are ``admin_static/``.
"""

from __future__ import annotations

import html
from itertools import pairwise
from typing import Any

from muxtwist._text import printable

__all__ = ["REFRESH_SECONDS", "render_page"]

#: Seconds between two refreshes of the stats page in the browser.
REFRESH_SECONDS = 2


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


#: The units of an age, largest first: (seconds in one, its letter).
_AGE_UNITS = ((86400, "d"), (3600, "h"), (60, "m"), (1, "s"))


def _fmt_age(seconds: float) -> str:
    """An age in its two largest units (``1h05m``), or in seconds under a minute."""
    seconds = max(0, int(seconds))
    for (size, unit), (smaller, small_unit) in pairwise(_AGE_UNITS):
        if seconds >= size:
            return f"{seconds // size}{unit}{seconds % size // smaller:02d}{small_unit}"
    return f"{seconds}s"


def _e(value: object) -> str:
    """
    Every value goes through here: names, endpoints and reasons may come
    from users and clients. Characters that are not printable (control
    characters, ESC, bidirectional overrides) are shown as escapes
    (``\\x1b``), as in the logs; a backslash stays one (endpoint
    descriptions escape colons with it). Then the text is HTML-escaped.
    """
    text = str(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else printable(c) for c in text)
    return html.escape(text, quote=True)


def _outcomes(outcomes: dict[str, int]) -> str:
    if not outcomes:
        return "-"
    return ", ".join(f"{_e(k)}&nbsp;{_e(v)}" for k, v in sorted(outcomes.items()))


def _health(row: dict[str, Any], now: float) -> tuple[str, str]:
    """(css class, text) of a backend's health cell."""
    parts = []
    if row.get("skipped_until") is not None:
        cls, state = "down", "SKIPPED"
        parts.append(f"after failed connects, for {_fmt_age(row['skipped_until'] - now)} more")
    elif not row.get("healthy", True):
        cls, state = "down", "DOWN"
    elif row.get("workers", 1) > row.get("healthy_in", row.get("workers", 1)):
        cls, state = "down", "DOWN"
    else:
        cls, state = "up", "UP"
    if "workers" in row and row["workers"] > 1:
        parts.append(f"healthy in {row['healthy_in']} of {row['workers']} workers")
    if row.get("since") is not None:
        parts.insert(0, f"for {_fmt_age(now - row['since'])}")
    if not row.get("checked"):
        parts.append("no active check")
    elif row.get("last_check") is None:
        parts.append("not checked yet")
    else:
        parts.append(f"last check {row['last_check']} {_fmt_age(now - row['last_check_at'])} ago")
    return cls, f"{state} " + "; ".join(parts)


def render_page(data: dict[str, Any]) -> bytes:
    """The HTML stats page for a :func:`status` (or :func:`merge_status`) result."""
    now = data["time"]
    out = []
    workers = data.get("workers", [])
    if len(workers) > 1 or any(w.get("slot") is not None for w in workers):
        answered = [w for w in workers if w.get("answered")]
        pids = ", ".join(f"{_e(w.get('pid'))} ({_e(w.get('live', 0))} live)" for w in answered)
        out.append(f'<p id="workers">{len(answered)} of {len(workers)} workers answered: pids {pids}</p>')
    if data.get("draining"):
        out.append('<p class="down" id="draining">draining: stopping, /ready answers 503</p>')
    for listener in data["listeners"]:
        out.append(f'<section class="listener"><h2>{_e(listener["endpoint"])}</h2>')
        out.append(
            "<table><thead><tr><th>rule</th><th>live</th><th>total</th><th>bytes in</th><th>bytes out</th>"
            "<th>outcomes</th></tr></thead><tbody>"
        )
        out.append(
            f'<tr class="total"><td>listener (sniffing now: {_e(listener.get("sniffing", 0))})</td>'
            f"<td>{_e(listener['live'])}</td><td>{_e(listener['total'])}</td>"
            f"<td>{_e(_fmt_bytes(listener['bytes_in']))}</td><td>{_e(_fmt_bytes(listener['bytes_out']))}</td>"
            f"<td>{_outcomes(listener['outcomes'])}</td></tr>"
        )
        for rule in listener["rules"]:
            if rule["name"] == "-" and not rule["total"] and not rule["outcomes"]:
                continue
            label = "(ended while sniffing)" if rule["name"] == "-" else rule["name"]
            out.append(
                f'<tr class="rule" data-rule="{_e(rule["name"])}"><td>{_e(label)}</td>'
                f'<td class="live">{_e(rule["live"])}</td><td>{_e(rule["total"])}</td>'
                f"<td>{_e(_fmt_bytes(rule['bytes_in']))}</td><td>{_e(_fmt_bytes(rule['bytes_out']))}</td>"
                f"<td>{_outcomes(rule['outcomes'])}</td></tr>"
            )
        out.append("</tbody></table>")
        if listener["backends"]:
            out.append(
                "<table><thead><tr><th>rule</th><th>backend</th><th>health</th><th>live</th><th>total</th>"
                "<th>bytes in</th><th>bytes out</th><th>failures</th></tr></thead><tbody>"
            )
            for b in listener["backends"]:
                cls, text = _health(b, now)
                errors = ", ".join(f"{_e(k)}&nbsp;{_e(v)}" for k, v in sorted(b["errors"].items())) or "0"
                out.append(
                    f'<tr class="backend" data-backend="{_e(b["backend"])}"><td>{_e(b["rule"])}</td>'
                    f'<td>{_e(b["backend"])}</td><td class="health {cls}">{_e(text)}</td>'
                    f'<td class="live">{_e(b["live"])}</td><td>{_e(b["total"])}</td>'
                    f"<td>{_e(_fmt_bytes(b['bytes_in']))}</td><td>{_e(_fmt_bytes(b['bytes_out']))}</td>"
                    f"<td>{errors}</td></tr>"
                )
            out.append("</tbody></table>")
        out.append("</section>")
    limits = ", ".join(f"{_e(k)}&nbsp;{_e(v)}" for k, v in sorted(data["limit_rejections"].items()))
    out.append(f'<p id="limits">refused by limits: {limits}</p>')
    body = "".join(out)
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8"><title>muxtwist stats</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="stylesheet" href="stats.css"><script src="stats.js" defer></script>'
        f'<noscript><meta http-equiv="refresh" content="{REFRESH_SECONDS}"></noscript></head>'
        f'<body data-refresh="{REFRESH_SECONDS}"><header><h1>muxtwist stats</h1>'
        '<span id="updated">live</span> <a href="status.json">status.json</a> <a href="metrics">metrics</a></header>'
        f'<main id="stats">{body}</main></body></html>\n'
    ).encode()
