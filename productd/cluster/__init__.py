"""The multi-host mode (issue 14): shard queues on RabbitMQ and shard state in PostgreSQL.

Its building blocks so far, not yet wired into `productd serve`:

- `pgstore`: the shards' products and owners in PostgreSQL, versioned migrations, the epoch
  that fences an old owner, the version-guarded batch upsert;
- `broker`: one durable quorum queue per shard with a single active consumer, confirmed
  publishing, manual acknowledgement after the commit;
- `migrate`: `productd migrate` / `python -m productd.cluster.migrate`.

The clients are an optional extra, so that a single-host install does not carry them.
"""

from __future__ import annotations

try:
    import aio_pika  # noqa: F401
    import psycopg  # noqa: F401
except ImportError as exc:  # pragma: no cover - the test extra installs both
    raise ImportError(
        f"productd's cluster mode needs {exc.name!r}, which is not installed: pip install 'productd[cluster]'"
    ) from exc
