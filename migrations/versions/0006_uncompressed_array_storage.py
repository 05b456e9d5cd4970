"""PostgreSQL: store the array blobs out of line without compression (``STORAGE EXTERNAL``).

bnwatch's blobs are float64 statistics and float32 samples: pglz, TOAST's default, compresses
each ~40 KB value in full and then throws the result away because it saves less than 25 %.
On ResNet-50 windows that made the ``windows`` INSERT about 30 % slower for no byte saved
(benchmarks/store.py).  ``EXTERNAL`` keeps the values out of line and uncompressed; existing
rows are untouched (the setting applies to values written from now on).  SQLite has no such
setting: there this revision only moves the version.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 18:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

ARRAY_COLUMNS = {
    "windows": ("moments", "reservoir"),
    "refs": ("mean_var", "moments", "reservoir"),
}


ALREADY_EXTERNAL = frozenset({("windows", "moments")})
"""0001 created ``windows.moments`` ``EXTERNAL`` already: downgrading leaves it so."""


def _set_storage(storage: str, skip: frozenset[tuple[str, str]] = frozenset()) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, columns in ARRAY_COLUMNS.items():
        alters = ", ".join(
            f"ALTER COLUMN {c} SET STORAGE {storage}" for c in columns if (table, c) not in skip
        )
        op.execute(f"ALTER TABLE {table} {alters}")


def upgrade() -> None:
    _set_storage("EXTERNAL")


def downgrade() -> None:
    _set_storage("EXTENDED", skip=ALREADY_EXTERNAL)
