"""Launchers for multi-host runs (shell scripts beside this file): ``tpu_pod.sh`` (every worker of a Cloud TPU
slice), ``slurm.sbatch`` (one task per node), ``cpu_processes.sh`` (N local CPU processes). Each starts
``python -m jaxind.main --flagfile=...`` on every process; see README.md "Pods"."""
