"""Check the VM ids, environments, paths and code that callers pass in."""

from __future__ import annotations

import math
import re

from fleetvm.errors import InvalidRequest, PayloadTooLarge
from fleetvm.guest import agent as guest_agent

VM_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_PATH_BYTES = guest_agent.MAX_PATH_BYTES
# Largest code of one execute, in UTF-8 bytes. The request travels through the
# broker, and the agent keeps it in the VM's memory.
MAX_CODE_BYTES = 16 * 1024 * 1024
# Linux rejects an argument or environment entry longer than 128 KiB
# (MAX_ARG_STRLEN), and all of them together must fit in a quarter of the stack
# limit, 2 MiB by default. The VM's variables get a share of that.
MAX_ENV_ENTRY_BYTES = 128 * 1024 - 1
MAX_ENV_BYTES = 256 * 1024


def _check_vm_id(vm_id: object) -> str:
    if not isinstance(vm_id, str) or not VM_ID_PATTERN.fullmatch(vm_id):
        printable = repr(vm_id)
        if len(printable) > 80:
            printable = printable[:77] + "..."
        raise InvalidRequest(
            f"invalid vm_id {printable}: use 1 to 64 letters, digits, '-' or '_'"
        )
    return vm_id


def _check_env(env: dict[str, str]) -> None:
    total = 0
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME_PATTERN.fullmatch(name):
            raise InvalidRequest(
                f"invalid environment variable name {name!r}: use letters, digits "
                "and '_', not starting with a digit"
            )
        if not isinstance(value, str) or "\0" in value or not _is_unicode(value):
            raise InvalidRequest(
                f"invalid value of environment variable {name}: it must be a string "
                "of valid Unicode without NUL characters"
            )
        size = len(name) + 1 + len(value.encode("utf-8"))
        if size > MAX_ENV_ENTRY_BYTES:
            raise InvalidRequest(
                f"environment variable {name} is {size} bytes long with its name, "
                f"more than the maximum of {MAX_ENV_ENTRY_BYTES} bytes"
            )
        total += size
    if total > MAX_ENV_BYTES:
        raise InvalidRequest(
            f"the environment variables take {total} bytes, more than the maximum "
            f"of {MAX_ENV_BYTES} bytes"
        )


def _check_remote_path(path: object) -> None:
    if not isinstance(path, str) or not path:
        raise InvalidRequest("path must be a non-empty string")
    if "\0" in path:
        raise InvalidRequest("path must not contain a NUL character")
    if not _is_unicode(path):
        raise InvalidRequest("path is not valid Unicode: it contains a lone surrogate")
    size = len(path.encode("utf-8"))
    if size > MAX_PATH_BYTES:
        raise InvalidRequest(
            f"path is {size} bytes long, more than the maximum of {MAX_PATH_BYTES} "
            "bytes"
        )


def _check_code(code: object) -> None:
    if not isinstance(code, str):
        raise InvalidRequest("code must be a string")
    try:
        size = len(code.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"code is not valid Unicode: it contains a lone surrogate at "
            f"character {exc.start}"
        ) from None
    if size > MAX_CODE_BYTES:
        raise PayloadTooLarge(
            f"code of {size} bytes exceeds the maximum of {MAX_CODE_BYTES} bytes"
        )


def _is_unicode(text: str) -> bool:
    """Return whether text encodes as UTF-8, which a lone surrogate does not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_positive_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value > 0
