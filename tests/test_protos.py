"""The committed stubs in exegpt/v1 are exactly what scripts/gen_protos.py generates."""

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    script = runpy.run_path(str(ROOT / "scripts" / "gen_protos.py"), run_name="gen_protos")
    generate = script["generate"]
    generated = generate(tmp_path)
    assert generated, "no stubs generated"
    committed_dir = ROOT / "exegpt" / "v1"
    for path in generated:
        committed = committed_dir / path.name
        assert committed.exists(), f"{path.name} is not committed; run scripts/gen_protos.py"
        assert committed.read_text() == path.read_text(), (
            f"exegpt/v1/{path.name} is stale; run scripts/gen_protos.py"
        )
    stale = {p.name for p in committed_dir.glob("*_pb2*.py*")} - {p.name for p in generated}
    assert not stale, f"stubs without a .proto: {sorted(stale)}"
