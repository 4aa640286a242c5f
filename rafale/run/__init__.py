"""The training run: `rafale -c cfg.yaml` from a checked config to a finished run folder.

train.py is the run in named steps (data, model, run folder, Trainer, fit, export); the rest is its machinery: the
record (record.py, loggers.py), what ends or saves it (outcomes.py, resilience.py), the optimizers (optim.py), the
machine's peak and load (hardware.py) and cooldown branches (branch.py). It writes through rafale.run_folder; the
commands read a run back through rafale.run_folder too and never import this package's insides.
"""
