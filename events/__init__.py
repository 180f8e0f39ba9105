"""The durable core of taskcast: event log, task model, queue, relay and worker runtime."""
