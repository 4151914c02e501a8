"""Compare-and-set changes of VM state, so concurrent actors cannot both act."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from fleetvm.db.models import KillReason, KillRecord, Vm, VmStatus


def transition(
    db: Session,
    vm_id: str,
    expected: Iterable[VmStatus],
    new: VmStatus,
    **values: Any,
) -> bool:
    """Move a VM to ``new`` if its status is one of ``expected``.

    Runs ``UPDATE vms SET status = :new WHERE id = :id AND status IN :expected``
    and returns whether this call changed the row. Exactly one of several
    concurrent callers with the same expectation wins.
    """
    statement = (
        update(Vm)
        .where(Vm.id == vm_id, Vm.status.in_([str(s) for s in expected]))
        .values(status=str(new), **values)
        .execution_options(synchronize_session=False)
    )
    return db.execute(statement).rowcount == 1


def record_kill_intent(
    db: Session,
    vm_id: str,
    expected: Iterable[VmStatus],
    reason: KillReason,
    requested_by: int | None = None,
) -> int | None:
    """Move a VM from ``expected`` to killing and record who asked and why.

    Returns the new kill record's id, or None if the VM was not in an expected
    status (another actor got there first), in which case nothing is written.
    """
    if not transition(db, vm_id, expected, VmStatus.KILLING, kill_reason=reason):
        return None
    vm = db.get(Vm, vm_id)
    record = KillRecord(
        vm_id=vm_id,
        session_id=vm.session_id if vm else "",
        reason=reason,
        requested_by=requested_by,
    )
    db.add(record)
    db.flush()
    return record.id
