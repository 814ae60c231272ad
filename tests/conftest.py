import os
import sys

import pytest
import torch

# tests import small helpers (reference_cell.py) that live beside them
sys.path.insert(0, os.path.dirname(__file__))

# a task defined only in the tests (registers itself in nas.tasks.TASKS): the registry-parametrized tests run it
# beside the built-in tasks, which shows that a task is one module (tests/test_tasks.py)
import toy_task  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _thread_count_fixed_within_a_test(monkeypatch):
    """In-process runs keep the thread count they start with: tests compare the floats of runs made one after the
    other in one process, and a count that followed the machine's load mid-run (nas.engine.common.FreeCoreWatch)
    would make them depend on it.  tests/test_threads.py checks the watch with its own clock, and in a subprocess."""
    import nas.engine.common

    monkeypatch.setattr(nas.engine.common, "recheck_free_cores", lambda: None)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A tiny synthetic corpus: 40-word vocabulary, train/valid/test.txt."""
    d = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(40)]
    for split, lines in (("train", 300), ("valid", 60), ("test", 60)):
        with open(d / f"{split}.txt", "w", encoding="utf-8") as f:
            for _ in range(lines):
                n = int(torch.randint(3, 12, (1,), generator=g))
                f.write(" " + " ".join(words[int(i)] for i in torch.randint(40, (n,), generator=g)) + " \n")
    return str(d)


def _postgres_binary(name):
    """A PostgreSQL server program from PATH or Debian's versioned folder (/usr/lib/postgresql/<v>/bin)."""
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


@pytest.fixture(scope="session")
def postgres_url():
    """An Optuna storage URL on a real PostgreSQL server: ``NAS_TEST_POSTGRES_URL`` if set, else a server of the
    machine's packages started here for the session (initdb in a temporary folder, a free local port, trust auth;
    as root it runs as the ``postgres`` user, since the server refuses root), stopped afterwards.

    Without the server programs the tests that need it are skipped, unless ``NAS_REQUIRE_POSTGRES=1`` (CI sets it),
    which makes that a failure.
    """
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    url = os.environ.get("NAS_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    initdb, pg_ctl = _postgres_binary("initdb"), _postgres_binary("pg_ctl")
    if not (initdb and pg_ctl):
        message = "PostgreSQL server programs (initdb, pg_ctl) not found: install the postgresql package"
        if os.environ.get("NAS_REQUIRE_POSTGRES"):
            pytest.fail(message)
        pytest.skip(message)
    root = tempfile.mkdtemp(prefix="nas-pg-")
    prefix = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data = os.path.join(root, "data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    subprocess.run(prefix + [initdb, "-D", data, "-U", "nas", "--auth=trust", "-E", "UTF8"], **run)
    subprocess.run(prefix + [pg_ctl, "-D", data, "-l", os.path.join(root, "server.log"), "-w", "-o",
                             f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], **run)
    try:
        import psycopg  # the driver SQLAlchemy (hence Optuna) uses for postgresql:// URLs

        with psycopg.connect(host="127.0.0.1", port=port, user="nas", dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE nas_test")
        yield f"postgresql://nas@127.0.0.1:{port}/nas_test"
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", data, "-m", "fast", "-w", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
