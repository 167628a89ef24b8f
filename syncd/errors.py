"""Errors grouped by what the caller does next (see style.md).

Nothing above ``connectors/`` ever sees a vendor exception: connectors translate
``hubspot...ApiException`` / ``SalesforceError`` / transport errors into these, once.

Every error can say which CRM it concerns: ``system`` ("hubspot", "salesforce"),
set where the error is raised or translated (the connectors set it on everything
they raise). ``None`` means no CRM in particular (a config file, the state store).
"""

from __future__ import annotations


class SyncError(Exception):
    """Root of every syncd error. ``system``: the CRM it concerns, or None."""

    def __init__(self, message: str = "", *, system: str | None = None) -> None:
        super().__init__(message)
        self.system = system


class ConfigError(SyncError):
    """The deployment config is wrong: fix the file (exit 2)."""


class MappingError(SyncError):
    """A mapping or SLA file is wrong: fix the file (exit 2). Message carries file:line."""


class FatalError(SyncError):
    """Stop working with this system and alert; retrying now will not help."""


class AuthError(FatalError):
    """Bad or expired credentials (HTTP 401, INVALID_SESSION_ID)."""


class RetriableError(SyncError):
    """Transient: back off and retry. ``retry_after`` (seconds) when the server said so."""

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after: float | None = None, body: str | None = None,
                 system: str | None = None) -> None:
        super().__init__(message, system=system)
        self.status = status
        self.retry_after = retry_after
        self.body = body


class RateLimited(RetriableError):
    """HTTP 429 or the CRM's request-limit error."""


class BudgetExhausted(FatalError):
    """The daily API budget is spent (Salesforce REQUEST_LIMIT_EXCEEDED, HubSpot DAILY)."""


class RecordError(SyncError):
    """One record is bad: quarantine it with this reason and go on with the rest."""

    system: str  # a record always belongs to a system ("" when the caller did not say)

    def __init__(self, message: str, *, system: str = "", object: str = "", record_id: str = "") -> None:
        super().__init__(message, system=system)
        self.object = object
        self.record_id = record_id
