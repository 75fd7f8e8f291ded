#!/usr/bin/python3
"""Pre-start check of Mosquitto's persistence file; installed by the Ansible role ``mosquitto``.

Runs as ``ExecStartPre=-`` of mosquitto.service. Mosquitto 2.0 refuses to start when its
persistence file is truncated, has damaged bytes or is garbage ("Error: Couldn't open
database."), and systemd's Restart=on-failure then retries forever: a power cut during a
save would keep the site's broker down. This check asks Mosquitto itself: it loads (a hard
link of) the file into a throw-away broker that listens only on a unix socket in a
temporary folder, and counts the file as loadable once that broker answers an MQTT CONNECT,
which it does only after restoring the database. A file Mosquitto cannot load is renamed
to ``<file>.corrupt-<UTC timestamp>`` and the reason logged (stderr: the journal), so the
real broker starts with an empty database.

Never moves a file it is not sure about: a missing or empty file is fine (Mosquitto
accepts both), and a trial load that does not finish in time, or fails for a reason other
than the database, leaves the file where it is. Exit status 0 unless the arguments are
wrong; the unit's "-" prefix makes even that harmless.

Standard library only (runs with the system python3 before the broker starts).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

MAGIC = b"\x00\xb5\x00mosquitto db"  # first 15 bytes of every mosquitto.db (all formats since 0.15)
# MQTT 3.1.1 CONNECT, clean session, client id "db-check", no login: a broker with
# allow_anonymous false answers CONNACK "not authorized", which is all we need.
CONNECT = b"\x10\x14\x00\x04MQTT\x04\x02\x00\x3c\x00\x08db-check"
CONNACK = 0x20
DB_ERROR = "Couldn't open database"


def log(message: str) -> None:
    print(f"mosquitto-db-check: {message}", file=sys.stderr, flush=True)


def header_ok(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _answers_connect(sock_path: str, timeout_s: float) -> bool:
    """True if a broker on the unix socket answers a CONNECT with a CONNACK."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(sock_path)
            s.sendall(CONNECT)
            ready, _, _ = select.select([s], [], [], timeout_s)
            if not ready:
                return False
            reply = s.recv(4)
            return bool(reply) and reply[0] == CONNACK
    except OSError:
        return False


def trial_load(db: str, mosquitto: str, timeout_s: float) -> tuple[str, str]:
    """('ok' | 'corrupt' | 'unknown', detail) from loading the file into a throw-away broker."""
    # Beside the database, so a hard link works (no copy of a large file); the trial
    # broker is killed, never stopped, so it saves nothing, and a save would replace the
    # link, not write through it.
    work = tempfile.mkdtemp(prefix=".db-check-", dir=os.path.dirname(os.path.abspath(db)))
    sock_dir = tempfile.mkdtemp(prefix="mosquitto-db-check-")  # short path: unix sockets allow ~107 bytes
    proc: subprocess.Popen[bytes] | None = None
    try:
        trial_db = os.path.join(work, "mosquitto.db")
        try:
            os.link(db, trial_db)
        except OSError:
            shutil.copyfile(db, trial_db)
        sock_path = os.path.join(sock_dir, "probe.sock")
        conf = os.path.join(work, "probe.conf")
        with open(conf, "w") as f:
            f.write("\n".join([
                f"listener 0 {sock_path}",
                "allow_anonymous false",
                "persistence true",
                f"persistence_location {work}/",
                "persistence_file mosquitto.db",
                "autosave_interval 0",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                # Stay the user we are: the temporary folders are ours alone.
                f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            ]) + "\n")
        proc = subprocess.Popen([mosquitto, "-c", conf], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            # The listener opens before the database is read; only the main loop, after
            # the restore, answers a CONNECT.
            if os.path.exists(sock_path) and _answers_connect(sock_path, 0.5):
                return "ok", "mosquitto loaded it"
            time.sleep(0.05)
        else:
            return "unknown", f"mosquitto took longer than {timeout_s:g} s to load it"
        output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        errors = " | ".join(line.split(": ", 1)[-1] for line in output.splitlines()
                            if "Error" in line) or output.strip()[-300:]
        if proc.returncode < 0:
            return "corrupt", f"mosquitto died loading it (signal {-proc.returncode}): {errors}"
        if DB_ERROR in output:
            return "corrupt", f"mosquitto cannot load it: {errors}"
        return "unknown", f"trial broker exited with status {proc.returncode} for another reason: {errors}"
    finally:
        if proc is not None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc.stdout:
                proc.stdout.close()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sock_dir, ignore_errors=True)


def move_aside(db: str, keep: int, reason: str) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = f"{db}.corrupt-{stamp}"
    n = 1
    while os.path.exists(target):
        n += 1
        target = f"{db}.corrupt-{stamp}-{n}"
    os.rename(db, target)
    log(f"{db} is corrupt ({reason}); moved it to {target} so the broker starts with an empty "
        "database (retained messages and queued sessions are lost)")
    # Timestamps sort by name; the newest `keep` copies stay.
    for old in sorted(glob.glob(glob.escape(db) + ".corrupt-*"))[:-keep or None]:
        try:
            os.remove(old)
            log(f"deleted the old corrupt copy {old}")
        except OSError as e:
            log(f"could not delete {old}: {e}")
    return target


def check(db: str, mosquitto: str, timeout_s: float, keep: int) -> str:
    """'missing', 'empty', 'ok', 'kept' (not sure) or 'moved'."""
    try:
        size = os.path.getsize(db)
    except FileNotFoundError:
        log(f"{db} does not exist: nothing to check")
        return "missing"
    if size == 0:
        log(f"{db} is empty: mosquitto starts with an empty database")
        return "empty"
    if not header_ok(db):
        move_aside(db, keep, "it does not start with the mosquitto db header")
        return "moved"
    verdict, detail = trial_load(db, mosquitto, timeout_s)
    if verdict == "ok":
        log(f"{db} ({size} bytes): {detail}")
        return "ok"
    if verdict == "corrupt":
        move_aside(db, keep, detail)
        return "moved"
    log(f"{db} kept, could not decide: {detail}")
    return "kept"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True, help="the persistence file, e.g. /var/lib/mosquitto/mosquitto.db")
    parser.add_argument("--mosquitto", default="/usr/sbin/mosquitto", help="the broker binary")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds the trial load may take")
    parser.add_argument("--keep", type=int, default=3, help="corrupt copies kept (at least 1)")
    args = parser.parse_args(argv)
    try:
        print(check(args.db, args.mosquitto, args.timeout, max(1, args.keep)))
    except Exception as e:  # noqa: BLE001 - a failing check must never be why the broker is down
        log(f"check failed, {args.db} left as it is: {type(e).__name__}: {e}")
        print("error")
    return 0


if __name__ == "__main__":
    sys.exit(main())
