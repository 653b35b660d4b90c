"""One sdcli command in this process, for its peak memory: `cli_job.py txt2img PROMPT -m FILE ...`.

The arguments are those of the `sdcli` console script, run in-process as it would run them, so this
process's peak RSS (VmHWM, see job.py) is the command's own. The last line printed is one JSON object:
the command's exit code, seconds from this script's start, peak RSS in GB and, where CUDA was used, the
peak GPU memory torch allocated. Whole-process wall time (interpreter start included) is the parent's to
measure (bench/timing.py run_child).
"""

from __future__ import annotations

import json
import sys
import time

from job import peak_rss_bytes


def main() -> int:
    start = time.perf_counter()
    from sdcli.cli import app

    try:
        app(args=sys.argv[1:], prog_name="sdcli")
        code = 0
    except SystemExit as e:  # typer ends by raising it, success included
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    report = {"exit_code": code, "seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss_bytes() / 1e9}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        report["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps(report), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
