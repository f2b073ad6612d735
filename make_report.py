"""The study's report from its saved outputs: OUT_DIR/report/index.html and REPORT.md. See --help and README."""
from spatial_attention.common.console import run_script

if __name__ == "__main__":
    run_script("spatial_attention.study.report")
