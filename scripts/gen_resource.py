#!/usr/bin/env python3
"""Generate the term/tag table that srv.py loads at import.

The file is a plain TSV so operators can inspect it with head/grep:

    # hotswap-resource v1 version=<release id> terms=<count> sha256=<hex digest of the body>
    <term>\t<tag>,<tag>,...
    ...

The header's checksum covers every byte after the header line, so a truncated or
corrupted file is refused by srv.py at import, before the release can take traffic.
Output is deterministic for a given (--terms, --seed, --version).

    python scripts/gen_resource.py --terms 2000000 --version 2026-11-26 -o data/terms.tsv
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys

TAGS = [
    "noun", "verb", "adj", "adv", "name", "place", "org", "food", "tool", "animal",
    "color", "unit", "slang", "archaic", "plural", "tech", "law", "med", "sport", "music",
]
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def generate_body(terms: int, seed: int) -> bytes:
    rng = random.Random(seed)
    lines = []
    for i in range(terms):
        stem = "".join(rng.choices(ALPHABET, k=rng.randint(3, 9)))
        tags = ",".join(sorted(rng.sample(TAGS, rng.randint(1, 4))))
        # The index suffix keeps every term unique whatever the random stem is.
        lines.append(f"{stem}{i}\t{tags}\n")
    return "".join(lines).encode()


def write_resource(path: str, terms: int, seed: int, version: str) -> str:
    """Write the resource atomically (tmp + rename) and return its sha256."""
    if any(c.isspace() for c in version) or not version:
        raise ValueError("version must be a non-empty word without spaces")
    body = generate_body(terms, seed)
    digest = hashlib.sha256(body).hexdigest()
    header = f"# hotswap-resource v1 version={version} terms={terms} sha256={digest}\n"
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as out:
        out.write(header.encode())
        out.write(body)
    os.replace(tmp, path)
    return digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", default="data/terms.tsv", help="file to write")
    parser.add_argument("--terms", type=int, default=200_000, help="number of terms")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument("--version", default="v1", help="release id recorded in the header")
    args = parser.parse_args(argv)
    if args.terms < 1:
        parser.error("--terms must be at least 1")
    try:
        digest = write_resource(args.output, args.terms, args.seed, args.version)
    except (OSError, ValueError) as exc:
        print(f"gen_resource: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {args.terms} terms, version={args.version}, sha256={digest[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
