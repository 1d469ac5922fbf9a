"""Pseudonymised identifiers: patient, study and series ids hashed with a secret salt.

DESIGN.md: identifiers are kept as given unless a salt is supplied (``--id-salt-file`` or
``$CTSEARCH_ID_SALT_FILE``). With one, every job hashes them the same way, keyed by the salt, so
one patient's examinations still link (cross-exam search works) while the outputs no longer
carry the hospital's ids or the DICOM UIDs that lead back to its PACS. Only a fingerprint of
the salt is stored, to refuse mixing salts; the salt itself never enters an output.

Example:
    >>> salt = b"0123456789abcdef-secret"
    >>> p = pseudonymise("PAT-0042", salt)
    >>> p, is_pseudonym(p), pseudonymise(p, salt) == p, pseudonymise("", salt)
    ('p-f88d06324e5c862a', True, True, '')
    >>> pseudonymise_ids({"volume_id": "liver_3", "patient_id": "PAT-0042", "exam_date": "2020-01-02"}, salt)
    {'volume_id': 'liver_3', 'patient_id': 'p-f88d06324e5c862a', 'exam_date': '2020-01-02'}
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re

from ctsearch.errors import CTSearchInputError

SALT_ENV = "CTSEARCH_ID_SALT_FILE"
SCHEME = "hmac-sha256-64"  # HMAC-SHA256, first 64 bits as hex
ID_KEYS = ("patient_id", "study_id", "series_id")
MIN_SALT_BYTES = 16  # a short salt can be found by trying them all against a known id
_PSEUDONYM_RE = re.compile(r"^p-[0-9a-f]{16}$")
NOT_PSEUDONYMISED = {"pseudonymised": False}


def pseudonymise(value: str | None, salt: bytes) -> str:
    """``"p-"`` + the first 16 hex digits of HMAC-SHA256(salt, value).

    An empty or missing id stays ``""`` (unknown stays unknown), and a value that already is a
    pseudonym is returned unchanged, so hashing twice (a pseudonymised manifest indexed with the
    same salt) is harmless.
    """
    if not value:
        return ""
    value = str(value)
    if is_pseudonym(value):
        return value
    return "p-" + hmac.new(salt, value.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def is_pseudonym(value: str | None) -> bool:
    """True for ``p-`` followed by 16 lower-case hex digits (what :func:`pseudonymise` makes)."""
    return bool(value) and bool(_PSEUDONYM_RE.match(str(value)))


def load_salt(path: str | os.PathLike | None) -> bytes | None:
    """The salt file's bytes without one trailing newline; at least 16 bytes (None: no salt file given).

    Raises:
        CTSearchInputError: the file is missing, unreadable, empty or too short.
    """
    if path is None:
        return None
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            salt = f.read()
    except FileNotFoundError:
        raise CTSearchInputError(path, "no such salt file (--id-salt-file / $" + SALT_ENV + ")") from None
    except OSError as e:
        raise CTSearchInputError(path, f"cannot read the salt file ({e.strerror or e})") from None
    if salt.endswith(b"\r\n"):
        salt = salt[:-2]
    elif salt.endswith(b"\n"):
        salt = salt[:-1]
    if not salt:
        raise CTSearchInputError(path, "the salt file is empty")
    if len(salt) < MIN_SALT_BYTES:
        raise CTSearchInputError(
            path,
            f"the salt has {len(salt)} bytes; use at least {MIN_SALT_BYTES} random bytes "
            "(e.g. `openssl rand -hex 32 > salt`): a short salt is guessable",
        )
    return salt


def salt_fingerprint(salt: bytes) -> str:
    """First 12 hex digits of sha256(salt): stored in outputs to notice a salt change, never the salt."""
    return hashlib.sha256(salt).hexdigest()[:12]


def ids_block(salt: bytes | None) -> dict:
    """The ``ids`` record of protocol.json / index.json / manifest metadata for this salt (or none)."""
    if salt is None:
        return dict(NOT_PSEUDONYMISED)
    return {"pseudonymised": True, "scheme": SCHEME, "salt_fingerprint": salt_fingerprint(salt)}


def pseudonymise_ids(ids: dict, salt: bytes | None) -> dict:
    """A copy of ``ids`` with patient_id, study_id and series_id hashed (unchanged without a salt).

    ``volume_id`` is hashed too when it is the series' DICOM UID (DICOM volumes are named by
    their SeriesInstanceUID); a file name stays, the stored path carries it anyway. Every other
    key (exam_date, slice_index, ...) is kept.
    """
    if salt is None:
        return dict(ids)
    return {**ids, **{k: pseudonymise(ids[k], salt) for k in _identifying_keys(ids)}}


def withhold_ids(ids: dict) -> dict:
    """A copy of ``ids`` with the keys :func:`pseudonymise_ids` would hash emptied (no salt to hash them)."""
    return {**ids, **{k: "" for k in _identifying_keys(ids)}}


def _identifying_keys(ids: dict) -> list[str]:
    from ctsearch.io.dicom import is_uid

    vid, sid = ids.get("volume_id"), ids.get("series_id")
    uid_named = bool(vid) and vid == sid and is_uid(str(vid))
    return [k for k in ID_KEYS if k in ids] + (["volume_id"] if uid_named else [])


def _pseudonymised(block: dict | None) -> bool:
    return bool((block or NOT_PSEUDONYMISED).get("pseudonymised"))


def check_same_salt(recorded: dict | None, salt: bytes | None, where: str | os.PathLike, fix: str) -> None:
    """Refuse to add ids hashed with ``salt`` (or kept as given) to outputs whose ``ids`` block differs.

    ``fix``: what the user can do instead, e.g. "or choose a new --out directory".
    """
    if _pseudonymised(recorded):
        fp = recorded.get("salt_fingerprint", "?")
        if salt is None:
            raise CTSearchInputError(
                where,
                f"its ids are pseudonymised (salt fingerprint {fp}); pass the same "
                f"--id-salt-file (or ${SALT_ENV}) {fix}",
            )
        if salt_fingerprint(salt) != fp:
            raise CTSearchInputError(
                where,
                f"its ids were pseudonymised with another salt (fingerprint {fp}, yours "
                f"{salt_fingerprint(salt)}); the ids would not link: use that salt {fix}",
            )
    elif salt is not None:
        raise CTSearchInputError(
            where,
            "its ids are kept as given, so ids hashed with --id-salt-file would not link "
            f"to them: drop --id-salt-file (and ${SALT_ENV}) {fix}",
        )


def stored_id(
    value: str | None, recorded: dict | None, salt: bytes | None, where: str | os.PathLike
) -> str | None:
    """A user-given id (``--patient P``) as the outputs store it: a pseudonym or an original id.

    On pseudonymised outputs a pseudonym is taken as it is and an original id is hashed, which
    needs the same salt. Kept-as-given outputs take the value as it is.
    """
    if value is None or not _pseudonymised(recorded) or is_pseudonym(value):
        return value
    if salt is None:
        raise CTSearchInputError(
            where,
            f"its ids are pseudonymised: give the pseudonym (p-...) of {value!r}, or pass "
            f"--id-salt-file (or ${SALT_ENV}) to hash it",
        )
    check_same_salt(recorded, salt, where, "to hash it")
    return pseudonymise(value, salt)
