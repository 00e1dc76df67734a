"""The planner: predict memory and step time of parallel layouts, rank them, explain, write
the winner as a config (docs/planner.md). `memcheck.check_fits` is the pre-launch memory check."""
