"""`ray job submit` entrypoint for `medsr prepare`: the same code as the CLI.

    ray job submit --address http://<head>:8265 --working-dir . -- python jobs/prepare.py --config configs/<name>.yaml [key=value ...]

Inside a job RAY_ADDRESS is set, so the stage joins the cluster instead of starting a local Ray.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir holds medsr_dist/

from medsr_dist.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["prepare", *sys.argv[1:]])
