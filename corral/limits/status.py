"""The outcome vocabulary shared by every limiter.

The values are nginx's ``$limit_req_status`` / ``$limit_conn_status`` strings, so
access logs and metrics read the same as an nginx operator expects.
"""

from __future__ import annotations

from enum import StrEnum


class LimitStatus(StrEnum):
    PASSED = "PASSED"
    DELAYED = "DELAYED"
    REJECTED = "REJECTED"
    DELAYED_DRY_RUN = "DELAYED_DRY_RUN"
    REJECTED_DRY_RUN = "REJECTED_DRY_RUN"


def rejected_status(dry_run: bool) -> LimitStatus:
    # A dry run updates state exactly as a real run but lets the request through;
    # only the reported status remembers that it would have been refused.
    return LimitStatus.REJECTED_DRY_RUN if dry_run else LimitStatus.REJECTED
