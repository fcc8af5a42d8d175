def main() -> None:  # replaced by the real CLI\n    raise SystemExit(0)
