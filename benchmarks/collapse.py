"""Summarize py-spy's raw (collapsed-stack) output: where the samples of each thread go.

    python benchmarks/collapse.py load.txt [--top 25] [--match kvstore]

Prints, per thread kind (event loop vs worker threads), the share of samples
whose innermost frame is each function ("self"), and the share of samples that
pass through each function ("total", limited to frames matching ``--match``).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m['func']} ({path}{':' + m['line'] if m['line'] else ''})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--match", default="kvstore")
    args = p.parse_args()
    self_counts: dict[str, Counter[str]] = {}
    total_counts: dict[str, Counter[str]] = {}
    samples: Counter[str] = Counter()
    with open(args.path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            thread = frames[0]
            kind = "event loop" if any("run_forever" in fr or "asyncio.run" in fr for fr in frames) else "workers"
            if "thread" not in thread.lower() and "process" not in thread.lower():
                kind = "all"
            n = int(count)
            samples[kind] += n
            leaf = short(frames[-1])
            self_counts.setdefault(kind, Counter())[leaf] += n
            seen = {short(fr) for fr in frames[1:] if args.match in fr}
            for fr in seen:
                total_counts.setdefault(kind, Counter())[fr] += n
    for kind, total in samples.most_common():
        print(f"\n== {kind}: {total} samples")
        print("  self:")
        for name, n in self_counts[kind].most_common(args.top):
            print(f"    {100 * n / total:5.1f}%  {name}")
        print(f"  total (frames matching {args.match!r}):")
        for name, n in total_counts.get(kind, Counter()).most_common(args.top):
            print(f"    {100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
