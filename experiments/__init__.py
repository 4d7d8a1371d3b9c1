"""The experiment runner: workloads, the run matrix, results (JSON/CSV), tables and plots."""
