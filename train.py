"""Train a model (the main job's first half).  Not built yet: see issue "The main job"."""

import sys

if __name__ == "__main__":
    sys.exit("train.py is not implemented yet: training arrives with the 'main job' issue. "
             "The library (transformer/, kv_cache/) and its tests are usable now.")
