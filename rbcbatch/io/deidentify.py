"""De-identification: patient and slide ids become keyed hashes before anything is written.

With `rbcbatch run --deidentify` each catalog row's patient_id and slide_id are replaced, as the
catalog is loaded, by HMAC-SHA256(key, "<column>:<value>") cut to 16 hex digits and prefixed
("pt-", "sl-"). The same key gives the same pseudonyms, so a resumed run skips its committed
slides and whoever holds the key can link results back; without the key a list of likely ids
("P001", "P002", ...) cannot be hashed to find them. Image URIs often hold the patient id in a
folder or file name: the workers read them but no output carries them (RunStore drops them from
commit records, mask attributes and failures, and takes them out of failure messages).

The key comes from the environment (RBCBATCH_DEID_KEY), never from a file or the command line.
run.json says that the run is de-identified and gives the key's id (an HMAC of a fixed text,
which tells keys apart without revealing them), never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Mapping

from rbcbatch.errors import DeidentifyError

KEY_ENV = "RBCBATCH_DEID_KEY"
# 128 bits, the usual floor for an HMAC key; a shorter one can be guessed from known ids.
MIN_KEY_BYTES = 16
# 64 bits of hash: two of a million ids collide with probability ~3e-8.
HASH_HEX_DIGITS = 16
PREFIXES = {"patient_id": "pt-", "slide_id": "sl-"}
WITHHELD = "<uri withheld>"


def key_from_env(environ: Mapping[str, str] | None = None) -> bytes:
    """The de-identification key from RBCBATCH_DEID_KEY, or a DeidentifyError saying what to do."""
    value = (os.environ if environ is None else environ).get(KEY_ENV, "")
    if not value:
        raise DeidentifyError(
            f"--deidentify needs a key in the environment variable {KEY_ENV} (at least "
            f"{MIN_KEY_BYTES} bytes, e.g. from `openssl rand -hex 32`); keep it: the same key "
            "gives the same pseudonyms, and a resumed run needs it"
        )
    key = value.encode()
    if len(key) < MIN_KEY_BYTES:
        raise DeidentifyError(
            f"{KEY_ENV} is {len(key)} bytes long; a de-identification key needs at least "
            f"{MIN_KEY_BYTES} (e.g. `openssl rand -hex 32`)"
        )
    return key


def _hmac_hex(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:HASH_HEX_DIGITS]


def pseudonym(value: str, key: bytes, column: str = "patient_id") -> str:
    """The keyed hash that replaces `value` of `column` (patient_id or slide_id)."""
    return PREFIXES[column] + _hmac_hex(key, f"{column}:{value}")


def key_id(key: bytes) -> str:
    """Tells keys apart (recorded in run.json) without revealing them."""
    return _hmac_hex(key, "rbcbatch de-identification key id")


def row_deidentifier(key: bytes | None) -> Callable[[dict], dict] | None:
    """For load_catalog: a function replacing a row's patient_id and slide_id (empty ones stay
    empty, so the row is still rejected for it); None when not de-identifying."""
    if key is None:
        return None

    def deidentify_row(row: dict) -> dict:
        return {
            **row,
            **{c: pseudonym(row[c], key, c) for c in PREFIXES if row.get(c)},
        }

    return deidentify_row


def withhold_uri(text: str, uri: str) -> str:
    """`text` with the URI, its path and its last two path components (file and folder names,
    where ids usually are, with and without extension) replaced by WITHHELD."""
    if not text or not uri:
        return text
    path = uri.split("://", 1)[-1]
    parts = [p for p in path.rstrip("/").split("/") if p][-2:]
    names = {uri, path, *parts, *(p.rsplit(".", 1)[0] for p in parts)}
    for name in sorted((n for n in names if len(n) >= 2), key=len, reverse=True):
        text = text.replace(name, WITHHELD)
    return text


def run_note(key_identifier: str) -> dict:
    """What run.json says about a de-identified run."""
    return {
        "patient_id": f"HMAC-SHA256 with the key from {KEY_ENV}, {HASH_HEX_DIGITS} hex digits",
        "slide_id": "the same, with its own prefix",
        "uri": "not written",
        "key_id": key_identifier,
    }


def check_run_folder(store, key_identifier: str) -> None:
    """Refuse to mix ids in one run folder: de-identified results never go where the catalog's own
    ids are (their files would still hold them), nor beside those of another key, nor the
    other way round."""
    run_json = store.path("run.json")
    if not store.fs.exists(run_json):
        return
    previous = json.loads(store.fs.cat_file(run_json)).get("config", {}).get("run", {})
    before = previous.get("deidentify_key_id", "")
    if key_identifier and not before:
        raise DeidentifyError(
            f"{store.url} holds results with the catalog's own patient and slide ids; "
            "de-identified results cannot go into it (its files would still hold the ids). "
            "Use a new --out folder."
        )
    if before and not key_identifier:
        raise DeidentifyError(
            f"{store.url} holds de-identified results; run with --deidentify and the same "
            f"{KEY_ENV}, or use another --out folder"
        )
    if before != key_identifier:
        raise DeidentifyError(
            f"{store.url} was de-identified with another key (key id {before}; this key's id is "
            f"{key_identifier}); set {KEY_ENV} to the key it was made with, or use a new --out "
            "folder"
        )
