#!/usr/bin/env python3
"""Which threads of a program write to storage, second by second.

Every second, for every running process whose name (/proc/<pid>/comm) is COMM, reads each
thread's write_bytes (/proc/<pid>/task/<tid>/io: bytes it caused to be written to storage),
sums the increase over the second by thread name (trailing digits dropped, so that a pool's
threads count as one), and prints one line of KB per name. Used beside a raft-bench run to
see when RocksDB's flush (rocksdb:high) and compaction (rocksdb:low) threads write, against
the runtime's workers that append the Raft log; docs/benchmarks.md ("Background jobs at
nice 19; disk written per write; cell order").

    python3 chaos-tests/tools/thread_io.py SECONDS [COMM]    # COMM defaults to plinth-server

Run it as the user that owns the processes, or as root.
"""

import collections
import os
import sys
import time


def write_bytes_by_thread_name(comm):
    out = collections.Counter()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{pid}/comm").read().strip() != comm:
                continue
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # the process is gone
        for tid in tids:
            try:
                name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
                io = open(f"/proc/{pid}/task/{tid}/io").read()
            except OSError:
                continue  # the thread is gone
            for line in io.splitlines():
                if line.startswith("write_bytes:"):
                    out[name.rstrip("0123456789")] += int(line.split()[1])
    return out


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    try:
        seconds = float(sys.argv[1])
    except ValueError:
        sys.exit(f"SECONDS must be a number, not {sys.argv[1]!r}")
    comm = sys.argv[2] if len(sys.argv) == 3 else "plinth-server"
    start = time.monotonic()
    prev = write_bytes_by_thread_name(comm)
    while time.monotonic() - start < seconds:
        time.sleep(1)
        cur = write_bytes_by_thread_name(comm)
        kb = {k: (cur[k] - prev.get(k, 0)) // 1024 for k in cur}
        kb = {k: v for k, v in sorted(kb.items(), key=lambda kv: -kv[1]) if v > 0}
        print(time.strftime("%H:%M:%S"), " ".join(f"{k}={v}KB" for k, v in kb.items()), flush=True)
        prev = cur


if __name__ == "__main__":
    main()
