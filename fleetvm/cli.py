"""The ``fleetvm`` command: run the service and manage accounts."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime

from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

from fleetvm.errors import FleetvmError
from fleetvm.image.command import add_image_parser, run_image_command
from fleetvm.logs import configure_logging
from fleetvm.settings import Settings

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetvm",
        description="Short-lived sandbox VMs for user sessions. Settings come from "
        "FLEETVM_<SECTION>__<KEY> variables and the TOML file named by "
        "FLEETVM_CONFIG.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve", help="run the API and one worker on this machine (embedded mode)"
    )
    commands.add_parser("api", help="run only the API (cluster mode)")
    worker = commands.add_parser("worker", help="run the worker of this node")
    worker.add_argument(
        "--worker-id", help="id of this node (letters, digits, '-', '_')"
    )

    workers = commands.add_parser(
        "workers", help="list workers with state, heartbeat age and VM counts"
    )
    workers.add_argument("--json", action="store_true", help="print JSON")
    worker_actions = workers.add_subparsers(dest="action")
    retire = worker_actions.add_parser(
        "retire",
        help="mark the live VMs of a dead worker's host lost, so their "
        "sessions start new VMs elsewhere",
    )
    retire.add_argument("retired_id", metavar="WORKER_ID")

    users = commands.add_parser("users", help="manage users").add_subparsers(
        dest="action", required=True
    )
    create_user = users.add_parser("create", help="create a user")
    create_user.add_argument("name")
    create_user.add_argument("--password", required=True)
    create_user.add_argument("--admin", action="store_true", help="make an admin")

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True
    )
    create_key = keys.add_parser(
        "create", help="create an API key for user NAME and print it once"
    )
    create_key.add_argument("name", help="the user who owns the key")
    create_key.add_argument("--label", default="cli", help="a name for the key")
    add_image_parser(commands)
    return parser


def load_settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    # An empty --worker-id is validated, and rejected, like any other value.
    if getattr(args, "worker_id", None) is not None:
        overrides["multinode"] = {"worker_id": args.worker_id}
    if not overrides:
        settings = Settings()
        if args.command == "worker" and not _worker_id_given(settings):
            raise SystemExit(
                "error: `fleetvm worker` needs the id of this node: pass "
                "--worker-id ID or set FLEETVM_MULTINODE__WORKER_ID, unique in "
                "the cluster."
            )
        return settings
    # Merge with the environment, so --worker-id replaces only that key.
    base = Settings().model_dump()
    base["multinode"].update(overrides["multinode"])
    return Settings(**base)


def _worker_id_given(settings: Settings) -> bool:
    # Two workers left on the default id would share one queue and one row.
    return "worker_id" in settings.multinode.model_fields_set


def run_account_command(args: argparse.Namespace, settings: Settings) -> None:
    from sqlalchemy import select

    from fleetvm.db.engine import Database
    from fleetvm.db.models import User
    from fleetvm.security import create_api_key, create_user

    database = Database(settings)
    database.create_all()
    with database.session() as db:
        if args.command == "users":
            user = create_user(db, args.name, args.password, is_admin=args.admin)
            role = "administrator" if user.is_admin else "user"
            print(f"created {role} {user.username!r} (id {user.id})")
            return
        user = db.scalar(select(User).where(User.username == args.name))
        if user is None:
            raise SystemExit(f"error: no user named {args.name!r}")
        _, key = create_api_key(db, user, args.label)
        print(key)


WORKER_COLUMNS = (
    ("worker_id", "WORKER"),
    ("state", "STATE"),
    ("heartbeat_age_seconds", "HEARTBEAT AGE (s)"),
    ("active_vms", "ACTIVE"),
    ("spawning_vms", "SPAWNING"),
    ("killing_vms", "KILLING"),
    ("capacity", "CAPACITY"),
    ("host", "HOST"),
)


def _json_value(value: object) -> str:
    # Timestamps in the ISO 8601 form the API uses.
    return value.isoformat() if isinstance(value, datetime) else str(value)


def print_workers(args: argparse.Namespace, settings: Settings) -> None:
    import json

    from fleetvm.db.engine import Database
    from fleetvm.services.fleet import list_workers, retire_worker

    database = Database(settings)
    database.create_all()
    if args.action == "retire":
        with database.session() as db:
            lost = retire_worker(db, settings, args.retired_id)
        print(f"retired worker {args.retired_id!r}; {lost} VMs marked lost")
        return
    with database.session() as db:
        workers = list_workers(db, settings)
    if args.json:
        print(json.dumps(workers, default=_json_value, indent=2))
        return
    if not workers:
        print("no workers registered")
        return
    rows = [[str(w[key]) for key, _ in WORKER_COLUMNS] for w in workers]
    headers = [title for _, title in WORKER_COLUMNS]
    widths = [
        max(len(c) for c in column) for column in zip(headers, *rows, strict=True)
    ]
    for row in [headers, *rows]:
        print(
            "  ".join(
                cell.ljust(width) for cell, width in zip(row, widths, strict=True)
            )
        )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        settings = load_settings(args)
    except ValidationError as exc:
        raise SystemExit(f"error: invalid settings:\n{exc}") from None

    try:
        if args.command == "image":
            run_image_command(args, settings)
        elif args.command == "serve":
            from fleetvm.embedded import serve

            serve(settings)
        elif args.command == "api":
            import uvicorn

            from fleetvm.api.app import create_app

            uvicorn.run(
                create_app(settings),
                host=settings.api.host,
                port=settings.api.port,
                log_config=None,
            )
        elif args.command == "worker":
            from fleetvm.worker.main import run_worker

            run_worker(settings)
        elif args.command == "workers":
            print_workers(args, settings)
        else:
            run_account_command(args, settings)
    except FleetvmError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    except (NoSuchModuleError, ArgumentError) as exc:
        raise SystemExit(
            f"error: invalid database.url {_redacted(settings.database_url)!r} "
            f"({exc}); for PostgreSQL use postgresql+psycopg://USER@HOST/DB."
        ) from None
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise SystemExit(
            f"error: cannot use the database at "
            f"{_redacted(settings.database_url)}: {reason}. Check database.url "
            "and that the server is running and the database exists."
        ) from None


def _redacted(url: str) -> str:
    """Return a database URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@")[-1]


if __name__ == "__main__":
    main()
