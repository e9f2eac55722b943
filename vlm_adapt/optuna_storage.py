"""The SQLite study storage of the Optuna sweeps (`conf/hparams_search/`): one file per study, resumable.

A study lives in a fixed file under the log directory, so running the same sweep again loads it
and adds trials instead of starting over. Optuna 2.10 (pinned by hydra-optuna-sweeper 1.3) stamps
its schema version through alembic without committing under SQLAlchemy 2, which leaves a new
database without a version and fails the next access; an autocommit engine stores it.
"""

from __future__ import annotations

from pathlib import Path

from optuna.storages import RDBStorage


def sqlite_storage(path: str) -> RDBStorage:
    """Optuna storage in the SQLite file `path` (its folder is created)."""
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return RDBStorage(f"sqlite:///{file}", engine_kwargs={"isolation_level": "AUTOCOMMIT"})
