"""A release announced by a message: the format, the signature, the allow-list and the
ledger of ids taken (pure logic; the sources that carry messages are tested elsewhere)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hotswap.errors import ExitCode, HotswapError
from hotswap.releases.message import (
    MAX_BYTES,
    Announcement,
    Ledger,
    Refused,
    Verifier,
    admit,
    canonical,
    load_secret,
    sign,
    signature,
)
from hotswap.releases.watch import Action, Kind

KEY = b"k" * 32
OTHER = b"o" * 32
SHARED = Path("/srv/shared/releases")
SOURCE = "redis://127.0.0.1:6379/releases"


@pytest.fixture
def verifier() -> Verifier:
    return Verifier(KEY, (SHARED, Path("/srv/shared/stores/")))


def refusal(verifier: Verifier, raw: bytes | str) -> str:
    with pytest.raises(Refused) as caught:
        verifier.check(raw, SOURCE)
    line = str(caught.value)
    assert line.startswith(f"{SOURCE}: refused: ") and "\n" not in line
    return line


def resigned(fields: dict, key: bytes = KEY) -> str:
    return json.dumps({**fields, "sig": signature(fields, key)})


def test_a_signed_deploy_and_refresh_are_admitted(verifier: Verifier) -> None:
    code = verifier.check(sign("deploy", f"{SHARED}/v42", "v42", KEY), SOURCE)
    assert code == Announcement("v42", Kind.CODE, SHARED / "v42")
    assert code.action() == Action(Kind.CODE, SHARED / "v42")
    data = verifier.check(sign("refresh", "/srv/shared/stores/s7.lmdb", "s7", KEY), SOURCE)
    assert (data.kind, data.path) == (Kind.DATA, Path("/srv/shared/stores/s7.lmdb"))


def test_the_signature_covers_the_fields_not_their_spelling(verifier: Verifier) -> None:
    fields = {"path": f"{SHARED}/v1", "action": "deploy", "id": "v1", "v": 1}
    assert canonical(fields) == canonical(dict(reversed(fields.items())))
    spaced = json.dumps({**fields, "sig": signature(fields, KEY)}, indent=4)
    assert verifier.check(spaced.encode(), SOURCE).id == "v1"


@pytest.mark.parametrize(("raw", "cause"), [
    (b"\xff\xfe garbage", "not JSON"),
    ("{not json", "not JSON"),
    ('["a", "list"]', "not a JSON object"),
    ("x" * (MAX_BYTES + 1), "over"),
    (json.dumps({"v": 1, "id": "v1", "action": "deploy"}), "missing path"),
    (json.dumps({"v": 1, "id": "v1", "action": "deploy", "path": "/x", "run": "rm"}),
     "unknown field run"),
])
def test_what_does_not_parse_is_refused_with_its_cause(verifier: Verifier, raw, cause) -> None:
    assert cause in refusal(verifier, raw)


def test_unknown_action_version_and_bad_ids_are_refused(verifier: Verifier) -> None:
    base = {"v": 1, "id": "v1", "action": "deploy", "path": f"{SHARED}/v1"}
    rollback = resigned({**base, "action": "rollback"})
    assert "unknown action 'rollback'" in refusal(verifier, rollback)
    assert "format version 2" in refusal(verifier, resigned({**base, "v": 2}))
    assert "format version True" in refusal(verifier, resigned({**base, "v": True}))
    for ident in ("", "a\nb", 7, "x" * 129):
        assert "the id must be" in refusal(verifier, resigned({**base, "id": ident}))
    assert "not a string" in refusal(verifier, resigned({**base, "path": ["/srv"]}))


def test_unsigned_and_wrongly_signed_messages_are_refused(verifier: Verifier) -> None:
    fields = {"v": 1, "id": "v1", "action": "deploy", "path": f"{SHARED}/v1"}
    assert "not signed" in refusal(verifier, json.dumps(fields))
    assert "not signed" in refusal(verifier, json.dumps({**fields, "sig": ""}))
    assert "wrong signature" in refusal(verifier, resigned(fields, OTHER))
    # signed, then pointed elsewhere: the signature no longer matches
    tampered = {**json.loads(sign("deploy", f"{SHARED}/v1", "v1", KEY)),
                "path": f"{SHARED}/evil"}
    assert "wrong signature" in refusal(verifier, json.dumps(tampered))


@pytest.mark.parametrize("path", [
    "/tmp/evil", "/srv/shared/releases", "/srv/shared/releases-evil/v1",
    "/srv/shared/releases/../../../etc", "releases/v1", "/srv/shared/releases/a\0b",
])
def test_a_path_outside_the_allowed_locations_is_refused(verifier: Verifier, path) -> None:
    line = refusal(verifier, sign("deploy", path, "v1", KEY))
    assert "outside the allowed locations" in line or "must be absolute" in line


def test_no_allowed_location_admits_nothing() -> None:
    line = refusal(Verifier(KEY, ()), sign("deploy", f"{SHARED}/v1", "v1", KEY))
    assert "none given" in line


def test_an_id_is_taken_at_most_once_across_restarts(tmp_path: Path, verifier: Verifier) -> None:
    log = tmp_path / "state" / "announcements.jsonl"
    ledger = Ledger(log)
    raw = sign("deploy", f"{SHARED}/v1", "v1", KEY)
    first = admit(raw, SOURCE, verifier, ledger)
    ledger.take(first, SOURCE)
    with pytest.raises(Refused, match="id 'v1' was already taken"):
        admit(raw, SOURCE, verifier, ledger)
    # a restarted watcher reads the ledger; a line cut by a crash is ignored, not fatal
    with open(log, "a") as out:
        out.write('{"id": "v2", "act')
    again = Ledger(log)
    assert "v1" in again and "v2" not in again
    with pytest.raises(Refused, match="already taken"):
        admit(raw, "postgres://db/releases", verifier, again)
    assert admit(sign("deploy", f"{SHARED}/v3", "v3", KEY), SOURCE, verifier, again).id == "v3"


def test_the_key_file_must_be_private_and_long(tmp_path: Path) -> None:
    key = tmp_path / "watch.key"
    with pytest.raises(HotswapError, match="cannot read the key file") as caught:
        load_secret(key)
    assert caught.value.code is ExitCode.CONFIG
    key.write_bytes(KEY + b"\n")
    os.chmod(key, 0o644)
    with pytest.raises(HotswapError, match="chmod 600"):
        load_secret(key)
    os.chmod(key, 0o600)
    assert load_secret(key) == KEY
    key.write_bytes(b"short")
    with pytest.raises(HotswapError, match="under 32"):
        load_secret(key)


def test_bad_source_options_are_one_line_and_exit_2(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from hotswap.cli import main
    from hotswap.releases.sources import open_source

    runner = CliRunner()
    done = runner.invoke(main, ["watch", "--source", "redis://127.0.0.1:1/r"])
    assert done.exit_code == ExitCode.CONFIG
    assert "needs --key FILE" in done.output and "Traceback" not in done.output
    done = runner.invoke(main, ["announce", "deploy", "/srv/x", "--id", "x",
                                "--key", str(tmp_path / "none")])
    assert done.exit_code == ExitCode.CONFIG and "cannot read the key file" in done.output
    with pytest.raises(HotswapError, match="unknown scheme 'amqp'"):
        open_source("amqp://127.0.0.1/q")
    with pytest.raises(HotswapError, match="name the channel"):
        open_source("redis://127.0.0.1:6379")
