"""The relay: the log, in commit order, to Redis (invariant 1).

- `publisher`: the leader (one at a time, under an advisory lock) that tails the log below
  the read bound and publishes chained batches;
- `batch`: the Redis message, pre-encoded update frames chained by position;
- `projector`: the view after each event, for those frames (a bounded cache of views);
- `waker`: appenders' wake-up hint to the publisher, through Redis;
- `follow`: following a Redis channel for good (the publisher's hints, a node's fan-out).
"""
