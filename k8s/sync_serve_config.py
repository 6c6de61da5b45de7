"""Copy configs/serve_app.yaml into k8s/base/rayservice.yaml's spec.serveConfigV2 (verbatim, as a literal block).

    python k8s/sync_serve_config.py          # rewrite the block
    python k8s/sync_serve_config.py --check  # exit 1 if the block differs from configs/serve_app.yaml

configs/serve_app.yaml is the one source of truth of the Serve config (`serve deploy` and the RayService);
tests/test_k8s.py fails when the two differ.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVE_APP = ROOT / "configs" / "serve_app.yaml"
RAYSERVICE = ROOT / "k8s" / "base" / "rayservice.yaml"
KEY = "  serveConfigV2: |"
INDENT = "    "


def synced(rayservice: str, serve_app: str) -> str:
    """``rayservice`` (the manifest's text) with the block under ``serveConfigV2: |`` replaced by ``serve_app``.

    Raises ValueError when the manifest has no ``serveConfigV2: |`` line at two spaces' indent.
    """
    lines = rayservice.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip("\n") == KEY) + 1
    except StopIteration:
        raise ValueError(f"{RAYSERVICE.name}: no line {KEY.strip()!r} at two spaces' indent") from None
    end = start
    while end < len(lines) and (lines[end].startswith(INDENT) or not lines[end].strip()):
        end += 1
    while end > start and not lines[end - 1].strip():  # blank lines before the next key stay outside the block
        end -= 1
    block = "".join(INDENT + line if line.strip() else "\n" for line in serve_app.splitlines(keepends=True))
    if not block.endswith("\n"):
        block += "\n"
    return "".join(lines[:start]) + block + "".join(lines[end:])


def main(argv: list[str]) -> int:
    current = RAYSERVICE.read_text(encoding="utf-8")
    wanted = synced(current, SERVE_APP.read_text(encoding="utf-8"))
    if "--check" in argv:
        if wanted != current:
            print(f"{RAYSERVICE.relative_to(ROOT)}: serveConfigV2 differs from {SERVE_APP.relative_to(ROOT)}; "
                  f"run python k8s/sync_serve_config.py", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        RAYSERVICE.write_text(wanted, encoding="utf-8")
        print(f"updated {RAYSERVICE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
