"""`dagtrain submit/status --remote`: SFTP copy and condor_submit_dag over SSH, against a real
OpenSSH server running inside the pool's root (so remote commands see the condor tools)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest
from test_submit_status import fake_run

from node_payload.common.errors import UserError
from node_payload.common.run_config import read_run_config
from node_payload.common.run_layout import CONFIG_FILE, DAG_FILE, MODELS_DIR
from pipeline import cli, planner
from pipeline import config as config_mod
from pipeline.mirrors import serve
from pipeline.remote import SshOptions, SshSession, Target, default_remote_dir, parse_target
from tests.condor_pool.pool import JOB_USER, CondorPool, SshServer


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def client_key(tmp_path: Path) -> tuple[Path, str]:
    """A fresh client key pair: the private key file and its public key line."""
    key = paramiko.RSAKey.generate(2048)
    path = tmp_path / "id_rsa"
    key.write_private_key_file(str(path))
    return path, f"{key.get_name()} {key.get_base64()}"


@pytest.fixture
def sshd(condor_pool: CondorPool, client_key: tuple[Path, str]) -> Iterator[SshServer]:
    server = condor_pool.start_sshd(_free_port(), client_key[1])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ssh_args(
    sshd: SshServer, client_key: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """CLI options reaching the pool's sshd with a known_hosts that trusts it."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return [
        "--remote",
        f"{JOB_USER}@127.0.0.1:{sshd.port}",
        "--known-hosts",
        str(known_hosts),
        "--identity",
        str(client_key[0]),
    ]


def _main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- no pool


def test_parse_target() -> None:
    assert parse_target("alice@submit.example.org") == Target("alice", "submit.example.org", 22)
    assert parse_target("alice@10.0.0.5:2222") == Target("alice", "10.0.0.5", 2222)
    assert parse_target("[::1]:2200") == Target(None, "::1", 2200)
    assert Target("a", "h", 2222).known_hosts_name == "[h]:2222"
    for bad in ("alice@", "alice@host:port", "alice@host:70000"):
        with pytest.raises(UserError, match="--remote"):
            parse_target(bad)


def test_default_remote_dir_is_stable_per_run(tmp_path: Path) -> None:
    first = fake_run(tmp_path / "a")
    second = fake_run(tmp_path / "b")
    assert default_remote_dir(first) == default_remote_dir(first)
    assert default_remote_dir(first).startswith("~/dagtrain-runs/fake-")
    assert default_remote_dir(first) != default_remote_dir(second)


def test_unreachable_port(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = fake_run(tmp_path / "run")
    port = _free_port()  # nothing listens there
    code, _, err = _main(capsys, "submit", str(run), "--remote", f"me@127.0.0.1:{port}")
    assert code == 2
    assert f"cannot reach the submit host 127.0.0.1:{port}" in err
    assert err.count("error:") == 1


# ---------------------------------------------------------------- against the pool's sshd


@pytest.mark.pool
def test_remote_submit_and_status_of_a_tiny_dag(
    condor_workdir: Path, tmp_path: Path, ssh_args: list[str], capsys: pytest.CaptureFixture
) -> None:
    run = fake_run(tmp_path / "run", rounds=2, nodes=2)
    remote = condor_workdir / "remote-run"
    started = time.monotonic()
    code, out, err = _main(
        capsys, "submit", str(run), *ssh_args, "--remote-dir", str(remote), "--maxjobs", "2"
    )
    assert code == 0, err
    cluster = int(out.strip())
    assert f"{remote} as DAGMan job {cluster}" in err
    assert (remote / "scripts/node.sh").stat().st_mode & 0o111  # modes survive the copy
    assert "-MaxJobs 2" in (remote / f"{DAG_FILE}.condor.sub").read_text()
    assert not list(condor_workdir.glob("remote-run.partial-*"))

    again = _main(capsys, "submit", str(run), *ssh_args, "--remote-dir", str(remote))
    assert again[0] == 2 and f"still running as DAGMan job {cluster}" in again[2]

    code, out, err = _main(
        capsys, "status", str(run), *ssh_args, "--remote-dir", str(remote), "--watch"
    )
    print(f"remote tiny DAG, submit to end: {time.monotonic() - started:.1f} s")
    assert code == 0, err
    assert "done: round 2/2, 0 retries, held-out accuracy 0.500 0.600; report: completed" in out
    assert not (run / "report.json").exists()  # the local run directory is left as it was

    finished = _main(capsys, "submit", str(run), *ssh_args, "--remote-dir", str(remote))
    assert finished[0] == 2 and "this run already completed" in finished[2]


@pytest.mark.pool
def test_remote_dir_not_ours_is_refused(
    condor_workdir: Path, tmp_path: Path, ssh_args: list[str], capsys: pytest.CaptureFixture
) -> None:
    remote = condor_workdir / "taken"
    fake_run(remote, nodes=1)
    code, _, err = _main(
        capsys, "submit", str(fake_run(tmp_path / "run")), *ssh_args, "--remote-dir", str(remote)
    )
    assert code == 2 and "holds a different run; it is never overwritten" in err
    code, _, err = _main(
        capsys, "submit", str(fake_run(tmp_path / "other")), *ssh_args, "--remote-dir", "/root/x"
    )
    assert code == 2 and "cannot copy" in err and "Permission denied" in err


@pytest.mark.pool
def test_unknown_host_and_host_key_mismatch(
    sshd: SshServer, client_key: tuple[Path, str], tmp_path: Path
) -> None:
    target = Target(JOB_USER, "127.0.0.1", sshd.port)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    with pytest.raises(UserError, match=r"\[127.0.0.1\]:\d+ is not a known host .* ssh-keyscan -p"):
        SshSession(SshOptions(target, known_hosts, client_key[0]))
    other = paramiko.RSAKey.generate(2048)
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other.get_name()} {other.get_base64()}\n")
    with pytest.raises(
        UserError, match=r"host key mismatch for \[127.0.0.1\]:\d+: .*`ssh-keygen -f .* -R"
    ):
        SshSession(SshOptions(target, known_hosts, client_key[0]))


@pytest.mark.pool
def test_authentication_failure(sshd: SshServer, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    paramiko.RSAKey.generate(2048).write_private_key_file(str(stranger))
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line())
    target = Target(JOB_USER, "127.0.0.1", sshd.port)
    with pytest.raises(
        UserError, match=f"SSH authentication as {JOB_USER}@127.0.0.1:.* --identity"
    ):
        SshSession(SshOptions(target, known_hosts, stranger))


@pytest.mark.pool
def test_remote_without_condor_tools(
    condor_pool: CondorPool,
    client_key: tuple[Path, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    server = condor_pool.start_sshd(_free_port(), client_key[1], {"PATH": "/nonexistent"})
    try:
        (tmp_path / "known_hosts").write_text(server.known_hosts_line())
        code, _, err = _main(
            capsys,
            "submit",
            str(fake_run(tmp_path / "run")),
            "--remote",
            f"{JOB_USER}@127.0.0.1:{server.port}",
            "--known-hosts",
            str(tmp_path / "known_hosts"),
            "--identity",
            str(client_key[0]),
        )
    finally:
        server.stop()
    assert code == 2 and "condor_submit_dag is not found on 127.0.0.1" in err


@pytest.mark.pool
def test_remote_submit_of_a_planned_run(
    condor_workdir: Path,
    tmp_path: Path,
    tiny_config: Callable[..., Path],
    ssh_args: list[str],
    capsys: pytest.CaptureFixture,
) -> None:
    """A real dagtrain run (3 nodes, 1 round): planned here, trained on the pool over SSH."""
    started = time.monotonic()
    config = config_mod.load(tiny_config(run__rounds="1"))
    run = planner.write(planner.make_plan(config), condor_workdir / "planned")
    remote = condor_workdir / "planned-remote"
    config = read_run_config(run / CONFIG_FILE)
    data = config.data
    ports = [int(url.rsplit(":", 1)[1]) for url in data.mirrors]
    # The jobs fetch the global models from the mirrors: the copy's, where its DAG writes them.
    with serve(Path(data.dataset), ports, run_models=(config.run.run_id, remote / MODELS_DIR)):
        code, _, err = _main(capsys, "submit", str(run), *ssh_args, "--remote-dir", str(remote))
        assert code == 0, err
        code, out, err = _main(
            capsys, "status", str(run), *ssh_args, "--remote-dir", str(remote), "--watch"
        )
    print(f"planned run over SSH: {time.monotonic() - started:.1f} s")
    assert code == 0, (remote / f"{DAG_FILE}.dagman.out").read_text()[-2000:]
    assert "done: round 1/1, 0 retries, held-out accuracy 0." in out
    assert "report: completed" in out
