"""Work inside a session's VM: execute code, upload and download files."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from fleetvm.api.deps import CurrentUser, State, Vms
from fleetvm.api.schemas import (
    ExecuteRequest,
    ExecuteResult,
    FileDownloaded,
    FileUploaded,
)
from fleetvm.errors import InvalidRequest, PayloadTooLarge
from fleetvm.services.sessions import parse_session_id

router = APIRouter(tags=["vms"])

MAX_PATH_CHARS = 4096
MAX_PATH_DEPTH = 64


def _check_remote_path(path: str) -> str:
    if not path or len(path) > MAX_PATH_CHARS or "\x00" in path:
        raise InvalidRequest(
            f"Invalid remote path {path[:80]!r}: it must be 1 to {MAX_PATH_CHARS} "
            "characters with no NUL byte."
        )
    if path.count("/") > MAX_PATH_DEPTH:
        raise InvalidRequest(
            f"Invalid remote path {path[:80]!r}...: more than {MAX_PATH_DEPTH} "
            "directory levels."
        )
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            f"Invalid remote path {path[:80]!r}: not valid Unicode."
        ) from None
    return path


@router.post("/execute", response_model=ExecuteResult)
def execute(body: ExecuteRequest, user: CurrentUser, vms: Vms) -> ExecuteResult:
    """Run Python or bash in the session's VM, starting the VM on first use."""
    answer = vms.execute(
        user, body.session_id, body.language, body.source, body.timeout
    )
    return ExecuteResult(
        stdout=answer["stdout"],
        stderr=answer["stderr"],
        exit_code=answer["exit_code"],
        execution_time=answer["execution_time"],
        # A worker that predates cpu_time sends none.
        cpu_time=answer.get("cpu_time"),
        timed_out=answer["timed_out"],
        success=answer["exit_code"] == 0 and not answer["timed_out"],
        session_id=answer["session_id"],
        vm_id=answer["vm_id"],
    )


@router.post("/upload", response_model=FileUploaded)
def upload_file(
    file: Annotated[UploadFile, File(description="The file to write.")],
    remote_path: Annotated[str, Form(description="Path in the VM.")],
    session_id: Annotated[str, Form()],
    user: CurrentUser,
    vms: Vms,
    state: State,
) -> FileUploaded:
    """Write a file into the session's VM."""
    session_id = parse_session_id(session_id)
    _check_remote_path(remote_path)
    limit = state.settings.api.max_upload_bytes
    content = file.file.read(limit + 1)
    if len(content) > limit:
        raise PayloadTooLarge(
            f"File {file.filename!r} is larger than the {limit}-byte upload limit "
            "(api.max_upload_bytes)."
        )
    encoded = base64.b64encode(content).decode()
    answer = vms.upload(user, session_id, remote_path, encoded)
    return FileUploaded(path=answer["path"], size=answer["size"], session_id=session_id)


@router.post("/download", response_model=FileDownloaded)
def download_file(
    filename: Annotated[str, Form(description="Path of the file in the VM.")],
    session_id: Annotated[str, Form()],
    user: CurrentUser,
    vms: Vms,
) -> FileDownloaded:
    """Read a file from the session's VM, returned base64-encoded."""
    session_id = parse_session_id(session_id)
    _check_remote_path(filename)
    answer = vms.download(user, session_id, filename)
    return FileDownloaded(
        filename=filename,
        content=answer["content"],
        size=answer["size"],
        session_id=session_id,
    )
