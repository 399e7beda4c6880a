"""Run the chaos scenarios at report size and write the figures into docs/reliability.md
(between its ``figures:start`` and ``figures:end`` markers).

    .venv/bin/python scripts/chaos_report.py [--n 1000] [--rate 100]

Each scenario starts its own redis-server and workers (fake backend, loopback only);
see tests/chaos.py for what is measured and how. Takes about five minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import chaos  # noqa: E402
from tests.helpers import STARTED  # noqa: E402
from tests.test_chaos import SCENARIOS, build  # noqa: E402

START, END = "<!-- figures:start -->", "<!-- figures:end -->"


def write_figures(doc: Path, figures: str) -> None:
    """Replace what lies between the markers of ``doc`` (or append them)."""
    text = doc.read_text() if doc.exists() else ""
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
    else:
        before, after = text + "\n", "\n"
    doc.write_text(f"{before}{START}\n{figures}\n{END}{after}")


async def main(n: int, rate: float) -> str:
    rows = []
    extra: dict[str, dict[str, float]] = {}
    for name, (fault, cluster_args, run_args) in SCENARIOS.items():
        if "poison_every" in run_args:  # the same six poison inputs as the test, whatever n
            run_args = {**run_args, "poison_every": max(n // 6, 1)}
        with tempfile.TemporaryDirectory() as tmp:
            cluster = build(Path(tmp), cluster_args)
            try:
                fig = await chaos.run_scenario(name, cluster, fault, n=n, rate=rate, **run_args)  # type: ignore[arg-type]
            finally:
                cluster.stop()
        print(" | ".join(fig.row()), flush=True)
        rows.append(fig.row())
    with tempfile.TemporaryDirectory() as tmp:
        extra["producer killed with 200 jobs in flight (2 s deadline)"] = await chaos.producer_killed(
            Path(tmp)
        )
    with tempfile.TemporaryDirectory() as tmp:
        extra["3× overload through the gateway"] = await chaos.overload(Path(tmp))
    for p in STARTED["function"]:
        if p.poll() is None:
            p.kill()
    table = ["| " + " | ".join(chaos.HEADER) + " |", "|" + "---|" * len(chaos.HEADER)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    details = []
    for title, figures in extra.items():
        details.append(f"**{title}**\n")
        details += [f"- {k}: {v:.3f}".rstrip("0").rstrip(".") for k, v in figures.items()]
        details.append("")
    return "\n".join(table) + "\n\n" + "\n".join(details), platform.platform()  # type: ignore[return-value]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="requests per scenario")
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    ns = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body, machine = asyncio.run(main(ns.n, ns.rate))
    header = (
        f"<!-- written by scripts/chaos_report.py --n {ns.n} --rate {ns.rate:g} on {started}, "
        f"{machine}, Python {platform.python_version()} -->\n\n"
    )
    write_figures(ns.out, header + body)
    print(f"wrote {ns.out}")
