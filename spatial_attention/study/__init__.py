"""The whole study in one command (``study``, behind ``run_study.sh``) and its report (``report`` and its
``report_*`` parts), which share the folder's names (``folder``)."""
