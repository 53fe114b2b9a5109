"""`make bench`: what the heartbeat costs, measured side by side with its baselines."""
