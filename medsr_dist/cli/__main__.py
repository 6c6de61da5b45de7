"""``python -m medsr_dist.cli``: the same as the ``medsr`` command."""
from medsr_dist.cli import app

if __name__ == "__main__":
    app()
