"""`productd migrate` (also `python -m productd.cluster.migrate`): create or upgrade a cluster's
PostgreSQL schema, recording its name and shard count on a fresh database.

Exit codes: 0 done (or nothing to do), 2 refused (unreachable database, a newer schema, another
cluster's layout), with the reason on stderr and nothing written.
"""

from __future__ import annotations

import argparse
import os
import sys

import psycopg

from productd.cluster import pgstore


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="productd migrate",
        description="Create or upgrade the PostgreSQL schema of a productd cluster.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--database", default=os.environ.get("PRODUCTD_DATABASE"),
                        help="postgresql://... URL [env PRODUCTD_DATABASE]")
    parser.add_argument("--shards", type=int, default=os.environ.get("PRODUCTD_SHARDS") or None,
                        help="the cluster's shard count, fixed at creation (about 10 per planned owner host) "
                        "[env PRODUCTD_SHARDS]")
    parser.add_argument("--cluster", default=os.environ.get("PRODUCTD_CLUSTER", "default"),
                        help="the cluster's name (its queues are productd.NAME.shard.K) [env PRODUCTD_CLUSTER]")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.database:
        parser.error("--database is required")
    if args.shards is None or not 1 <= args.shards <= 1024:
        parser.error("--shards is required, 1..1024")
    try:
        with pgstore.connect(args.database) as conn:
            before, after = pgstore.migrate(conn, args.shards, args.cluster)
    except (psycopg.Error, pgstore.DatabaseError) as exc:
        print(f"productd migrate: {exc}".rstrip(), file=sys.stderr)
        return 2
    if before == after:
        print(f"productd migrate: schema version {after}, nothing to do")
    else:
        print(f"productd migrate: schema version {before} -> {after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
