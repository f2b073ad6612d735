"""The study folder's layout: the names ``run_study.sh`` writes and the report reads (``study.py`` runs the
study, ``report.py`` reads it; both take the names from here)."""

STUDY_FILE = "study.json"  # the settings, the steps and how the last run ended
STEPS_DIR = "steps"  # steps/{step}.json: each step's commands, status, exit code, seconds, the end of its log
LOGS_DIR = "logs"  # logs/{step}.log: each step's output, every try appended
PLAN_FILE = "plan.json"  # the cost plan (cost.py), written before any step
REPORT_DIR = "report"  # report/index.html and report/REPORT.md
EXPERIMENTS = ("exp1", "exp2", "exp4", "corners")  # {model}/{experiment}/: each experiment's results
