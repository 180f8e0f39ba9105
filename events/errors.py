"""The error tree of taskcast. Each error carries its wire `code` (PROTOCOL.md, Errors).

    TaskcastError
    ├── BadRequest            bad_request
    ├── Unauthorized          unauthorized
    ├── Forbidden             forbidden
    ├── NotFound              not_found
    ├── Conflict              conflict
    │   ├── VersionConflict   the task moved on since it was read (optimistic concurrency)
    │   ├── IllegalTransition the FSM forbids this event in the task's status
    │   ├── StaleFence        a worker's lease was lost; it may write nothing (invariant 3)
    │   └── DuplicateKey      an idempotency key raced with itself
    ├── RateLimited           rate_limited
    ├── TooLarge              too_large
    ├── Unavailable           unavailable (retryable: nothing was written)
    └── Internal              internal
"""

from __future__ import annotations


class TaskcastError(Exception):
    code = "internal"
    retryable = False


class BadRequest(TaskcastError):
    code = "bad_request"


class Unauthorized(TaskcastError):
    code = "unauthorized"


class Forbidden(TaskcastError):
    code = "forbidden"


class NotFound(TaskcastError):
    code = "not_found"


class Conflict(TaskcastError):
    code = "conflict"


class VersionConflict(Conflict):
    pass


class IllegalTransition(Conflict):
    pass


class StaleFence(Conflict):
    pass


class DuplicateKey(Conflict):
    pass


class RateLimited(TaskcastError):
    code = "rate_limited"
    retryable = True


class TooLarge(TaskcastError):
    code = "too_large"


class Unavailable(TaskcastError):
    code = "unavailable"
    retryable = True


class Internal(TaskcastError):
    code = "internal"
    retryable = True  # nothing is known to have been written: retrying with the key is safe
