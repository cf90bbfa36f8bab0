"""The open-files limit: raised at start to what thousands of provider connections need, where allowed."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

__all__ = ["raise_fd_limit"]


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit where allowed; log what was done, and warn
    once when ``needed`` descriptors (connections for the ceiling plus some) exceed what is allowed.
    Returns the (soft, hard) limits in force afterwards."""
    try:
        import resource
    except ImportError:  # not on this platform
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
        else:
            log.info("open-files limit raised from %d to %d (hard limit)", soft, target)
            soft = target
    if soft != resource.RLIM_INFINITY and needed > soft:
        log.warning(
            "the provider concurrency ceiling needs about %d file descriptors but only %d are allowed: "
            "lower IDV_MAX_IN_FLIGHT or raise the hard limit (ulimit -Hn)",
            needed,
            soft,
        )
    return soft, hard
