"""How long the ``glcic`` CLI takes to answer ``--help`` (issue #10's target: under 1 s on 2 CPUs).

Side by side in one run, each the median of ``--repeats`` fresh processes: the bare interpreter,
``glcic --help``, ``glcic list --help``, ``glcic submit-inpaint --help`` and, for scale, an interpreter
that imports torch (what the CLI used to pay before its config modules stopped importing it).

    python bench/cli_startup.py [--repeats 7]
"""

from __future__ import annotations

import subprocess
import sys
import time

import common

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "glcic --help": [sys.executable, "-m", "jobs.cli", "--help"],
    "glcic list --help": [sys.executable, "-m", "jobs.cli", "list", "--help"],
    "glcic submit-inpaint --help": [sys.executable, "-m", "jobs.cli", "submit-inpaint", "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def wall_s(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=common.REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="fresh processes per command")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    info = common.machine_info()
    for command in COMMANDS.values():  # warm the page cache: the first start reads every file
        wall_s(command)
    times = {name: [wall_s(command) for _ in range(args.repeats)] for name, command in COMMANDS.items()}
    base = common.median(times["python -c pass"])
    rows, figures = [], {}
    for name, samples in times.items():
        median = common.median(samples)
        figures[name] = {"median_s": median, "samples_s": samples}
        rows.append((name, median, median - base, "yes" if median < 1.0 else "no"))
    common.print_table(
        f"CLI start-up, median of {args.repeats} (load {common.load_average()[0]:.2f})",
        ("command", "wall s", "over bare python s", "under 1 s"),
        rows,
    )
    return common.write_figures("cli_startup", info, args, argv, {"commands": figures})


if __name__ == "__main__":
    main()
