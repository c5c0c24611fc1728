"""`make lint`'s buf breaking check can fail: scripts/buf_check.sh on a changed copy of protos/.

The check compares the protos against protos/baseline/fabrica.binpb, the committed image of the released
contract (README "Keeping the contract compatible"), and also against a git ref's protos when BUF_AGAINST_REF
is set. Here it runs as `make lint` runs it (offline: buf from the virtualenv, protoc from grpc_tools), on a
copy of protos/ under tmp (FABRICA_PROTOS_DIR) with one change: a renamed, retyped or renumbered field fails,
with buf's finding naming the field; the unchanged copy and an added field pass. Each run takes about a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
BUF_CHECK = ROOT / "scripts" / "buf_check.sh"
CONTRACT_BASELINE = ROOT / "scripts" / "contract_baseline.sh"
BASELINE = ROOT / "protos" / "baseline" / "fabrica.binpb"
TAG_EVENT = "fabrica/ingest/v1/tag_event.proto"
RELEASED = "NOT compatible with the released contract"

#: One breaking change each to TagEvent (fields 1-9) in the copy, and the finding buf must report for it.
BREAKING = {
    "renamed": ("  string plc_id = 3 [", "  string plc = 3 [",
                'Field "3" on message "TagEvent" changed name from "plc_id" to "plc".'),
    "retyped": ("  uint64 tag_id = 2;", "  string tag_id = 2;",
                'Field "2" with name "tag_id" on message "TagEvent" changed type from "uint64" to "string".'),
    "renumbered": ("  int64 cursor = 1;", "  int64 cursor = 10;",
                   'Previously present field "1" with name "cursor" on message "TagEvent" was deleted.'),
}
#: An added field: its own comment (buf lint's COMMENTS) and a fresh number, before TagEvent's closing brace.
ADDED = "  // A note on the event, added after the release.\n  string note = 10;\n}\n"


@pytest.fixture
def protos(tmp_path: Path) -> Path:
    """A copy of protos/ (the .proto files; the baseline stays where the check reads it)."""
    copy = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", copy, ignore=shutil.ignore_patterns("baseline"))
    return copy


def edit(protos: Path, old: str, new: str, path: str = TAG_EVENT) -> None:
    file = protos / path
    text = file.read_text()
    assert text.count(old) == 1, f"{old!r} is no longer once in {path}: pick another change"
    file.write_text(text.replace(old, new))


def add_field(protos: Path) -> None:
    file = protos / TAG_EVENT
    text = file.read_text()
    assert text.endswith("}\n") and text.count("message ") == 1, f"{TAG_EVENT} no longer ends with TagEvent"
    file.write_text(text[: -len("}\n")] + ADDED)


def buf_check(protos: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("BUF_AGAINST_REF", "FABRICA_CONTRACT_BASELINE")}
    return subprocess.run([str(BUF_CHECK)], cwd=ROOT, env={**environ, "FABRICA_PROTOS_DIR": str(protos), **env},
                          capture_output=True, text=True, timeout=300)


def output(run: subprocess.CompletedProcess[str]) -> str:
    return f"exit {run.returncode}\n--- stdout\n{run.stdout}--- stderr\n{run.stderr}"


def test_the_unchanged_protos_are_compatible_with_the_released_contract(protos: Path) -> None:
    run = buf_check(protos)
    assert run.returncode == 0, output(run)
    assert f"buf lint: clean ({protos})" in run.stdout  # the copy was checked, not protos/
    assert f"buf breaking against the released contract {BASELINE}: compatible" in run.stdout, output(run)


@pytest.mark.parametrize("change", sorted(BREAKING))
def test_a_breaking_change_fails_naming_the_field(protos: Path, change: str) -> None:
    old, new, finding = BREAKING[change]
    edit(protos, old, new)
    run = buf_check(protos)
    assert run.returncode != 0, output(run)
    assert f"buf lint: clean ({protos})" in run.stdout  # it is buf breaking that refuses it, not lint
    lines = [line for line in run.stdout.splitlines() if line.endswith(finding)]
    assert lines, output(run)
    assert all(line.startswith(f"{TAG_EVENT}:") for line in lines), lines  # the file and line in the copy
    assert f"{protos} is {RELEASED} {BASELINE}" in run.stderr, output(run)


def test_an_added_field_with_a_fresh_number_is_compatible(protos: Path) -> None:
    add_field(protos)
    run = buf_check(protos)
    assert run.returncode == 0, output(run)
    assert "compatible" in run.stdout.splitlines()[-1], output(run)


def test_an_added_field_still_gets_buf_lint(protos: Path) -> None:
    """The copy is linted too: the same field without its comment breaks buf.yaml's COMMENTS rule."""
    add_field(protos)
    edit(protos, "  // A note on the event, added after the release.\n", "")
    run = buf_check(protos)
    assert run.returncode != 0, output(run)
    assert 'Field "note" should have a non-empty comment for documentation.' in run.stdout, output(run)


def test_a_missing_baseline_fails_rather_than_comparing_nothing(protos: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-baseline.binpb"
    run = buf_check(protos, FABRICA_CONTRACT_BASELINE=str(missing))
    assert run.returncode != 0, output(run)
    assert f"{missing}, the released contract to compare against, is missing" in run.stderr, output(run)
    assert "compatible" not in run.stdout, output(run)


def test_against_a_git_ref_too(protos: Path, tmp_path: Path) -> None:
    """BUF_AGAINST_REF adds a comparison with that ref's protos. Here the baseline is written (by `make
    contract-baseline`'s script) from the changed copy itself, so only the comparison with HEAD can refuse it."""
    run = buf_check(protos, BUF_AGAINST_REF="HEAD")
    assert run.returncode == 0, output(run)
    assert "buf breaking against the protos of HEAD (" in run.stdout, output(run)

    old, new, finding = BREAKING["retyped"]
    edit(protos, old, new)
    own = tmp_path / "own-baseline.binpb"
    written = subprocess.run([str(CONTRACT_BASELINE), str(own)], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "FABRICA_PROTOS_DIR": str(protos)}, timeout=300)
    assert written.returncode == 0 and own.is_file(), output(written)
    run = buf_check(protos, BUF_AGAINST_REF="HEAD", FABRICA_CONTRACT_BASELINE=str(own))
    assert run.returncode != 0, output(run)
    assert f"buf breaking against the released contract {own}: compatible" in run.stdout, output(run)
    assert any(line.endswith(finding) for line in run.stdout.splitlines()), output(run)
    assert f"{protos} is NOT compatible with the protos of HEAD (" in run.stderr, output(run)


def test_an_unknown_git_ref_fails(protos: Path) -> None:
    run = buf_check(protos, BUF_AGAINST_REF="no-such-ref-anywhere")
    assert run.returncode != 0, output(run)
    assert "BUF_AGAINST_REF=no-such-ref-anywhere is not a commit here" in run.stderr, output(run)


def test_the_committed_baseline_is_a_small_image_of_the_whole_contract() -> None:
    """protos/baseline/fabrica.binpb: every Fabrica package with its imports, without source info."""
    image = descriptor_pb2.FileDescriptorSet.FromString(BASELINE.read_bytes())
    names = {f.name for f in image.file}
    packages = {f.package for f in image.file if f.name.startswith("fabrica/")}
    assert {f"fabrica.{s}.v1" for s in ("alarm", "collector", "common", "config", "ingest", "production")} <= packages
    assert {"buf/validate/validate.proto", "google/protobuf/timestamp.proto"} <= names  # self-contained
    assert not any(f.HasField("source_code_info") for f in image.file)
    assert BASELINE.stat().st_size < 300_000
