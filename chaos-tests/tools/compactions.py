#!/usr/bin/env python3
"""What RocksDB's compactions rewrote, by column family, from its LOG files.

For each LOG given, sums the MB written by the compactions of each column family (the
"compacted to: ... out(N ...)" lines) and counts the table files moved to another level
without being rewritten ("Moving #N to level-L" lines). A moved file costs no IO; a
compaction rewrites everything it reads. Used on the data directories `raft-bench
--keep-work-dir` keeps, to see which of plinth's tables RocksDB had to rewrite
(docs/benchmarks.md, "Entry IDs in log order").

    python3 chaos-tests/tools/compactions.py WORK/plinth/n*/data/raft/LOG
"""

import collections
import re
import sys

COMPACTED = re.compile(r"\[([A-Za-z0-9_]+)\] compacted to: .* out\(([0-9.]+) \+")
MOVED = re.compile(r"Moving #[0-9]+ to level-[0-9]+")


def summarize(path):
    written = collections.Counter()
    moves = 0
    with open(path, errors="replace") as f:
        for line in f:
            m = COMPACTED.search(line)
            if m:
                written[m.group(1)] += float(m.group(2))
            elif MOVED.search(line):
                moves += 1
    return written, moves


def main(paths):
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for path in paths:
        try:
            written, moves = summarize(path)
        except OSError as e:
            print(f"{path}: {e.strerror}", file=sys.stderr)
            return 1
        parts = [f"{cf} {mb:.1f}" for cf, mb in sorted(written.items(), key=lambda x: -x[1])]
        rewritten = ", ".join(parts) if parts else "nothing"
        print(f"{path}: MB rewritten by compactions: {rewritten}; files moved: {moves}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
