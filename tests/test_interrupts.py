"""SIGINT and SIGTERM become Interrupted in the main thread, wherever it is;
inside deferred() they wait for the block's end; a second one exits at once."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from splitft.interrupts import Interrupted, deferred, interruptible


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_is_interrupted_with_the_shells_exit_code(sig):
    with pytest.raises(Interrupted) as caught, interruptible():
        os.kill(os.getpid(), sig)
        for _ in range(10**7):  # the handler runs between bytecodes
            pass
    assert caught.value.signum == sig
    assert caught.value.exit_code == 128 + sig  # 130, 143
    assert not isinstance(caught.value, Exception)  # no step handler catches it


def test_a_signal_inside_deferred_waits_for_the_block_to_end():
    done = []
    with pytest.raises(Interrupted), interruptible():
        with deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**6):
                pass
            done.append("the checkpoint is written")
        done.append("never")
    assert done == ["the checkpoint is written"]


def test_the_handlers_are_restored_after_the_block():
    before = signal.getsignal(signal.SIGTERM)
    with interruptible():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_signal_exits_at_once_even_in_clean_up():
    code = textwrap.dedent(
        """
        import os, signal, time
        from splitft.interrupts import interruptible
        with interruptible():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            finally:  # a clean-up that would take long
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(60)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 130
    assert "splitft: second interrupt (SIGINT); exiting now" in done.stderr
