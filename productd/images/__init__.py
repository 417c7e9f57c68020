"""The image pipeline (issue 13): fetch, render, store, and the durable job queue (docs/images.md)."""
