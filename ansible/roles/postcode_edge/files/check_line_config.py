"""Check a rendered line config with the release's own `edge-agent run --validate-config`.

Run by Ansible with the new release's Python (``<release>/bin/python``) before a line config
is written. The config names the paths the services see (/etc/postcode-edge/...,
/var/lib/postcode-edge/...), while Ansible may be writing a staged root (``edge_root``), so
this writes a copy of the config with every path-typed key (found from the release's own
config schema) looked up under ``--root``, and runs the release's validator on that copy.

A line's first model is installed by ``edge-sync adopt`` in the unit's ExecStartPre, so before
the first start ``models/active`` does not exist yet: the copy then points at an ``active``
link to the bundle shipped in the release, which is what adopt will install. Exit status and
messages are the validator's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import tomllib
import typing
from pathlib import Path

from edge_agent.config import DEFAULT_BUNDLE, AgentConfig


def path_keys() -> dict[str, dict[str, str]]:
    """{section: {key: "one" | "many"}} for every key whose value is a path (or a list of them)."""
    keys: dict[str, dict[str, str]] = {}
    for section in dataclasses.fields(AgentConfig):
        hints = typing.get_type_hints(typing.get_type_hints(AgentConfig)[section.name])
        for name, hint in hints.items():
            args = typing.get_args(hint)
            if hint is Path or (Path in args and typing.get_origin(hint) is not tuple):
                keys.setdefault(section.name, {})[name] = "one"
            elif typing.get_origin(hint) is tuple and Path in args:
                keys.setdefault(section.name, {})[name] = "many"
    return keys


def toml_value(value: object) -> str:
    """The TOML text of a string, number, boolean or list of them (JSON spells them alike)."""
    if isinstance(value, dict):
        raise ValueError("nested tables are not part of the agent's config")
    return json.dumps(value)


def staged_copy(table: dict, root: Path, config_dir: Path, work: Path) -> Path:
    """Write ``table`` with its paths under ``root`` into ``work``; return the file."""
    kinds = path_keys()

    def under_root(value: str) -> str:
        path = Path(value) if Path(value).is_absolute() else config_dir / value
        return str(root / path.relative_to("/"))

    for section, values in table.items():
        for key, kind in kinds.get(section, {}).items():
            if key in values:
                values[key] = under_root(values[key]) if kind == "one" else [under_root(v) for v in values[key]]
    bundle = Path(table.get("model", {}).get("bundle", DEFAULT_BUNDLE))
    if bundle.name == "active" and not bundle.exists():
        # Not adopted yet: stand in the shipped bundle, as `edge-sync adopt` will at the first start.
        stand_in = work / "models" / "active"
        stand_in.parent.mkdir()
        stand_in.symlink_to(DEFAULT_BUNDLE, target_is_directory=True)
        table.setdefault("model", {})["bundle"] = str(stand_in)
    lines = []
    for section, values in table.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    staged = work / "line.toml"
    staged.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return staged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/"), help="where the production paths lie (edge_root)")
    parser.add_argument("--config-dir", type=Path, default=Path("/etc/postcode-edge/lines"),
                        help="production folder of the config (relative paths in it are relative to it)")
    parser.add_argument("config", type=Path, help="the rendered config (e.g. Ansible's temporary file)")
    args = parser.parse_args(argv)
    try:
        table = tomllib.loads(args.config.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        print(f"config error: {args.config}: {exc}", file=sys.stderr)
        return 2
    agent = Path(sys.executable).parent / "edge-agent"
    with tempfile.TemporaryDirectory(prefix="check-line-config-") as work:
        try:
            staged = staged_copy(table, args.root.resolve(), args.config_dir, Path(work))
        except (ValueError, TypeError) as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        done = subprocess.run([str(agent), "run", "--validate-config", "--config", str(staged)], check=False)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
