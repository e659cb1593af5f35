"""Check from Python that this machine can train with unsloth-mgpu; exits 0 when ready, 1 when a check fails.

    python examples/verify_installation.py            # table
    python examples/verify_installation.py --probe    # also time an all-reduce across the GPUs

The same report as `mgpu doctor`, for scripts and notebooks that prefer the Python API.
"""

from __future__ import annotations

import sys

from unsloth_mgpu_cli.doctor import print_report, run_checks


def main() -> int:
    report = run_checks(probe="--probe" in sys.argv[1:])
    print_report(report)
    for check in report.checks:
        if check.status == "fail":
            print(f"FAIL {check.name}: {check.value}\n     fix: {check.hint}")
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
