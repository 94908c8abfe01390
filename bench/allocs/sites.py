"""Allocations per request by call site: the difference between two DHAT
profiles (few and many requests), divided by the number of extra requests."""
import json
import re
import sys

# Frames of the allocator and the standard library, skipped to reach the
# caller that asked for the memory.
SKIP = re.compile(r"vgpreload|library/|\((unix|alloc|mod|raw_vec)\.rs")


def sites(path):
    d = json.load(open(path))
    frames = d["ftbl"]
    out = {}
    for pp in d["pps"]:
        kept = []
        for i in pp["fs"]:
            f = frames[i]
            if not kept and SKIP.search(f):
                continue
            f = re.sub(r"^0x[0-9A-F]+: ", "", f)
            for _ in range(4):
                f = re.sub(r"<[^<>]*>", "", f)
            kept.append(f[:100])
            if len(kept) == 3:
                break
        a = out.setdefault(" <- ".join(kept), [0, 0])
        a[0] += pp["tbk"]
        a[1] += pp["tb"]
    return out


few, many, n = sites(sys.argv[1]), sites(sys.argv[2]), int(sys.argv[3])
rows = []
for k, (blocks, size) in many.items():
    b0, s0 = few.get(k, (0, 0))
    per = (blocks - b0) / n
    if abs(per) > 0.05:
        rows.append((per, (size - s0) / n, k))
rows.sort(reverse=True)
# The record writer's SQLite work varies with how the commits happened to
# batch the records (valgrind slows the gateway down unevenly).
WRITER = re.compile(r"sqlite3|rusqlite|raw_statement|statement_cache")
writer = [r for r in rows if WRITER.search(r[2])]
path = [r for r in rows if not WRITER.search(r[2])]
print(f"allocations per request: {sum(r[0] for r in rows):.1f}, "
      f"bytes per request: {sum(r[1] for r in rows):.0f}")
print(f"  request path: {sum(r[0] for r in path):.1f} allocations, "
      f"{sum(r[1] for r in path):.0f} bytes")
print(f"  record writer (SQLite): {sum(r[0] for r in writer):.1f} allocations, "
      f"{sum(r[1] for r in writer):.0f} bytes")
for per, size, k in rows:
    print(f"{per:6.2f} {size:8.0f} B  {k}")
