"""`rafale -c ...` that sends SIGTERM to rank 0 at the end of batch $RAFALE_TEST_SIGNAL_AT, as a scheduler or
Ctrl-C would: test_multinode launches it with Composer's launcher (the other ranks learn of the signal from rank 0
only). In-process tests add SignalAt(batch) to the run's callbacks themselves."""

import os
import signal
import sys


def SignalAt(batch: int):
    """A callback that sends this process SIGTERM at the end of batch `batch`."""
    from composer.core import Callback

    class Send(Callback):
        def batch_end(self, state, logger):
            if int(state.timestamp.batch) == batch:
                os.kill(os.getpid(), signal.SIGTERM)

    return Send()


if __name__ == "__main__":
    import rafale.run.train as train_module
    from rafale.main import main

    extra = [SignalAt(int(os.environ["RAFALE_TEST_SIGNAL_AT"]))] if os.environ.get("RANK", "0") == "0" else []
    callbacks = train_module.make_callbacks
    train_module.make_callbacks = lambda *args: callbacks(*args) + extra
    main(sys.argv[1:])
