"""What event readers cost the lock path: acquire latency with 0, 100 and 500 SSE readers.

One ``enhanced-locking serve`` (embedded store, enhanced locking on) on a loopback port; a
separate process holds N ``GET /v1/events`` streams open and reads (and drops) everything they
send; this process times sequential acquire + release pairs on one key over HTTP (each pair
publishes two events, which every reader is sent). Reported per reader count: acquire p50 / p99
and the ratio of p50 to the 0-reader anchor timed in the same run.

``--compare-with REF`` runs the same cases against the service as of git ``REF`` too (from a
temporary worktree), so the change is measured before and after on one machine in one run.

Usage: python bench/event_readers.py [--pairs 300] [--readers 0,100,500] [--compare-with REF]
       [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from bench._common import percentile, quick_defaults, write_section  # noqa: E402
from tests.support.service import ServiceProcess  # noqa: E402

READERS_SCRIPT = """
import asyncio, sys
async def reader(port):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /v1/events HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
    while await r.read(65536):
        pass
async def main(port, count):
    tasks = [asyncio.ensure_future(reader(port)) for _ in range(count)]
    await asyncio.sleep(1.0)
    print("ready", flush=True)
    await asyncio.gather(*tasks)
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""

BODY = {"project": {"repoFullName": "acme/bench", "path": "p", "projectName": "p"},
        "pull": {"num": 1}, "user": {"username": "bench"}}
KEY = "acme/bench/p/default/p"


async def _pairs(url: str, pairs: int) -> list[float]:
    took = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for _ in range(20):  # warm up
            await http.post("/v1/locks", json=BODY)
            await http.delete("/v1/locks/by-key", params={"key": KEY})
        for _ in range(pairs):
            start = time.perf_counter()
            answer = await http.post("/v1/locks", json=BODY)
            took.append(time.perf_counter() - start)
            assert answer.status_code == 200, answer.text
            await http.delete("/v1/locks/by-key", params={"key": KEY})
    return took


def _case(data: Path, readers: int, pairs: int, pythonpath: str | None) -> list[float]:
    env = {"ATLANTIS_ENHANCED_LOCKING_EVENTS_MAX_STREAMS": "10000",
           "ATLANTIS_ENHANCED_LOCKING_EVENTS_MAX_STREAMS_PER_CLIENT": "10000"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    data.mkdir(parents=True, exist_ok=True)
    served = ServiceProcess(data, args=["--enhanced-locking-enabled"], env=env).start()
    holder = None
    try:
        if readers:
            holder = subprocess.Popen([sys.executable, "-c", READERS_SCRIPT, str(served.port),
                                       str(readers)], stdout=subprocess.PIPE, text=True)
            assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        return asyncio.run(_pairs(served.url, pairs))
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        served.stop()


def _worktree(ref: str, into: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(into), ref],
                   check=True, capture_output=True)
    return into / "operator"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--readers", default="0,100,500")
    parser.add_argument("--compare-with", default=None, metavar="REF")
    parser.add_argument("--no-write", action="store_true")
    quick_defaults(parser, pairs=100, readers="0,100")
    args = parser.parse_args()
    counts = [int(n) for n in args.readers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        codes: list[tuple[str, str | None]] = [("this tree", None)]
        if args.compare_with:
            codes.insert(0, (args.compare_with, str(_worktree(args.compare_with,
                                                              Path(tmp) / "before"))))
        rows = []
        try:
            for label, path in codes:
                anchor = None
                for readers in counts:
                    took = _case(Path(tmp) / f"data-{len(rows)}", readers, args.pairs, path)
                    p50, p99 = percentile(took, 0.5), percentile(took, 0.99)
                    anchor = anchor or p50
                    rows.append(f"| {label} | {readers} | {p50 * 1000:.2f} | {p99 * 1000:.2f} | "
                                f"{p50 / anchor:.2f}x |")
                    print(rows[-1], flush=True)
        finally:
            if args.compare_with:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                                str(Path(tmp) / "before")], capture_output=True)
    table = "\n".join([
        f"{args.pairs} sequential acquire + release pairs over HTTP per case; "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs. Ratio: acquire p50 against 0 readers of the same code.",
        "",
        "| service | SSE readers | acquire p50 ms | acquire p99 ms | p50 vs 0 readers |",
        "|---|---|---|---|---|",
        *rows,
    ])
    print(table)
    if not args.no_write:
        write_section("event-readers", "## Event readers: acquire latency with SSE readers",
                      table)


if __name__ == "__main__":
    main()
