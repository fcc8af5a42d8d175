"""Subcommand modules: each defines ``register(app: typer.Typer) -> None``; cli.py
registers every module found here, so areas add commands without editing cli.py."""
