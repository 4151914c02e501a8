"""Exceptions of fleetvm, each carrying the HTTP status the API maps it to.

FleetvmError (500)
 +-- InvalidRequest (400)
 |    +-- InvalidSessionId, InvalidExecutionId (400)
 +-- NotAuthenticated (401)
 +-- PermissionDenied (403)
 +-- NotFound (404)
 |    +-- SessionNotFound, NoVmAssigned, VmFileNotFound, ApiKeyNotFound,
 |         ExecutionNotFound
 +-- Conflict (409)
 |    +-- VmNotRunning, AlreadyExists
 +-- PayloadTooLarge (413)
 +-- TooManyRequests (429)
 +-- Unavailable (503)
      +-- NoWorkerAvailable, WorkerDown, WorkerTimeout, WorkerBusy,
          SpawnFailed, DriverError

Driver, broker and database errors are translated into these where they are
caught, so the API has one exception handler and routes repeat no status codes.
"""

from __future__ import annotations


class FleetvmError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(FleetvmError):
    status_code = 400
    code = "invalid_request"


class InvalidSessionId(InvalidRequest):
    code = "invalid_session_id"


class InvalidExecutionId(InvalidRequest):
    code = "invalid_execution_id"


class NotAuthenticated(FleetvmError):
    status_code = 401
    code = "not_authenticated"


class PermissionDenied(FleetvmError):
    status_code = 403
    code = "permission_denied"


class NotFound(FleetvmError):
    status_code = 404
    code = "not_found"


class SessionNotFound(NotFound):
    code = "session_not_found"


class NoVmAssigned(NotFound):
    code = "no_vm_assigned"


class VmFileNotFound(NotFound):
    code = "file_not_found"


class ApiKeyNotFound(NotFound):
    code = "api_key_not_found"


class ExecutionNotFound(NotFound):
    code = "execution_not_found"


class Conflict(FleetvmError):
    status_code = 409
    code = "conflict"


class VmNotRunning(Conflict):
    code = "vm_not_running"


class AlreadyExists(Conflict):
    code = "already_exists"


class PayloadTooLarge(FleetvmError):
    status_code = 413
    code = "payload_too_large"


class TooManyRequests(FleetvmError):
    status_code = 429
    code = "too_many_requests"


class Unavailable(FleetvmError):
    status_code = 503
    code = "unavailable"


class NoWorkerAvailable(Unavailable):
    code = "no_worker_available"


class WorkerDown(Unavailable):
    code = "worker_down"


class WorkerTimeout(Unavailable):
    code = "worker_timeout"


class WorkerBusy(Unavailable):
    code = "worker_busy"


class SpawnFailed(Unavailable):
    code = "spawn_failed"


class DriverError(Unavailable):
    code = "driver_error"


ERRORS_BY_CODE: dict[str, type[FleetvmError]] = {
    cls.code: cls
    for cls in (
        FleetvmError,
        InvalidRequest,
        InvalidSessionId,
        NotAuthenticated,
        PermissionDenied,
        NotFound,
        SessionNotFound,
        NoVmAssigned,
        VmFileNotFound,
        ApiKeyNotFound,
        Conflict,
        VmNotRunning,
        AlreadyExists,
        PayloadTooLarge,
        TooManyRequests,
        Unavailable,
        NoWorkerAvailable,
        WorkerTimeout,
        WorkerBusy,
        SpawnFailed,
        DriverError,
        InvalidExecutionId,
        ExecutionNotFound,
    )
}


def error_from_code(code: str, message: str) -> FleetvmError:
    """Rebuild the exception a worker reported as ``{"error": code, ...}``."""
    return ERRORS_BY_CODE.get(code, FleetvmError)(message)
