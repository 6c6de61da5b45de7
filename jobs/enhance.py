"""`ray job submit` entrypoint for `medsr enhance`: the same code as the CLI.

    ray job submit --address http://<head>:8265 --working-dir . -- python jobs/enhance.py --config configs/<name>.yaml [--log-keys] [key=value ...]

Inside a job RAY_ADDRESS is set, so the stage joins the cluster instead of starting a local Ray. The job's log names
items by item id; ``--log-keys`` (``enhance.log_keys``) names input keys, which often embed accession numbers. Exit
status 3: another run holds the output prefix's lease (nothing was touched).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir holds medsr_dist/

from medsr_dist.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["enhance", *sys.argv[1:]])
