"""Run by tests/runs/test_step_syncs.py in one process: bench.step.count_syncs (what
`scripts/bench_step.py --syncs` runs) for each case, one after another, so the imports and the
start-up are paid once rather than once per case.

    python tests/runs/syncs_cases.py CASES.json OUT.json      # CASES: {name: [launch.py arguments]}
"""

import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.step import count_syncs  # noqa: E402


def main() -> None:
    cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    results = {}
    for name, args in cases.items():
        try:
            results[name] = count_syncs(args)
        except Exception:  # noqa: BLE001  (one case's failure is that case's test failure)
            results[name] = {"error": traceback.format_exc()[-4000:]}
        out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
