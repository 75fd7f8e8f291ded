#!/usr/bin/python3
"""Keep a Mosquitto password file equal to a wanted set of users; installed by the Ansible role ``mosquitto``.

Reads ``{"users": {"name": "password", ...}}`` as JSON on stdin (never argv: the command
line of a process is visible to every local user) and prints ``{"changed": ..., "msg": ...}``.

mosquitto_passwd salts every hash, so regenerating the file always changes it. Instead
this verifies each existing entry against the wanted password (PBKDF2-SHA512 ``$7$`` and
SHA512 ``$6$``, Mosquitto's two formats) and rewrites the file only when a user was added
or removed or a password differs. The new file is hashed by ``mosquitto_passwd -U`` from a
plaintext copy of the new or changed entries written beside it (mode 0600, hashed in
place at once); entries that still verify keep their hash, so a rotated password changes
one line. The result is verified again, then renamed over the old file, so the broker
never reads a half-written one. Owner, group and
mode are set too; with ``--check`` nothing is written, only reported.

Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import grp
import hashlib
import hmac
import json
import os
import pwd
import subprocess
import sys
import tempfile


def verify(password: str, encoded: str) -> bool:
    """True if ``encoded`` (a password-file hash) is the hash of ``password``."""
    parts = encoded.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":  # $7$<iterations>$<b64 salt>$<b64 pbkdf2-sha512>
            iterations, salt, digest = int(parts[2]), base64.b64decode(parts[3]), base64.b64decode(parts[4])
            mine = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(digest))
        elif len(parts) == 4 and parts[1] == "6":  # $6$<b64 salt>$<b64 sha512(password + salt)>
            salt, digest = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            mine = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(mine, digest)


def read_entries(path: str) -> dict[str, str] | None:
    """{user: hash} of a password file, or None if there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    entries = {}
    for line in lines:
        if line.strip() and not line.startswith("#"):
            user, _, encoded = line.partition(":")
            entries[user] = encoded
    return entries


def matches(entries: dict[str, str] | None, users: dict[str, str]) -> bool:
    return entries is not None and set(entries) == set(users) and all(
        verify(password, entries[user]) for user, password in users.items())


def problems(users: dict[str, str]) -> list[str]:
    """Names or passwords mosquitto_passwd -U would mangle (it splits at the first ':')."""
    bad = []
    for user, password in users.items():
        if not user or any(c in user for c in ":\n\r#") or user != user.strip():
            bad.append(f"user name {user!r} must be non-empty, without ':', '#', line breaks or outer spaces")
        if not password or any(c in password for c in ":\n\r"):
            bad.append(f"password of {user!r} must be non-empty, without ':' or line breaks")
    return bad


def write(path: str, users: dict[str, str], entries: dict[str, str] | None, mosquitto_passwd: str,
          uid: int, gid: int, mode: int) -> None:
    """Write the file: entries that still verify keep their hash, the others are hashed anew."""
    kept = {user: encoded for user, encoded in (entries or {}).items()
            if user in users and verify(users[user], encoded)}
    fresh = {user: password for user, password in users.items() if user not in kept}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".passwd-", dir=folder)  # mode 0600
    try:
        if fresh:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(f"{user}:{password}\n" for user, password in sorted(fresh.items())))
            fd = -1
            result = subprocess.run([mosquitto_passwd, "-U", tmp], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"mosquitto_passwd -U failed ({result.returncode}): "
                                   f"{(result.stderr or result.stdout).strip()}")
            hashed = read_entries(tmp) or {}
        else:
            hashed = {}
        merged = {**kept, **hashed}
        if not matches(merged, users):
            raise RuntimeError("the hashes mosquitto_passwd wrote do not verify against the wanted passwords")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(f"{user}:{merged[user]}\n" for user in sorted(merged)))
        os.chown(tmp, uid, gid)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", required=True)
    parser.add_argument("--owner", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--mode", default="0640", help="octal")
    parser.add_argument("--mosquitto-passwd", default="/usr/bin/mosquitto_passwd")
    parser.add_argument("--check", action="store_true", help="report what would change, write nothing")
    args = parser.parse_args(argv)

    def done(changed: bool, msg: str, failed: bool = False) -> int:
        print(json.dumps({"changed": changed, "failed": failed, "msg": msg}))
        return 1 if failed else 0

    try:
        users = json.load(sys.stdin)["users"]
        if not isinstance(users, dict) or not all(isinstance(v, str) for v in users.values()):
            return done(False, "stdin must be {\"users\": {name: password}} with string passwords", True)
        bad = problems(users)
        if bad:
            return done(False, "; ".join(bad), True)
        uid, gid, mode = pwd.getpwnam(args.owner).pw_uid, grp.getgrnam(args.group).gr_gid, int(args.mode, 8)
        entries = read_entries(args.file)
        if not matches(entries, users):
            if entries is None:
                why = f"created with {len(users)} user(s)"
            else:
                added, removed = sorted(set(users) - set(entries)), sorted(set(entries) - set(users))
                changed_pw = sorted(u for u in set(users) & set(entries) if not verify(users[u], entries[u]))
                why = "; ".join(f"{label}: {', '.join(names)}" for label, names in
                                (("added", added), ("removed", removed), ("new password", changed_pw)) if names)
            if not args.check:
                write(args.file, users, entries, args.mosquitto_passwd, uid, gid, mode)
            return done(True, why)
        st = os.stat(args.file)
        if (st.st_uid, st.st_gid, st.st_mode & 0o7777) != (uid, gid, mode):
            if not args.check:
                os.chown(args.file, uid, gid)
                os.chmod(args.file, mode)
            return done(True, f"owner, group or mode set to {args.owner}:{args.group} {args.mode}")
        return done(False, f"{len(users)} user(s) up to date")
    except Exception as e:  # noqa: BLE001 - reported to Ansible as a failed task
        return done(False, f"{type(e).__name__}: {e}", True)


if __name__ == "__main__":
    sys.exit(main())
