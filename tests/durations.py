"""Write tests/durations.json (seconds per test file) from a JUnit XML report of a full run:

    python -m pytest -q -n auto --maxprocesses 4 --dist loadfile --junitxml=/tmp/junit.xml
    python tests/durations.py /tmp/junit.xml

conftest.py orders the files by it, longest first (for ``--dist loadfile``; it turns xdist's own reordering off
while the record exists). A test's time in the report is its
setup + call + teardown, so a module fixture's cost counts for the file that builds it."""

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def file_seconds(junit_xml: str) -> dict[str, float]:
    """``{"tests/test_x.py": seconds}`` summed over the report's test cases (classname ``tests.test_x[.Class]``)."""
    out: dict[str, float] = defaultdict(float)
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")
        mod = max((i for i, p in enumerate(parts) if p.startswith("test_")), default=None)
        if mod is not None:  # tests.test_x or tests.test_x.TestClass: the last test_ part is the module
            out["/".join(parts[: mod + 1]) + ".py"] += float(case.get("time", 0.0))
    return dict(out)


if __name__ == "__main__":
    secs = file_seconds(sys.argv[1])
    path = Path(__file__).with_name("durations.json")
    path.write_text(json.dumps({k: round(v, 1) for k, v in sorted(secs.items(), key=lambda kv: -kv[1])}, indent=1)
                    + "\n")
    print(f"wrote {path}: {len(secs)} files, {sum(secs.values()):.0f} s in all")
