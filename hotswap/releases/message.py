"""A release announced by a message: its one format, its signature, and whether to act on it.

The format (docs/releases.md, "Swapping on a message"), one JSON object, UTF-8:

    {"v": 1, "id": "v42", "action": "deploy", "path": "/srv/shared/releases/v42",
     "sig": "<hex HMAC-SHA256 of the canonical message>"}

    action  "deploy" (a code release: a folder or a tarball) or "refresh" (a *.lmdb store)
    path    absolute, on shared storage, under one of the allowed locations
    id      the announcement's name, acted on at most once per host (the Ledger)
    sig     HMAC-SHA256, keyed by the shared secret file, over canonical(): the other fields
            as JSON with sorted keys and no spaces, so any publisher's serialisation verifies

Why a signature at all: whoever can write the Redis channel, the stream or the releases
table would otherwise make every host run their code. Why HMAC and not Ed25519: the stdlib
has it, so the watcher needs no new dependency; the cost is that every host holds the key
that signs (docs/releases.md says who holds which key).

A URL the host downloads and checks against a digest is not part of this format yet: the
path must already be on storage the host mounts.

Everything here is pure (no sockets, no swaps); a Refused carries the one log line that
names the source and the cause, and the watcher drops (or acknowledges) the message after
logging it: a refusal is final, never retried.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExitCode, HotswapError
from .watch import Action, Kind

VERSION = 1
FIELDS = frozenset({"v", "id", "action", "path", "sig"})
ACTIONS = {Kind.CODE.value: Kind.CODE, Kind.DATA.value: Kind.DATA}
MAX_BYTES = 4096  # an announcement names a path; anything longer is not one
MAX_ID = 128


class Refused(Exception):
    """A message not to act on; str() is its one log line (the source, then the cause)."""


@dataclass(frozen=True)
class Announcement:
    id: str
    kind: Kind
    path: Path

    def action(self) -> Action:
        """What the one-action-at-a-time queue runs for it (the drop folder's Action)."""
        return Action(self.kind, self.path)


def canonical(fields: dict) -> bytes:
    """The bytes the signature covers: every field but `sig`, sorted, without spaces."""
    body = {key: value for key, value in fields.items() if key != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signature(fields: dict, secret: bytes) -> str:
    return hmac.new(secret, canonical(fields), hashlib.sha256).hexdigest()


def sign(action: str, path: str, ident: str, secret: bytes) -> str:
    """A signed announcement, as the text to publish (the publisher's half)."""
    fields = {"v": VERSION, "id": ident, "action": action, "path": path}
    return json.dumps({**fields, "sig": signature(fields, secret)}, sort_keys=True)


def load_secret(path: Path) -> bytes:
    """The shared secret file: readable by the service user, by nobody else (a key others
    can read signs for them too)."""
    try:
        info = path.stat()
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise HotswapError(f"cannot read the key file {path}: {exc.strerror}; create it with "
                           f"`install -m 600 /dev/null {path}` and write the shared secret "
                           "into it", ExitCode.CONFIG) from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise HotswapError(f"the key file {path} is open to others (mode "
                           f"{stat.S_IMODE(info.st_mode):o}): run `chmod 600 {path}`",
                           ExitCode.CONFIG)
    if len(secret) < 32:
        raise HotswapError(f"the key file {path} holds {len(secret)} bytes, under 32: write "
                           f"a longer secret (e.g. `openssl rand -hex 32 > {path}`)",
                           ExitCode.CONFIG)
    return secret


class Verifier:
    """Turns a message's bytes into an Announcement, or refuses it with its one log line."""

    def __init__(self, secret: bytes, allowed: tuple[Path, ...]) -> None:
        self.secret = secret
        self.allowed = tuple(Path(posixpath.normpath(root)) for root in allowed)

    def check(self, raw: bytes | str, source: str) -> Announcement:
        fields = self._parse(raw, source)
        sig = fields.get("sig")
        if not isinstance(sig, str) or not sig:
            raise Refused(f"{source}: refused: the message is not signed")
        # compare_digest: the time taken does not tell a forger how much of a guess was right
        if not hmac.compare_digest(sig, signature(fields, self.secret)):
            raise Refused(f"{source}: refused: wrong signature (signed with another key, or "
                          "changed after signing)")
        return Announcement(fields["id"], ACTIONS[fields["action"]],
                            self._place(fields["path"], source))

    def _parse(self, raw: bytes | str, source: str) -> dict:
        if len(raw) > MAX_BYTES:
            raise Refused(f"{source}: refused: {len(raw)} bytes, over {MAX_BYTES}")
        try:
            fields = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Refused(f"{source}: refused: not JSON ({exc})") from None
        if not isinstance(fields, dict):
            raise Refused(f"{source}: refused: not a JSON object")
        unknown = sorted(set(fields) - FIELDS)
        missing = sorted(FIELDS - {"sig"} - set(fields))
        if unknown or missing:
            raise Refused(f"{source}: refused: " + "; ".join(
                [f"unknown field {', '.join(unknown)}"] * bool(unknown)
                + [f"missing {', '.join(missing)}"] * bool(missing)))
        if type(fields["v"]) is not int or fields["v"] != VERSION:
            raise Refused(f"{source}: refused: format version {fields['v']!r}, this watcher "
                          f"reads {VERSION}")
        if fields["action"] not in ACTIONS:
            raise Refused(f"{source}: refused: unknown action {fields['action']!r} (deploy "
                          "or refresh)")
        ident = fields["id"]
        if not isinstance(ident, str) or not ident or len(ident) > MAX_ID \
                or not ident.isprintable():
            raise Refused(f"{source}: refused: the id must be 1 to {MAX_ID} printable "
                          "characters")
        if not isinstance(fields["path"], str):
            raise Refused(f"{source}: refused: the path is not a string")
        return fields

    def _place(self, path: str, source: str) -> Path:
        """The path, if it lies under an allowed location: judged on its text ('..' and a
        relative path refused outright), since the release may not have landed yet."""
        if not path.startswith("/") or ".." in path.split("/") or "\0" in path:
            raise Refused(f"{source}: refused: the path {path!r} must be absolute, without '..'")
        place = Path(posixpath.normpath(path))
        if not any(place.is_relative_to(root) and place != root for root in self.allowed):
            raise Refused(f"{source}: refused: {place} is outside the allowed locations "
                          f"({', '.join(map(str, self.allowed)) or 'none given'})")
        return place


class Ledger:
    """STATE/announcements.jsonl: the ids this host has taken. An id is written *before* its
    action runs, so a watcher killed mid-swap does not swap it again when it restarts: at
    most once, and the deploy's own record (state/deploys.jsonl) says how it ended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.taken: set[str] = set()
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                self.taken.add(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash: its write never completed, so never taken

    def __contains__(self, ident: str) -> bool:
        return ident in self.taken

    def take(self, announcement: Announcement, source: str) -> None:
        line = json.dumps({"id": announcement.id, "action": announcement.kind.value,
                           "path": str(announcement.path), "source": source})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as out:
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())
        self.taken.add(announcement.id)


def admit(raw: bytes | str, source: str, verifier: Verifier, ledger: Ledger) -> Announcement:
    """The whole check before the queue: well formed, signed, allowed, and not done yet."""
    announcement = verifier.check(raw, source)
    if announcement.id in ledger:
        raise Refused(f"{source}: refused: id {announcement.id!r} was already taken by this "
                      f"host ({ledger.path})")
    return announcement
