"""Fan-out: relay batches from Redis to this node's subscriptions, gaps repaired from the log."""
