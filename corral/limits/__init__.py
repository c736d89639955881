"""Rate, concurrency and token limits: nginx-exact pure math plus its stores.

``leaky`` (limit_req), ``conn`` (limit_conn) and ``tokens`` (token budgets) are
pure and take ``now`` as a parameter; ``storage`` holds the one protocol and its
in-memory and Redis implementations.
"""

from corral.limits.conn import ConnCall, ConnDecision, ConnLease
from corral.limits.leaky import ReqDecision, ReqZoneCall, ReqZoneParams, parse_rate
from corral.limits.status import LimitStatus
from corral.limits.tokens import TokenBudget, TokenCall, TokenDecision

__all__ = [
    "ConnCall",
    "ConnDecision",
    "ConnLease",
    "LimitStatus",
    "ReqDecision",
    "ReqZoneCall",
    "ReqZoneParams",
    "TokenBudget",
    "TokenCall",
    "TokenDecision",
    "parse_rate",
]
