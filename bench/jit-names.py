#!/usr/bin/env python3
"""Names the plugins' compiled code in a callgrind dump.

Callgrind shows a wasm plugin's JIT code as bare addresses (`???:0x...`).
A proxy started with `LACEWING_WASM_PERFMAP=1` lists that code in
`/tmp/perf-<pid>.map` (under valgrind the pid is valgrind's, the process it
runs); this script looks each address of the dump up in that map and prints
the instructions per request of each guest function, self cost, heaviest
first. The names are the module's own as far as it keeps its name section
(build with `strip = "none"`, see docs/sdk.md, "Profiling a filter").

    bench/jit-names.py DUMP PERF_MAP [REQUESTS] [TOP]
"""

import bisect
import re
import subprocess
import sys


def load_map(path):
    """(start, size, name) of each JIT function, sorted by start."""
    entries = []
    with open(path) as lines:
        for line in lines:
            parts = line.rstrip("\n").split(" ", 2)
            if len(parts) == 3:
                entries.append((int(parts[0], 16), int(parts[1], 16), parts[2]))
    entries.sort()
    return entries


def self_costs(dump):
    """Self cost of each unnamed address in the dump, from callgrind_annotate."""
    out = subprocess.run(
        ["callgrind_annotate", "--threshold=100", dump],
        capture_output=True, text=True, check=True,
    ).stdout
    address = re.compile(r"\s*([\d,]+)\s+(?:\(\s*[\d.]+%\)\s+)?\?\?\?:(0x[0-9a-f]+)")
    for line in out.splitlines():
        m = address.match(line)
        if m:
            yield int(m.group(2), 16), int(m.group(1).replace(",", ""))


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    dump, perf_map = sys.argv[1], sys.argv[2]
    requests = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 30
    entries = load_map(perf_map)
    starts = [e[0] for e in entries]
    by_name, total = {}, 0
    for addr, cost in self_costs(dump):
        i = bisect.bisect_right(starts, addr) - 1
        inside = i >= 0 and addr < entries[i][0] + entries[i][1]
        name = entries[i][2] if inside else f"(not in the map) {addr:#x}"
        by_name[name] = by_name.get(name, 0) + cost
        total += cost
    print(f"{total / requests:9.0f}  all JIT code and unnamed addresses")
    for name, cost in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{cost / requests:9.0f}  {name}")


if __name__ == "__main__":
    main()
