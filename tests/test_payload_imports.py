"""The payload's import path stays lean: a smallcnn job never pays for torchvision.

torchvision adds seconds of start-up and about 190 MB of resident memory to every job on a pool
(where each job is a fresh interpreter); only a torchvision architecture needs it.
"""

import json
import subprocess
import sys
from pathlib import Path

from aggregation.job_commands import COMMANDS
from pipeline.payload_zip import build_payload

PROBE = """
import json, sys
for name in sys.argv[1:]:
    __import__(name)
from node_payload.common.models import build_model
build_model("smallcnn", 4, 3, seed=0)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_every_job_command_and_a_smallcnn_import_no_torchvision(tmp_path: Path) -> None:
    payload = tmp_path / "dagtrain.pyz"
    payload.write_bytes(build_payload())
    probe = f"import sys; sys.path.insert(0, {str(payload)!r})\n{PROBE}"
    done = subprocess.run(
        [sys.executable, "-c", probe, *sorted(set(COMMANDS.values()))],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    loaded = set(json.loads(done.stdout))
    assert "torch" in loaded and "node_payload" in loaded
    assert not loaded & {"torchvision", "pipeline"}, sorted(loaded)
