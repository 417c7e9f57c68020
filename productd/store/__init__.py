"""The store: product records, the merge rule and one shard's map. Pure: no processes, no HTTP."""
