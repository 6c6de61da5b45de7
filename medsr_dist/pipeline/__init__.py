"""Stage runners that compose the layers below: the CLI's and ``jobs/*.py``'s prepare / train / enhance stages
(:mod:`.stages`), the demo (:mod:`.demo`) and the self-supervised MRI job (:mod:`.mri_self_sr`)."""
from medsr_dist.pipeline.demo import HOLDOUT_GT, run_demo, write_demo_data, write_demo_report
from medsr_dist.pipeline.mri_self_sr import self_sr
from medsr_dist.pipeline.stages import ray_output_to_file, run_enhance, run_prepare, run_train

__all__ = ["HOLDOUT_GT", "ray_output_to_file", "run_demo", "run_enhance", "run_prepare", "run_train", "self_sr",
           "write_demo_data", "write_demo_report"]
