#!/usr/bin/env python3
"""Container health probe for embedq images (standard library only).

    healthcheck.py URL [--metric NAME (--max VALUE | --min VALUE)...] [--timeout SECONDS]

``${NAME}`` and ``${NAME:-default}`` in URL are filled from the environment, so an
exec-form HEALTHCHECK (no shell) still follows a port chosen at run time.

Exit 0 when URL answers 2xx and, if a metric is named, every sample of it in the
Prometheus text body lies within the bounds; exit 1 otherwise (a missing metric
included, so a worker whose metrics endpoint lost its heartbeat gauge fails too).

It lives in its own file rather than in the package so that the probe still runs when
the package itself cannot import: a probe must never depend on what it is checking.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(text: str, env: Mapping[str, str] | None = None) -> str:
    """Replace ``${NAME}`` / ``${NAME:-default}`` as a shell would (unset or empty → default)."""
    values: Mapping[str, str] = os.environ if env is None else env

    def sub(match: re.Match[str]) -> str:
        return values.get(match.group(1)) or (match.group(2) or "")

    return _VAR.sub(sub, text)


def parse_samples(text: str, metric: str) -> list[float]:
    """Values of every sample named exactly ``metric`` in Prometheus' text format."""
    values: list[float] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or not line.startswith(metric):
            continue
        rest = line[len(metric) :]
        if rest.startswith("{"):
            end = _end_of_labels(rest)
            if end < 0:
                continue
            rest = rest[end + 1 :]
        elif not rest[:1].isspace():
            continue  # a longer name sharing the prefix (e.g. NAME_total)
        fields = rest.split()
        if not fields:
            continue
        try:
            values.append(float(fields[0]))
        except ValueError:
            continue
    return values


def _end_of_labels(text: str) -> int:
    """Index of the ``}`` closing the label set that ``text`` starts with; -1 if none.
    Label values are quoted and may themselves contain braces or escaped quotes."""
    quoted = False
    escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "}" and not quoted:
            return i
    return -1


def check(body: str, metric: str, low: float | None, high: float | None) -> str | None:
    """None when every sample of ``metric`` is within [low, high], else why not."""
    samples = parse_samples(body, metric)
    if not samples:
        return f"metric {metric} not found"
    for value in samples:
        if math.isnan(value):
            return f"{metric} is NaN"
        if high is not None and value > high:
            return f"{metric} = {value:g} > {high:g}"
        if low is not None and value < low:
            return f"{metric} = {value:g} < {low:g}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HTTP health probe for embedq containers")
    parser.add_argument("url")
    parser.add_argument("--metric", help="a Prometheus metric in the response body to bound")
    parser.add_argument("--max", type=float, dest="high", help="fail when a sample exceeds this")
    parser.add_argument("--min", type=float, dest="low", help="fail when a sample is below this")
    # Docker's own timeout kills the probe anyway; a shorter one gives a clearer message.
    parser.add_argument("--timeout", type=float, default=4.0)
    ns = parser.parse_args(argv)
    ns.url = expand(ns.url)
    if (ns.high is not None or ns.low is not None) and not ns.metric:
        parser.error("--max/--min need --metric")
    if ns.metric and ns.high is None and ns.low is None:
        parser.error("--metric needs --max or --min")

    try:
        with urllib.request.urlopen(ns.url, timeout=ns.timeout) as response:
            body = response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:  # 4xx/5xx: e.g. /health's 503 with no live worker
        print(f"unhealthy: {ns.url} answered {exc.code}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {ns.url}: {exc}", file=sys.stderr)
        return 1

    if ns.metric:
        problem = check(body, ns.metric, ns.low, ns.high)
        if problem:
            print(f"unhealthy: {problem}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
