"""Attacks on a node's home from the same machine: other local users reading it, two
processes writing its store at once, and crash leftovers nobody removes."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from crypto.identity import Identity
from node.app.runtime import NodeRuntime
from node.core.audit import AuditKind, open_audit
from node.core.config import NodeHome
from node.core.keystore import load_identity
from node.core.private import loose_modes
from node.dicom.store import open_store
from tests.dcmtk import generated_ct
from tests.node.test_runtime import FAST, make_home

ROOT = Path(__file__).resolve().parents[2]
WAIT = 20.0


def _radmesh(home: Path, *args: str, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    """The CLI as a user with a usual umask (022) runs it."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "--home", str(home), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=lambda: os.umask(umask),
    )


def _series(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    paths = []
    for index, data in enumerate(generated_ct(count)):
        path = folder / f"ct{index}.dcm"
        path.write_bytes(data)
        paths.append(path)
    return paths


# -- two writers ---------------------------------------------------------------------------

# Two `radmesh import` processes of one folder. The seams make the losing interleaving
# certain instead of lucky: A renames its blob into place and waits (a slow disk) before
# its index commit; B renames its own blob over A's and commits meanwhile. Serialised
# writers cannot interleave so: B waits for A's lock and finds a duplicate.
_IMPORTER = """
import os, sys, time
from pathlib import Path
from node.dicom.store import Store
from node.cli import main

role, marks, home, folder = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]

def wait_for(name, within):
    deadline = time.monotonic() + within
    while not (marks / name).exists() and time.monotonic() < deadline:
        time.sleep(0.01)

def once(name):
    try:
        (marks / name).touch(exist_ok=False)
    except FileExistsError:
        return False
    return True

if role == "A":
    def before_commit(self):
        if once("a-renamed"):
            wait_for("b-committed", 4.0)
    Store._before_index_commit = before_commit
else:
    def after_chunk(self, index):
        wait_for("a-renamed", 30.0)
    commit = Store._commit
    def committed(self, *args, **kwargs):
        try:
            return commit(self, *args, **kwargs)
        finally:
            once("b-committed")
    Store._after_chunk_written = after_chunk
    Store._commit = committed
sys.exit(main(["--home", home, "import", folder]))
"""


def test_two_imports_of_one_folder_at_once_leave_every_instance_readable(
    tmp_path: Path,
) -> None:
    home, identity = make_home(tmp_path, "hospital", "", [])
    files = _series(tmp_path / "series", 3)
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "RADMESH_PASSPHRASE": ""}
    importers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _IMPORTER,
                role,
                str(marks),
                str(home.root),
                str(files[0].parent),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for role in ("A", "B")
    ]
    outputs = [p.communicate(timeout=120)[0] for p in importers]
    assert (marks / "a-renamed").exists()  # the interleaving was attempted
    assert [p.returncode for p in importers] == [0, 0], outputs
    with open_store(home, identity) as store:
        (study,) = store.studies()
        rows = store.instances(study.study_uid)
        assert len(rows) == len(files)
        stored = sorted(store.read_instance(row.sop_instance_uid) for row in rows)
    assert stored == sorted(path.read_bytes() for path in files)


_CRASH_BEFORE_COMMIT = """
import os, sys
from node.dicom.store import Store
from node.cli import main
Store._before_index_commit = lambda self: os._exit(9)  # power cut between rename and commit
sys.exit(main(["--home", sys.argv[1], "import", sys.argv[2]]))
"""


async def test_a_running_node_removes_the_orphan_blob_a_crashed_import_left(
    tmp_path: Path,
) -> None:
    home, identity = make_home(tmp_path, "hospital", "", [])
    (path,) = _series(tmp_path / "series", 1)
    crashed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _CRASH_BEFORE_COMMIT, str(home.root), str(path)],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert crashed.returncode == 9
    blobs = home.data_dir / "store" / "blobs"
    orphans = list(blobs.glob("??/*"))
    assert len(orphans) == 1  # renamed into place, never indexed
    node = NodeRuntime(home, identity, transport_options=FAST)
    await node.start()
    try:
        deadline = time.monotonic() + WAIT
        while orphans[0].exists():
            assert time.monotonic() < deadline, "the running node left the orphan blob"
            await asyncio.sleep(0.05)
    finally:
        await node.stop()
    with open_audit(home, identity) as audit:
        cleaned = [r for r in audit.records() if r.details.get("gc")]
    assert [(r.kind, r.details["removed"]) for r in cleaned] == [(AuditKind.DELETE, 1)]


# -- other local users ---------------------------------------------------------------------


async def test_everything_in_a_home_is_0700_or_0600_after_init_import_and_a_run(
    tmp_path: Path,
) -> None:
    root = tmp_path / "hospital"
    init = _radmesh(root, "init", "--name", "St. Brigid's", "--no-passphrase")
    assert init.returncode == 0, init.stderr
    (path,) = _series(tmp_path / "series", 1)
    imported = _radmesh(root, "import", str(path))
    assert imported.returncode == 0, imported.stderr
    home = NodeHome(root)
    identity: Identity = load_identity(home.key_path)
    previous = os.umask(0o022)  # this process as a user's shell left it
    try:
        node = NodeRuntime(home, identity, transport_options=FAST, control=True)
        await node.start()
        try:
            node.trust.is_trusted(identity.public_key, node.now())
            present = {p.name for p in home.data_dir.rglob("*")}
            assert {"index.sqlite-wal", "trust.db", "audit.sqlite"} & present
        finally:
            await node.stop()
    finally:
        os.umask(previous)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert loose_modes(root) == []


def test_doctor_reports_a_loose_mode_and_fix_repairs_it(tmp_path: Path) -> None:
    root = tmp_path / "hospital"
    assert _radmesh(root, "init", "--no-passphrase").returncode == 0
    (path,) = _series(tmp_path / "series", 1)
    assert _radmesh(root, "import", str(path)).returncode == 0
    index = root / "data" / "store" / "index.sqlite"
    os.chmod(index, 0o644)
    os.chmod(root / "data", 0o755)  # noqa: S103 - the loose mode doctor must find
    report = _radmesh(root, "doctor")
    assert report.returncode == 1
    assert f"{index} is 0644 (should be 0600)" in report.stdout
    assert "radmesh doctor --fix" in report.stdout
    fixed = _radmesh(root, "doctor", "--fix")
    assert "set 2 path(s) under" in fixed.stdout, fixed.stdout
    assert loose_modes(root) == []
    assert stat.S_IMODE(index.stat().st_mode) == 0o600


def test_cli_entry_restricts_the_umask(tmp_path: Path) -> None:
    probe = (
        "import os, sys; from node.cli import main; main(['--home', sys.argv[1], 'id']); "
        "print(oct(os.umask(0)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "none")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert done.stdout.strip().endswith("0o77"), done.stdout + done.stderr


def test_a_new_node_listens_on_loopback_until_the_site_names_its_address(
    tmp_path: Path,
) -> None:
    plain, chosen = tmp_path / "plain", tmp_path / "chosen"
    assert _radmesh(plain, "init", "--no-passphrase").returncode == 0
    assert _radmesh(chosen, "init", "--no-passphrase", "--listen", "10.0.0.20").returncode == 0
    config = NodeHome(plain).load_config()
    assert (config.network.listen_host, config.dicom.host) == ("127.0.0.1", "127.0.0.1")
    config = NodeHome(chosen).load_config()
    assert (config.network.listen_host, config.dicom.host) == ("10.0.0.20", "10.0.0.20")
