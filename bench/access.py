"""What access control costs an acquire over HTTP: authentication and authorization on vs off.

Two ``enhanced-locking serve`` processes in the same run, on the embedded store, alike but for
``enhanced-locking-auth``: the anchor with ``none`` (everyone is anonymous), the measured one
with ``static`` (a bearer token checked against the tokens file, the verb against the role
map). Both keep the audit trail (the default), so the difference is the access seam alone.
Each acquire is timed from sending the request to reading the 200; its release is not timed.
Blocks of the two alternate, so drift hits both alike; the first block of each warms up
(connections, the role map's answers) and is not counted. Goal: p50 overhead within 10 %.

Usage: python bench/access.py [--acquires 2000] [--block 100] [--no-write]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from bench._common import percentile, quick_defaults, write_section  # noqa: E402
from bench._goals import Goal, Report  # noqa: E402
from tests.support.service import ServiceProcess  # noqa: E402

HEADING = "## Access control: an acquire over HTTP with authentication and authorization on"
TOKEN = "bench-token-" + uuid.uuid4().hex


def body(repo: str, n: int) -> dict[str, object]:
    return {"project": {"repoFullName": repo, "path": f"p{n}"}, "pull": {"num": 1}}


def block(http: httpx.Client, repo: str, start: int, count: int) -> list[float]:
    times = []
    for n in range(start, start + count):
        began = time.perf_counter()
        answer = http.post("/v1/locks", json=body(repo, n))
        times.append(time.perf_counter() - began)
        if answer.status_code != 200:
            raise SystemExit(f"acquire answered {answer.status_code}: {answer.text}")
        http.delete("/v1/locks/by-key", params={"key": answer.json()["lockKey"], "pull": 1})
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acquires", type=int, default=2000)
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--no-write", action="store_true")
    quick_defaults(parser, acquires=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokens = work / "tokens.csv"
        tokens.write_text(f'{TOKEN},atlantis,,"bots"\n')
        quiet = ("--enhanced-locking-audit-stdout=false",)
        off = ServiceProcess(work / "off", args=quiet).start()
        on = ServiceProcess(work / "on", args=(
            *quiet, "--enhanced-locking-auth=static",
            f"--enhanced-locking-auth-tokens-file={tokens}",
            "--enhanced-locking-auth-roles=locker=group:bots")).start()
        try:
            with httpx.Client(base_url=off.url, timeout=10) as plain, \
                    httpx.Client(base_url=on.url, timeout=10,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as authed:
                anchor: list[float] = []
                measured: list[float] = []
                block(plain, "acme/warm", 0, args.block)
                block(authed, "acme/warm", 0, args.block)
                done = 0
                while done < args.acquires:
                    anchor += block(plain, "acme/bench", done, args.block)
                    measured += block(authed, "acme/bench", done, args.block)
                    done += args.block
        finally:
            off.stop()
            on.stop()

    def ms(value: float) -> str:
        return f"{value * 1000:.3f} ms"

    p50_off, p50_on = percentile(anchor, 0.5), percentile(measured, 0.5)
    p99_off, p99_on = percentile(anchor, 0.99), percentile(measured, 0.99)
    overhead = p50_on / p50_off - 1
    text = "\n".join([
        f"{len(measured)} acquires each, blocks of {args.block} alternating; "
        f"{platform.python_implementation()} {platform.python_version()} on "
        f"{platform.machine()}, {time.strftime('%Y-%m-%d')}.",
        "",
        "| acquire over HTTP | p50 | p99 |",
        "|---|---|---|",
        f"| auth none (anchor) | {ms(p50_off)} | {ms(p99_off)} |",
        f"| auth static: bearer token + role map | {ms(p50_on)} | {ms(p99_on)} |",
        f"| ratio (static / none) | {p50_on / p50_off:.3f} | {p99_on / p99_off:.3f} |",
        "",
        f"p50 overhead: {overhead * 100:+.1f} % (goal: within 10 %"
        f"{', met' if overhead <= 0.10 else ', NOT met'}).",
    ])
    print(text)
    goal = Goal("access control on: acquire p50 over HTTP within 10 % of auth none",
                f"{overhead * 100:+.1f} %", overhead <= 0.10)
    if not args.no_write:
        write_section("access", HEADING, Report(text, (goal,)))


if __name__ == "__main__":
    main()
