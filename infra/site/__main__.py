"""``python -m aifactory.infra.site up|status|env|down [--dir D]``: the site without the CLI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aifactory.infra.site import manager
from aifactory.tasks.core.errors import AifError
from aifactory.tasks.core.home import site_dir as default_site_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aifactory.infra.site", description=__doc__)
    ap.add_argument("action", choices=("up", "status", "env", "down"))
    ap.add_argument("--dir", default=None, help="site directory (default: $AIF_SITE_DIR, else "
                    "<home>/site, the home being $AIF_HOME or ~/.aif)")  # fmt: skip
    args = ap.parse_args(argv)
    site_dir = Path(args.dir).resolve() if args.dir else default_site_dir()
    try:
        if args.action == "env":
            print("\n".join(manager.env_lines(site_dir)))
            return 0
        if args.action == "down":
            stopped = manager.down(site_dir)
            print(f"stopped: {', '.join(stopped) or 'nothing'}")
            return 0
        parts = manager.up(site_dir) if args.action == "up" else manager.status(site_dir)
    except AifError as exc:
        print(f"aif: error: {exc}", file=sys.stderr)
        return exc.exit_code
    for p in parts:
        pid = str(p.pid) if p.pid else "-"
        print(
            f"{p.name:<10} {'ok' if p.healthy else 'DOWN':<5} {pid:>7}  {p.address:<40} {p.detail}"
        )
    return 0 if all(p.healthy for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
