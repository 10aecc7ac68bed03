"""Test-only launcher of `dpc audit` with a deliberately broken mechanism: the DP engine adds a tenth
of its noise while the ledger and the accountant keep the calibrated sigma. The audit must flag it."""

import sys

import dist_dpc.engine.dp_engine as dp_engine

_real_noise = dp_engine.add_gaussian_noise_


def _a_tenth_of_the_noise(grads, std, *args, **kwargs):
    return _real_noise(grads, std / 10, *args, **kwargs)


dp_engine.add_gaussian_noise_ = _a_tenth_of_the_noise

if __name__ == "__main__":
    from dist_dpc.cli import main

    sys.exit(main(sys.argv[1:]))
