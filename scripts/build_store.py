#!/usr/bin/env python3
"""Build the memory-mapped store (hotswap/protocol/store.py) from a table made by gen_resource.py.

    python scripts/build_store.py data/terms.tsv -o data/store   # data/store/terms-v1.lmdb
    python scripts/build_store.py data/terms.tsv -o data/store --point  # + data/store/current

The version comes from the table's header (or --version). The store is written beside its
final name and renamed into place; an existing store is never rewritten (exit 0 with
--if-missing, exit 2 otherwise), because a running generation may have it mapped.
--point then switches the `current` symlink, which srv.py opens at import: that makes the
new store the one the next start or reload serves; `hotswap refresh` does the same and also
switches the running workers.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hotswap.protocol import store  # noqa: E402

HEADER_PREFIX = b"# hotswap-resource v1 "


def read_table(path: str) -> tuple[dict[str, str], list[tuple[bytes, bytes]]]:
    """(header fields, (term, tags) pairs sorted by term), checking the table's checksum."""
    with open(path, "rb") as handle:
        header_line = handle.readline()
        body = handle.read()
    if not header_line.startswith(HEADER_PREFIX):
        raise ValueError(f"{path}: not a hotswap resource (bad header)")
    header = dict(f.split("=", 1) for f in header_line[len(HEADER_PREFIX):].decode().split()
                  if "=" in f)
    if hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise ValueError(f"{path}: checksum mismatch")
    lines = body.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    # Sorting whole lines sorts by term: "\t" sorts before every character a term may hold.
    lines.sort()
    pairs = []
    for line in lines:
        term, sep, tags = line.partition(b"\t")
        if not sep or not term:
            raise ValueError(f"{path}: malformed line {line[:60]!r}")
        pairs.append((term, tags))
    return header, pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", help="a table written by gen_resource.py")
    parser.add_argument("-o", "--out-dir", default="data/store", help="folder of the stores")
    parser.add_argument("--version", help="data version (default: the table's header)")
    parser.add_argument("--point", action="store_true",
                        help="then point OUT_DIR/current at the new store")
    parser.add_argument("--if-missing", action="store_true",
                        help="a store of that version already exists: keep it, exit 0")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        header, pairs = read_table(args.table)
        version = args.version or header.get("version", "")
        output = os.path.join(args.out_dir, store.store_file_name(version))
        if os.path.exists(output) and args.if_missing:
            print(f"kept {output} (exists)")
        else:
            digest = store.build(pairs, output, version)
            print(f"wrote {output}: {len(pairs)} entries, version={version}, "
                  f"sha256={digest[:12]}, {os.path.getsize(output) / 1e6:.1f} MB "
                  f"in {time.monotonic() - started:.1f}s")
        if args.point:
            store.point(os.path.join(args.out_dir, "current"), output)
            print(f"{os.path.join(args.out_dir, 'current')} -> {os.path.basename(output)}")
    except (OSError, ValueError) as exc:
        print(f"build_store: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
