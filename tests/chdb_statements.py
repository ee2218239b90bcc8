"""Runs statements on a current ClickHouse (chdb) over given rows of the gateway's `logs`.

Reads JSON on stdin: ddl, database, columns, rows (TabSeparated), statements. Prints a JSON
list: per statement, its result rows as compact JSON arrays, integers unquoted, sorted and
joined by newlines (the form the Rust test builds from the old server's answers).
"""
import json
import re
import sys

from chdb import session

INTEGER = re.compile(r"^-?[0-9]+$")


def normalize(cell):
    if isinstance(cell, str) and INTEGER.match(cell):
        return int(cell)
    return cell


def main():
    spec = json.load(sys.stdin)
    s = session.Session()
    s.query(f"CREATE DATABASE IF NOT EXISTS {spec['database']}")
    s.query(f"USE {spec['database']}")
    s.query(spec["ddl"])
    if spec["rows"]:
        s.query(f"INSERT INTO logs ({spec['columns']}) FORMAT TabSeparated\n{spec['rows']}")
    out = []
    for statement in spec["statements"]:
        answer = json.loads(s.query(statement, "JSONCompact").bytes() or b'{"data": []}')
        rows = sorted(
            json.dumps([normalize(c) for c in row], separators=(",", ":"), ensure_ascii=False)
            for row in answer["data"]
        )
        out.append("\n".join(rows))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
