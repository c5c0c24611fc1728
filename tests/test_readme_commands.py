"""Every shell command the docs show works as written (issue 11): a test runs them.

The commands are extracted from the docs, never copied here: every fenced ```sh (bash, shell, console) block,
and any line elsewhere that starts with `$G ` or `.venv/bin/grpcurl `. A command is its first line joined with
the lines that continue it: a trailing `\\`, or a quote still open (a multi-line `-d '{...}'`). Lines that are
only `NAME=value` (`G=.venv/bin/grpcurl`) or `NAME=$(command)` (`TOKEN=$(.venv/bin/fabrica token ... | tail -1)`)
are assignments, run before every later command of the same doc.

How each command is checked:
- grpcurl (`$G`, `.venv/bin/grpcurl`, `grpcurl`): run as written by bash from the repository root, in the order
  the doc shows them, against a real `fabrica run` this module starts (fresh --data-dir under tmp, its own
  --base-port). The two substitutions: the docs use `make run`'s ports 50051-50057 (config, ingest, production,
  collector, alarm, then config's and ingest's peer ports); the test rewrites exactly those seven port numbers after `127.0.0.1:`/`localhost:` to the ports
  its stack bound; and `make run`'s data folder `.fabrica/` (where `-cacert .fabrica/tls/ca.pem` finds the
  stack's CA) to the stack's; nothing else. Each must exit 0 and print something sensible: `list` names services,
  `describe X` names X, a call prints JSON objects (non-empty unless the method returns google.protobuf.Empty).
  A server-streaming call ("Ctrl-C to stop") is stopped after its first message, which it must print.
  Commands run with FABRICA_DATA_DIR naming the stack's data folder, so `fabrica token` in an assignment
  signs with that stack's key, as it does with `make run`'s `.fabrica` for a reader.
- `make <target>`: the target is real (`make -n <target>` exits 0); not run.
- client generation (`.venv/bin/buf generate`, `.venv/bin/python -m grpc_tools.protoc`, and the `mkdir -p`
  before them): run as written from the repository root, offline, in the order the doc shows them; each must
  exit 0 and leave generated files in every output folder it names (`--X_out=DIR`; for buf generate, the
  `out` of each plugin of its template).
- `kubectl kustomize <dir>`: run when kubectl is installed (it works offline), else the folder must exist.
- other `kubectl` and `docker` commands need a cluster or a Docker daemon: not run, but every repository path
  they name must exist.
- anything else fails the test until someone decides here how it is checked.

The banner of `fabrica run` prints grpcurl commands too (with the stack's real ports): each is run the same way.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from fabrica.ingest.v1 import ingest_service_pb2 as ingest_pb
from fabrica.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc

from fabrica_svc.stack import PORTS_USED
from procs import free_base_port, wait_for

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "CONTRIBUTING.md", "deploy/README.md", "services/fabrica_svc/collector/README.md")
SHELL_LANGS = {"sh", "bash", "shell", "console"}
GRPCURL = (".venv/bin/grpcurl", "$G", "grpcurl")
#: make run's port -> offset from the base port: config, ingest, production, collector, alarm, then config's and
#: ingest's mutual-TLS peer ports.
README_PORTS = {50051: 0, 50052: 1, 50053: 2, 50054: 3, 50055: 4, 50056: 5, 50057: 6}
_ADDRESS = re.compile(r"^[\w.-]+:\d+$")
_DOC_PORT = re.compile(r"\b(127\.0\.0\.1|localhost):(5005[1-7])\b")
#: `make run`'s data folder, as the docs name it (relative to the repository root): a word that starts with it.
_DOC_DATA = re.compile(r"(?<![\w./-])\.fabrica/")
_TIMEOUT = 60.0  # seconds a command may take (bounded; the assertion is its output, never its duration)


@dataclass(frozen=True)
class Command:
    doc: str
    line: int  # 1-based line of its first line in the doc
    text: str  # as written, continuation lines included
    assignments: tuple[str, ...]  # the doc's `NAME=value` lines above it

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    def words(self) -> list[str]:
        return shlex.split(self.text, comments=True)


def _complete(text: str) -> bool:
    if text.rstrip().endswith("\\"):
        return False
    try:
        shlex.split(text, comments=True)
    except ValueError:  # a quote still open
        return False
    return True


def extract_commands(doc: str, text: str) -> list[Command]:
    """The shell commands `text` (a Markdown file) shows, in order."""
    out: list[Command] = []
    assignments: list[str] = []
    lines = text.splitlines()
    fence: str | None = None  # the language of the fenced block we are in ("" when unnamed), None outside
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip().lower()
            i += 1
            continue
        in_shell = fence in SHELL_LANGS
        starts = stripped.startswith(("$G ", ".venv/bin/grpcurl "))
        if not stripped or stripped.startswith("#") or not (in_shell or starts):
            i += 1
            continue
        first, pending = i, line
        while not _complete(pending) and i + 1 < len(lines) and not lines[i + 1].strip().startswith("```"):
            i += 1
            pending += "\n" + lines[i]
        i += 1
        command = Command(doc, first + 1, pending.strip(), tuple(assignments))
        words = command.words()
        if words and (all(re.fullmatch(r"[A-Za-z_]\w*=\S*", w) for w in words)
                      or re.fullmatch(r"[A-Za-z_]\w*=\$\([^()]*\)", command.text)):
            assignments.append(command.text)
        elif words:
            out.append(command)
    return out


def doc_commands() -> list[Command]:
    return [c for doc in DOCS if (REPO / doc).exists()
            for c in extract_commands(doc, (REPO / doc).read_text())]


def _kind(command: Command) -> str:
    words = command.words()
    if words[0] in GRPCURL:
        return "grpcurl"
    if words[:2] == [".venv/bin/buf", "generate"] or words[:3] == [".venv/bin/python", "-m", "grpc_tools.protoc"] \
            or words[:2] == ["mkdir", "-p"]:
        return "codegen"
    if words[0] == "make":
        return "make"
    if words[:2] == ["kubectl", "kustomize"]:
        return "kustomize"
    if words[0] in ("kubectl", "docker"):
        return "needs-cluster"
    return "unknown"


# --- running grpcurl commands ---------------------------------------------------------------------------


#: What the commands' environment adds (the stack fixture sets FABRICA_DATA_DIR to its data folder).
_COMMAND_ENV: dict[str, str] = {}


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            **_COMMAND_ENV}


def _script(command: Command, text: str) -> str:
    return "\n".join([*command.assignments, text])


def _run(script: str) -> subprocess.CompletedProcess[str]:
    """`script` run by bash from the repository root, as a reader would paste it (stdin empty)."""
    return subprocess.run(["bash", "-c", script], cwd=REPO, env=_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=_TIMEOUT)


def _grpcurl_target(words: list[str]) -> tuple[str, list[str]]:
    """The address a grpcurl command calls and the words after it (verb, symbol or method)."""
    for i, w in enumerate(words[1:], 1):
        if _ADDRESS.match(w) and words[i - 1] not in ("-d", "-H", "-rpc-header", "-reflect-header", "-authority"):
            return w, words[i + 1:]
    raise AssertionError(f"no address in {words}")


class Described:
    """What the stack's reflection says about a method: server streaming, and its response type."""

    def __init__(self) -> None:
        self._services: dict[tuple[str, str], str] = {}

    def rpc(self, address: str, method: str, transport: list[str]) -> tuple[bool, str]:
        """(server streaming, response type) of `method` ("pkg.Service/Method"), asked with the command's own
        `transport` flags (-cacert, -cert, -key, -plaintext); (False, "") when the server does not know it
        (the command itself then fails with grpcurl's own message)."""
        service, _, name = method.rpartition("/")
        key = (address, service)
        if key not in self._services:
            done = subprocess.run([str(REPO / ".venv/bin/grpcurl"), *transport, address, "describe", service],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=_TIMEOUT)
            self._services[key] = done.stdout if done.returncode == 0 else ""
        found = re.search(rf"rpc {re.escape(name)} \( (?:stream )?\S+ \) returns \( (stream )?\.?(\S+) \)",
                          self._services[key])
        return (bool(found.group(1)), found.group(2)) if found else (False, "")


def _transport(words: list[str]) -> list[str]:
    """The TLS flags of a grpcurl command (with their values): how it reaches the server."""
    out: list[str] = []
    for i, w in enumerate(words):
        if w in ("-cacert", "-cert", "-key") and i + 1 < len(words):
            out += [w, words[i + 1]]
        elif w in ("-plaintext", "-insecure"):
            out.append(w)
    return out


def _json_objects(output: str) -> list[object]:
    decoder, pos, out = json.JSONDecoder(), 0, []
    while pos < len(output):
        if output[pos].isspace():
            pos += 1
            continue
        value, pos = decoder.raw_decode(output, pos)
        out.append(value)
    return out


def _first_message(script: str) -> tuple[str, str]:
    """Runs `script` (a server-streaming grpcurl) until it printed one complete JSON message, then stops it
    (Ctrl-C, as the docs say). Returns (stdout so far, stderr)."""
    proc = subprocess.Popen(["bash", "-c", script], cwd=REPO, env=_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out: list[str] = []
    got_one = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            try:
                if _json_objects("".join(out)):
                    got_one.set()
            except ValueError:
                continue  # the message is not complete yet
        got_one.set()  # it ended (the check below says how)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        got_one.wait(_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
    assert proc.stderr is not None
    return "".join(out), proc.stderr.read()


def run_grpcurl(command: Command, ports: dict[int, int], described: Described, data_dir: Path | None = None) -> str | None:
    """Runs one grpcurl command as written (the docs' ports and data folder rewritten to the stack's); None
    if it did what it should, else what went wrong."""
    text = _DOC_PORT.sub(lambda m: f"{m.group(1)}:{ports.get(int(m.group(2)), m.group(2))}", command.text)
    if data_dir is not None:
        text = _DOC_DATA.sub(lambda m: f"{data_dir}/", text)
    script = _script(command, text)
    words = shlex.split(text, comments=True)
    address, rest = _grpcurl_target(words)
    if rest and rest[0] == "list":
        done = _run(script)
        names = done.stdout.split()
        if done.returncode != 0 or not names or not all(re.fullmatch(r"[\w.]+", n) for n in names):
            return f"exit {done.returncode}, stdout {done.stdout!r}, stderr {done.stderr!r}"
        if len(rest) > 1 and not all(n.startswith(rest[1] + ".") for n in names):
            return f"`list {rest[1]}` printed names outside it: {names}"
        return None
    if rest and rest[0] == "describe":
        done = _run(script)
        if done.returncode != 0 or (len(rest) > 1 and rest[1] not in done.stdout) or not done.stdout.strip():
            return f"exit {done.returncode}, stdout {done.stdout!r}, stderr {done.stderr!r}"
        return None
    assert rest, f"{command.where}: a grpcurl command without a verb or method"
    streaming, response = described.rpc(address, rest[0], _transport(words))
    if streaming:
        stdout, stderr = _first_message(script)
        try:
            messages = _json_objects(stdout)
        except ValueError:
            messages = []
        if not messages or not isinstance(messages[0], dict) or not messages[0]:
            return f"no first message: stdout {stdout!r}, stderr {stderr!r}"
        return None
    done = _run(script)
    try:
        messages = _json_objects(done.stdout)
    except ValueError:
        messages = []
    if done.returncode != 0 or not messages or not all(isinstance(m, dict) for m in messages):
        return f"exit {done.returncode}, stdout {done.stdout!r}, stderr {done.stderr!r}"
    if response != "google.protobuf.Empty" and not all(messages):
        return f"an empty answer from {rest[0]} (returns {response}): {done.stdout!r}"
    return None


# --- the stack ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    base: int
    banner: str
    data_dir: Path

    @property
    def ca(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    @property
    def ports(self) -> dict[int, int]:
        return {doc_port: self.base + offset for doc_port, offset in README_PORTS.items()}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`fabrica run` with the demo, as `make run` starts it, once the demo press's values reach ingest (so
    the docs' "live values" and history commands have something to show)."""
    tmp = tmp_path_factory.mktemp("readme")
    base = free_base_port(PORTS_USED)  # the four gRPC ports, then config's and ingest's mutual-TLS peer ports
    log = tmp / "run.log"
    env = {**os.environ, "FABRICA_LOG_FORMAT": "text", "FABRICA_METRICS_PORT": "-1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fabrica_svc.cli", "run", "--data-dir", str(tmp / "data"),
                                 "--base-port", str(base), "--web-port", "0"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        text = ""
        for _ in range(1200):  # bounded: 120 s
            text = log.read_text(errors="replace")
            if "Ctrl-C stops everything" in text or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert "Ctrl-C stops everything" in text, text[-3000:]
        banner = text[text.index("Fabrica is running"):]
        _COMMAND_ENV["FABRICA_DATA_DIR"] = str(tmp / "data")
        viewer = _run("TOKEN=$(.venv/bin/fabrica token --role viewer --user readme-test | tail -1); echo $TOKEN")
        assert viewer.returncode == 0 and viewer.stdout.strip(), viewer
        bearer = (("authorization", f"Bearer {viewer.stdout.strip()}"),)

        credentials = grpc.ssl_channel_credentials((tmp / "data" / "tls" / "ca.pem").read_bytes())

        def press_values() -> bool:
            with grpc.secure_channel(f"127.0.0.1:{base + 1}", credentials) as ch:
                reply = ingest_grpc.IngestServiceStub(ch).GetLatestValues(
                    ingest_pb.GetLatestValuesRequest(plc_id="press-1"), timeout=10, metadata=bearer)
            return bool(reply.readings)

        asyncio.run(wait_for(press_values, timeout=120, what="the demo press's values in ingest"))
        yield Stack(base, banner, tmp / "data")
    finally:
        _COMMAND_ENV.clear()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- tests ----------------------------------------------------------------------------------------------


def test_the_extraction_finds_the_readme_commands_whole() -> None:
    """The README's commands are found, with their continuation lines and the `G=` assignment."""
    readme = [c for c in doc_commands() if c.doc == "README.md"]
    grpcurls = [c for c in readme if _kind(c) == "grpcurl"]
    assert len(grpcurls) >= 10, [c.text for c in readme]
    # Every call after the first lines carries the token minted above it (auth is on in `make run`).
    assert all(c.assignments[:2] == ("G=.venv/bin/grpcurl", "TOKEN=$(.venv/bin/fabrica token --role admin "
                                     "--user you | tail -1)") for c in grpcurls)
    create = next(c for c in grpcurls if c.text.endswith("fabrica.config.v1.ConfigService/CreatePlc"))
    assert '"tags": [' in create.text and create.text.startswith(
        "$G -cacert .fabrica/tls/ca.pem -H \"authorization: Bearer $TOKEN\" -d '{")
    assert any(c.text.endswith("/WatchPlcs") for c in grpcurls)
    assert {c.words()[1] for c in readme if _kind(c) == "make"} >= {"run", "test"}
    assert not [c.where for c in doc_commands() if _kind(c) == "unknown"], \
        "a command the docs show that this test does not know how to check"


def test_extraction_joins_continuations_and_open_quotes() -> None:
    text = "\n".join([
        "Prose, then `inline code` that is not a command.",
        "```sh", "X=1", "# a comment", "echo a \\", "  b", "echo '{", "  \"k\": 1}' # trailing", "make run   # note",
        "```", "```", ".venv/bin/grpcurl -plaintext 127.0.0.1:50051 list", "not a command", "```",
    ])
    got = [(c.line, c.text, c.assignments) for c in extract_commands("doc.md", text)]
    assert got == [
        (5, "echo a \\\n  b", ("X=1",)),
        (7, "echo '{\n  \"k\": 1}' # trailing", ("X=1",)),
        (9, "make run   # note", ("X=1",)),
        (12, ".venv/bin/grpcurl -plaintext 127.0.0.1:50051 list", ("X=1",)),  # a doc's assignments hold on
    ]


def test_the_docs_make_targets_exist() -> None:
    makes = [c for c in doc_commands() if _kind(c) == "make"]
    assert makes
    for command in makes:
        done = subprocess.run(["make", "-n", *command.words()[1:]], cwd=REPO, capture_output=True, text=True,
                              timeout=_TIMEOUT)
        assert done.returncode == 0, f"{command.where}: {command.text!r}: {done.stderr}"


def test_the_docs_cluster_commands_name_real_files() -> None:
    """kubectl/docker commands cannot run here (no cluster, no daemon); `kubectl kustomize` can, offline."""
    commands = [c for c in doc_commands() if _kind(c) in ("kustomize", "needs-cluster")]
    assert commands
    top = {p.name for p in REPO.iterdir()}
    kubectl = shutil.which("kubectl", path=_env()["PATH"])
    for command in commands:
        words = command.words()
        paths = [w.split("=", 1)[-1] for w in words if "/" in w and w.split("=", 1)[-1].split("/")[0] in top]
        for path in paths:
            assert (REPO / path).exists(), f"{command.where}: {path} does not exist"
        if _kind(command) == "kustomize":
            if kubectl:
                done = subprocess.run(words, cwd=REPO, capture_output=True, text=True, timeout=_TIMEOUT)
                assert done.returncode == 0 and "kind: Deployment" in done.stdout, f"{command.where}: {done.stderr}"
            else:
                assert (REPO / words[2] / "kustomization.yaml").exists(), command.where


def _codegen_outputs(words: list[str]) -> list[Path]:
    """The folders a client-generation command writes into."""
    if words[:2] == ["mkdir", "-p"]:
        return []
    if words[0].endswith("buf"):
        template = words[words.index("--template") + 1] if "--template" in words else "buf.gen.yaml"
        config = yaml.safe_load((REPO / template).read_text())
        return [REPO / plugin["out"] for plugin in config["plugins"]]
    return [REPO / w.split("=", 1)[1] for w in words if re.fullmatch(r"--\w+_out=[^:]+", w)]


def test_the_docs_client_generation_commands_run() -> None:
    """Offline, as written: the descriptor image (gen/fabrica/image.binpb) is all they need."""
    commands = [c for c in doc_commands() if _kind(c) == "codegen"]
    assert any(c.words()[0].endswith("buf") for c in commands), "the README shows no buf generate"
    for command in commands:  # the output folders removed first: what is there afterwards, a command wrote
        for folder in _codegen_outputs(command.words()):
            assert folder.resolve().is_relative_to(REPO / "build"), f"{command.where}: generate into build/"
            shutil.rmtree(folder, ignore_errors=True)
    for command in commands:
        done = _run(_script(command, command.text))
        assert done.returncode == 0, f"{command.where}: {command.text}\n{done.stdout}\n{done.stderr}"
        for folder in _codegen_outputs(command.words()):
            assert any(p.is_file() for p in folder.rglob("*")), f"{command.where}: nothing generated into {folder}"


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if any(c.doc == d and _kind(c) == "grpcurl" for c in doc_commands())])
def test_the_docs_grpcurl_commands_run_top_to_bottom(stack: Stack, doc: str) -> None:
    described = Described()
    failures = []
    for command in [c for c in doc_commands() if c.doc == doc and _kind(c) == "grpcurl"]:
        problem = run_grpcurl(command, stack.ports, described, stack.data_dir)
        if problem:
            failures.append(f"{command.where}: {command.text}\n  -> {problem}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_the_banners_grpcurl_commands_run(stack: Stack) -> None:
    # The banner's `export TOKEN=...` line (its admin token) comes first, as a reader pastes it.
    exports = tuple(line.strip() for line in stack.banner.splitlines() if line.strip().startswith("export TOKEN="))
    assert len(exports) == 1, stack.banner
    commands = [Command("banner", n, line[line.index(".venv/bin/grpcurl"):].strip(), exports)
                for n, line in enumerate(stack.banner.splitlines(), 1) if ".venv/bin/grpcurl" in line]
    assert len(commands) >= 4, stack.banner
    stack_addresses = {f"127.0.0.1:{port}" for port in stack.ports.values()}
    assert all(_grpcurl_target(c.words())[0] in stack_addresses for c in commands), stack.banner
    # Over TLS, trusting the stack's CA by the path the banner prints; never plaintext; no database password.
    assert all(f"-cacert {stack.ca}" in c.text for c in commands), stack.banner
    assert "TLS, CA" in stack.banner and "-plaintext" not in stack.banner, stack.banner
    assert not re.search(r"postgres(?:ql)?://[^:/@\s]+:(?!\*\*\*@)[^@\s]+@", stack.banner), stack.banner
    described = Described()
    failures = [f"{c.text}\n  -> {p}" for c in commands if (p := run_grpcurl(c, {}, described))]
    assert not failures, "\n".join(failures)
