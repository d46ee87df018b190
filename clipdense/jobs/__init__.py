"""Run stages as Ray jobs: `clipdense submit` (jobs on any Ray cluster) and `clipdense cluster` (a local
autoscaling cluster). Entry points for the CLI: `submit.main_submit(argv)` and `cluster.main_cluster(argv)`."""

# Stages a job can run (`python -m clipdense.jobs.entry STAGE ...`); `probe` is a cluster smoke test, not a pipeline
# stage.
JOB_STAGES = ("recaption", "pretrain", "finetune", "eval", "sweep", "demo", "probe")
