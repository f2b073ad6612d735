"""The study's report from its saved outputs: OUT_DIR/report/index.html and REPORT.md. See --help and README."""
from spatial_attention.study.report import main

if __name__ == "__main__":
    main()
