"""Train a toy VLM of one family's real architecture as a positive control, or evaluate the committed one. See --help."""
from spatial_attention.experiments.toy import main

if __name__ == "__main__":
    main()
