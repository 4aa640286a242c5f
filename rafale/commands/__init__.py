"""One module per `rafale COMMAND`; rafale/main.py calls these only.

export, generate, law, lm_eval (lm-eval), predict, runs (runs and plot), score, sweep and zero_shot (zero-shot), and
the maintainer's docprompt. A command reads a run through rafale.run_folder (its files, its model, its tokenizer),
never the run's insides (rafale.run.train, record, loggers, outcomes, resilience); test/test_imports.py checks it.
"""
