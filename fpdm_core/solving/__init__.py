"""The shared fixed-point solve loop (per-sample stopping, compaction, stats) and synthetic test problems."""
