#!/usr/bin/env python3
"""Checks `hotfleet -o json` output against docs/schemas/KIND.json.

Input (argv[1]): a JSON file, a list of {"command", "kind", "json", "yaml"?}
entries written by tests/cli_ux.rs. Each entry's "json" is what the command
printed (one document, or one per line for `rollout watch`); every document
must be of the expected kind and valid against that kind's schema. With
"yaml", the same command's `-o yaml` output must load to the same document.

Needs the `jsonschema` package (and PyYAML for the YAML comparison):
`python3 -m pip install jsonschema pyyaml`.
"""

import json
import pathlib
import sys

import jsonschema
import yaml

SCHEMAS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "schemas"


def documents(text):
    text = text.strip()
    try:
        return [json.loads(text)]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def main():
    entries = json.loads(pathlib.Path(sys.argv[1]).read_text())
    failures = []
    kinds = set()
    for entry in entries:
        command, kind = entry["command"], entry["kind"]
        schema = json.loads((SCHEMAS / f"{kind}.json").read_text())
        try:
            docs = documents(entry["json"])
        except json.JSONDecodeError as e:
            failures.append(f"{command}: not JSON ({e}): {entry['json'][:200]!r}")
            continue
        if not docs:
            failures.append(f"{command}: printed nothing")
        for doc in docs:
            errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=str)
            for error in errors[:3]:
                path = "/".join(str(p) for p in error.absolute_path)
                failures.append(f"{command}: {kind} at /{path}: {error.message}")
        if "yaml" in entry and docs:
            loaded = yaml.safe_load(entry["yaml"])
            if loaded != docs[0]:
                failures.append(f"{command}: -o yaml reads back differently from -o json")
        kinds.add(kind)
    missing = sorted(p.stem for p in SCHEMAS.glob("*.json") if p.stem not in kinds)
    if missing:
        failures.append(f"schemas no command was checked against: {', '.join(missing)}")
    for failure in failures:
        print(failure)
    print(f"{len(entries)} commands checked against {len(kinds)} schemas, {len(failures)} problem(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
