"""The one retry policy of the codebase: a small typed value, on tenacity.

Every retry loop in Triplane (the outbox relays, webhook delivery, the
ledger's conflict retries, the decision log's write retries) is a
`RetryPolicy` read from its own config section, in the spirit of Temporal's
`RetryPolicy`: initial interval, backoff coefficient, maximum interval,
maximum attempts (0: until cancelled) and jitter. The value checks its bounds
when it is built, so a bad setting fails start-up naming the config key
instead of misbehaving at the first failure; it then produces tenacity's
retrying objects, so no plane writes a backoff loop of its own.

The wait before attempt n+1 (tenacity's `wait_exponential_jitter`) is
``min(initial_interval_s * backoff_coefficient ** (n - 1) + uniform(0, jitter_s),
maximum_interval_s)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
import tenacity

T = TypeVar("T")

# Bounds of every retry policy (TigerBeetle's "put a limit on everything"):
# a wait longer than a day or more attempts than this is a typo, not a plan.
MAX_INTERVAL_S = 86_400.0
MAX_ATTEMPTS = 10_000
MAX_BACKOFF_COEFFICIENT = 10.0

# What a retry is for: an exception type, a tuple of them, or a predicate.
RetryOn = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
# The retrying object a schedule-only call state refers to (it is never run).
_SCHEDULE_ONLY = tenacity.Retrying()


class RetryPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How often, how fast and how long one kind of work is retried.

    Used directly as a config section type: msgspec runs `__post_init__` when
    the config is loaded, and reports a violation with the section's path
    (e.g. "... - at `$.money.outbox.relay_retry`").
    """

    # Wait before the second attempt (before jitter).
    initial_interval_s: float
    # Each further wait is the previous one times this (1.0: a constant wait).
    backoff_coefficient: float = 2.0
    # No wait is longer than this, jitter included.
    maximum_interval_s: float
    # Attempts in all, the first one included; 0 retries until cancelled
    # (only for background loops that must never give up, such as a relay).
    maximum_attempts: int
    # A uniform random 0..jitter_s added to every wait, so replicas that failed
    # together do not retry in lockstep.
    jitter_s: float = 0.0

    def __post_init__(self) -> None:
        # ValueError: msgspec turns it into a ValidationError naming the section.
        problem = self._problem()
        if problem:
            raise ValueError(problem)

    def _problem(self) -> str:
        """The first bound this policy breaks, or "". Written as `not (ok)` so
        that NaN, which fails every comparison, is refused too."""
        if not (0.0 < self.maximum_interval_s <= MAX_INTERVAL_S):
            return f"maximum_interval_s must be in (0, {MAX_INTERVAL_S:g}]"
        if not (0.0 <= self.initial_interval_s <= self.maximum_interval_s):
            return "initial_interval_s must be in [0, maximum_interval_s]"
        if not (1.0 <= self.backoff_coefficient <= MAX_BACKOFF_COEFFICIENT):
            return f"backoff_coefficient must be in [1, {MAX_BACKOFF_COEFFICIENT:g}]"
        if not (0.0 <= self.jitter_s <= self.maximum_interval_s):
            return "jitter_s must be in [0, maximum_interval_s]"
        if not (0 <= self.maximum_attempts <= MAX_ATTEMPTS):
            return f"maximum_attempts must be in [0, {MAX_ATTEMPTS}] (0: until cancelled)"
        return ""

    # ---- the schedule, for callers that keep it themselves ----

    @property
    def until_cancelled(self) -> bool:
        return self.maximum_attempts == 0

    def backoff_s(self, failed_attempts: int) -> float:
        """Wait after the `failed_attempts`-th failed attempt (1 for the first),
        jitter included. For schedules kept in a database (webhook delivery),
        where no coroutine sleeps through the wait."""
        state = tenacity.RetryCallState(_SCHEDULE_ONLY, None, (), {})
        state.attempt_number = max(1, failed_attempts)
        return float(self.wait()(state))

    def exhausted(self, attempts_made: int) -> bool:
        """True when `attempts_made` attempts use up the policy."""
        return not self.until_cancelled and attempts_made >= self.maximum_attempts

    # ---- tenacity ----

    def wait(self) -> tenacity.wait.wait_base:
        return tenacity.wait_exponential_jitter(
            multiplier=self.initial_interval_s,
            max=self.maximum_interval_s,
            exp_base=self.backoff_coefficient,
            jitter=self.jitter_s,
        )

    def stop(self) -> tenacity.stop.stop_base:
        if self.until_cancelled:
            return tenacity.stop_never
        return tenacity.stop_after_attempt(self.maximum_attempts)

    def retrying(
        self,
        retry_on: RetryOn,
        what: str,
        log: logging.Logger,
        level: int = logging.WARNING,
        sleep: Callable[[float], None] = time.sleep,
    ) -> tenacity.Retrying:
        """A tenacity `Retrying` for blocking work (e.g. on a writer thread).
        The last failure is re-raised as itself once the attempts run out."""
        return tenacity.Retrying(
            sleep=sleep,
            stop=self.stop(),
            wait=self.wait(),
            retry=_retry_condition(retry_on),
            before_sleep=_log_retry(what, log, level, self.maximum_attempts),
            reraise=True,
        )

    def async_retrying(
        self,
        retry_on: RetryOn,
        what: str,
        log: logging.Logger,
        level: int = logging.WARNING,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> tenacity.AsyncRetrying:
        """A tenacity `AsyncRetrying` (cancelling the task stops it at once,
        even mid-wait). The last failure is re-raised as itself."""
        extra = {} if sleep is None else {"sleep": sleep}
        return tenacity.AsyncRetrying(
            stop=self.stop(),
            wait=self.wait(),
            retry=_retry_condition(retry_on),
            before_sleep=_log_retry(what, log, level, self.maximum_attempts),
            reraise=True,
            **extra,  # type: ignore[arg-type]
        )

    async def retry(
        self,
        fn: Callable[[], Awaitable[T]],
        retry_on: RetryOn,
        what: str,
        log: logging.Logger,
        level: int = logging.WARNING,
    ) -> T:
        """Awaits `fn()` until it succeeds, the attempts run out (its last
        error is raised) or the caller is cancelled."""

        # tenacity awaits only what it recognises as a coroutine function; a
        # lambda returning a coroutine would come back unawaited.
        async def attempt() -> T:
            return await fn()

        result: T = await self.async_retrying(retry_on, what, log, level)(attempt)
        return result


def _retry_condition(retry_on: RetryOn) -> tenacity.retry_base:
    if isinstance(retry_on, type | tuple):
        return tenacity.retry_if_exception_type(retry_on)
    return tenacity.retry_if_exception(retry_on)


def _log_retry(
    what: str, log: logging.Logger, level: int, maximum_attempts: int
) -> Callable[[tenacity.RetryCallState], None]:
    of = f" of {maximum_attempts}" if maximum_attempts else ""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        wait_s = state.next_action.sleep if state.next_action is not None else 0.0
        log.log(
            level,
            "%s failed (attempt %d%s: %r); retrying in %.3f s",
            what,
            state.attempt_number,
            of,
            error,
            wait_s,
        )

    return before_sleep
