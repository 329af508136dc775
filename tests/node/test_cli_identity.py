"""`radmesh init`, `radmesh id`, `radmesh org ...` as a user runs them."""

from __future__ import annotations

import stat
from pathlib import Path

import nacl.pwhash
import pytest

from crypto import keyfile
from crypto.identity import NodeId
from node.cli import main
from node.core import keystore

# Argon2id at its minimum cost: the key file format is the same, the tests are fast.
CHEAP_KDF = keyfile.KdfCost(nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN)


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Argon2id at interactive cost is slow on 2 cores; the format is the same."""
    original = keyfile.encrypt_seed
    monkeypatch.setattr(
        keyfile,
        "encrypt_seed",
        lambda seed, pw, cost=None: original(seed, pw, CHEAP_KDF),
    )


def _node_id(out: str) -> NodeId:
    line = next(line for line in out.splitlines() if line.startswith("Node id:"))
    return NodeId.parse(line.split(":", 1)[1])


def test_init_with_passphrase_then_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RADMESH_PASSPHRASE", "s3cret pass")
    home = tmp_path / "a"
    assert main(["--home", str(home), "init", "--name", "Dr A", "--subspecialties", "neuro"]) == 0
    created = _node_id(capsys.readouterr().out)
    assert main(["--home", str(home), "id"]) == 0
    assert _node_id(capsys.readouterr().out) == created
    assert b"s3cret" not in (home / "identity.key").read_bytes()
    assert "neuro" in (home / "config.toml").read_text()


def test_trust_verify_unlocks_the_key_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The safety number and the audit record of the change are one unlock of the key: one
    passphrase prompt, one Argon2id (it asked twice)."""
    monkeypatch.setenv("RADMESH_PASSPHRASE", "s3cret pass")
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--home", str(b), "init", "--name", "Dr B"]) == 0
    peer = _node_id(capsys.readouterr().out)
    assert main(["--home", str(a), "init", "--name", "Dr A"]) == 0
    capsys.readouterr()
    asked: list[str] = []

    def prompt(prompt: str = "") -> str | None:
        asked.append(prompt)
        return "s3cret pass"

    monkeypatch.setattr(keystore, "passphrase_from_env_or_prompt", prompt)
    assert main(["--home", str(a), "trust", "verify", str(peer), "--yes"]) == 0
    assert f"{peer.short()} is now verified." in capsys.readouterr().out
    assert len(asked) == 1
    assert main(["--home", str(a), "audit", "show"]) == 0
    assert "trust" in capsys.readouterr().out


def test_wrong_passphrase_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RADMESH_PASSPHRASE", "right")
    home = tmp_path / "a"
    main(["--home", str(home), "init"])
    monkeypatch.setenv("RADMESH_PASSPHRASE", "wrong")
    assert main(["--home", str(home), "id"]) == 1
    assert "wrong passphrase" in capsys.readouterr().err


def test_plain_key_opt_out_is_0600_and_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "a"
    assert main(["--home", str(home), "init", "--no-passphrase"]) == 0
    assert "WITHOUT a passphrase" in capsys.readouterr().err
    assert stat.S_IMODE((home / "identity.key").stat().st_mode) == 0o600


def test_missing_home_says_how_to_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--home", str(tmp_path / "nowhere"), "id"]) == 1
    assert "radmesh --home" in capsys.readouterr().err


def test_radmesh_home_env_selects_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RADMESH_HOME", str(tmp_path / "env-home"))
    assert main(["init", "--no-passphrase"]) == 0
    assert (tmp_path / "env-home" / "identity.key").exists()


def test_safety_number_is_the_same_from_both_sides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = {}
    for name in ("a", "b"):
        main(["--home", str(tmp_path / name), "init", "--no-passphrase"])
        ids[name] = _node_id(capsys.readouterr().out)
    main(["--home", str(tmp_path / "a"), "id", "--peer", str(ids["b"])])
    from_a = capsys.readouterr().out
    main(["--home", str(tmp_path / "b"), "id", "--peer", str(ids["a"]).lower()])
    from_b = capsys.readouterr().out

    def number(out: str) -> str:
        return next(line for line in out.splitlines() if line.startswith("Safety number"))

    assert number(from_a) == number(from_b)


def test_malformed_peer_id_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["--home", str(tmp_path / "a"), "init", "--no-passphrase"])
    assert main(["--home", str(tmp_path / "a"), "id", "--peer", "ABCD-EFG"]) == 1
    assert "node id" in capsys.readouterr().err


def test_org_sign_and_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from crypto.errors import Revoked
    from crypto.org import verify_certificate, verify_revocations

    org_dir = tmp_path / "org"
    assert main(["org", "init", str(org_dir), "--no-passphrase"]) == 0
    org_key = bytes.fromhex((org_dir / "org.pub").read_text().strip())
    main(["--home", str(tmp_path / "n"), "init", "--no-passphrase"])
    main(["--home", str(tmp_path / "n"), "id", "--show-key"])
    out = capsys.readouterr().out
    node_key = next(x for x in out.splitlines() if x.startswith("Public key")).split()[-1]
    cert_path = tmp_path / "node.cert"
    assert (
        main(
            [
                "org",
                "sign",
                str(org_dir),
                node_key,
                "--institution",
                "Uni Hospital",
                "--subspecialties",
                "neuro,paediatric",
                "--out",
                str(cert_path),
            ]
        )
        == 0
    )
    import time

    cert = verify_certificate(cert_path.read_bytes(), trusted_orgs={org_key}, now=int(time.time()))
    assert cert.subspecialties == ("neuro", "paediatric")
    assert main(["org", "revoke", str(org_dir), "--cert", str(cert_path)]) == 0
    listing = verify_revocations((org_dir / "revocations.bin").read_bytes(), org_key)
    with pytest.raises(Revoked):
        verify_certificate(
            cert_path.read_bytes(),
            trusted_orgs={org_key},
            now=int(time.time()),
            revocations={org_key: listing},
        )


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    from node.cli import build_parser

    parser = build_parser()
    sub_actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    names = list(sub_actions[0].choices or ())
    assert "init" in names
    for name in names:
        with pytest.raises(SystemExit) as exited:
            main([name, "--help"])
        assert exited.value.code == 0
        assert "usage: radmesh" in capsys.readouterr().out


def test_doctor_reports_missing_home_and_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--home", str(tmp_path / "none"), "doctor"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] node home" in out
    assert "radmesh init" in out


def test_doctor_flags_a_world_readable_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "a"
    main(["--home", str(home), "init", "--no-passphrase"])
    (home / "identity.key").chmod(0o644)
    assert main(["--home", str(home), "doctor"]) == 1
    assert "chmod 600" in capsys.readouterr().out


def _config(home: Path) -> dict[str, object]:
    import tomllib

    return tomllib.loads((home / "config.toml").read_text())


def test_init_with_name_and_country_keeps_them_and_does_not_warn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "a"
    args = ["--name", "St. Brigid's CT", "--country", "ie", "--jurisdictions", "ie, gb"]
    assert main(["--home", str(home), "init", "--no-passphrase", *args]) == 0
    config = _config(home)
    assert (config["display_name"], config["country"]) == ("St. Brigid's CT", "IE")
    assert config["jurisdictions"] == ["IE", "GB"]
    assert "Warning: the display name" not in capsys.readouterr().err


def test_init_without_a_terminal_keeps_the_defaults_and_warns_about_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "a"
    assert main(["--home", str(home), "init", "--no-passphrase"]) == 0
    err = capsys.readouterr().err
    assert 'the display name is the default "radmesh node" (--name)' in err
    assert "no country is set (--country" in err
    assert str(home / "config.toml") in err
    assert (_config(home)["display_name"], _config(home)["country"]) == ("radmesh node", "")


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--country", "UK", "use GB"),
        ("--country", "Ireland", "not an ISO 3166-1 alpha-2 code"),
        ("--jurisdictions", "IE,IRL", "'IRL' is not an ISO 3166-1 alpha-2 code"),
    ],
)
def test_init_refuses_a_country_that_is_not_an_iso_code_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, said: str
) -> None:
    home = tmp_path / "a"
    assert main(["--home", str(home), "init", "--no-passphrase", "--name", "X", flag, value]) == 1
    assert said in capsys.readouterr().err
    assert not (home / "identity.key").exists()


def test_init_on_a_terminal_asks_for_the_name_and_country_until_the_country_is_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import builtins
    import sys

    answers = iter(["  Dr A.   Okafor ", "Ireland", "ie"])
    asked: list[str] = []

    def fake_input(prompt: str = "") -> str:
        asked.append(prompt)
        return next(answers)

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(builtins, "input", fake_input)
    home = tmp_path / "a"
    assert main(["--home", str(home), "init", "--no-passphrase"]) == 0
    assert [p.split(" (")[0] for p in asked] == [
        "Display name peers see",
        "Country the node works in",
        "Country the node works in",
    ]
    out = capsys.readouterr()
    assert "not an ISO 3166-1 alpha-2 code" in out.out  # said between the two tries
    assert (_config(home)["display_name"], _config(home)["country"]) == ("Dr A. Okafor", "IE")
    assert "Warning" not in out.err.replace("WITHOUT a passphrase", "")


def test_init_no_mdns_keeps_the_node_off_the_local_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["init", "--no-passphrase", "--name", "Dr A", "--country", "GB"]
    assert main(["--home", str(tmp_path / "a"), *args, "--no-mdns"]) == 0
    assert main(["--home", str(tmp_path / "b"), *args]) == 0
    network = [_config(tmp_path / name)["network"] for name in ("a", "b")]
    assert [n["mdns"] for n in network] == [False, True]  # type: ignore[index]
