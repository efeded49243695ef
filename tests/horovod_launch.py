"""`horovodrun` for the tests, without its per-launch build probe.

    python tests/horovod_launch.py -np 2 -H localhost:2 --gloo python ...

Exactly horovodrun's command line and launcher, except that it does not ask
whether Horovod was built with Gloo: horovodrun answers that on every launch
by importing horovod.tensorflow (TensorFlow) in a forked process, about 9 s of
CPU and more of waiting per launch, a test run's dozen launches adding minutes.
`make horovod` builds with Gloo, `tests/test_run_scripts.py` launches the real
horovodrun, and a missing Gloo still fails here, at the ranks' `hvd.init()`.
Kept out of pytest's collection (no `test_` prefix): it is a program.
"""

from __future__ import annotations

import sys

from horovod.runner import launch

if __name__ == "__main__":
    launch.gloo_built = lambda verbose=False: True
    sys.exit(launch.run_commandline())
