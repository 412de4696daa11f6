"""Generate from a trained checkpoint (the main job's second half).  Not built yet."""

import sys

if __name__ == "__main__":
    sys.exit("generate.py is not implemented yet: it arrives with the 'main job' issue, together with train.py.")
