"""The ``fleetvm`` command: run the service and manage accounts."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

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
    if getattr(args, "worker_id", None):
        overrides["multinode"] = {"worker_id": args.worker_id}
    if not overrides:
        return Settings()
    # Merge with the environment, so --worker-id replaces only that key.
    base = Settings().model_dump()
    base["multinode"].update(overrides["multinode"])
    return Settings(**base)


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
        else:
            run_account_command(args, settings)
    except FleetvmError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
