"""The actors: shard processes, their inboxes and reply channels, and the supervisor."""
