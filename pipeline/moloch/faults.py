"""The reliability suite: what happens when runs are killed, files corrupted, inputs wrong,
servers faulty and model output hostile. ``nox -s faults`` runs it and writes its counts to
``data/runs/bench/faults.json``; it takes a while (each kill is a real run).

The suite's own tiny profile runs one task with the embedded model as player and the
audience and judge behind a local OpenAI-compatible server on 127.0.0.1 (this module's
``FaultServer``), which answers deterministically from each request, can inject faults
(429, 500, 503 with Retry-After, a hung request, a cut body, a malformed reply, a reset
connection) and can put markup into every thought it writes.

1. kills: ``moloch run`` killed at a random moment (its process group, its notebook kernel
   alone, or Ctrl-C), then resumed; the outputs must equal an uninterrupted run's, no
   process may outlive its runner, and no temporary file may be left.
2. corruption: a finished run copied and damaged (outputs, manifests, cached answers,
   adapters, the converted checkpoint, cached inputs), then run again: each case must be
   refused by name or rebuilt, never used.
3. bad input: wrong profiles, arguments and folders at the command line: each must end in
   one ``moloch: error:`` line and exit code 1 or 2, never a traceback.
4. API faults: the same run against the server with 30% faults of seven kinds: identical
   outputs, and the audience and judge time within 3x the fault-free run's.
5. secrets: the API key appears in nothing the runs wrote.
6. markup: thoughts holding a script tag, a heading, a shortcode, a cross-reference, a Typst
   command and a pipe table are shown literally in the HTML and the PDF.

    python -m moloch.faults --kills 30        # the suite (= nox -s faults)
    python -m moloch.faults --only kills      # one campaign again, merged into faults.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from .config import load_profile
from .files import write_atomic
from .paths import ROOT, runs_dir

SECRET = "sk-moloch-faults-SECRET-7f3a9c"
FAULTS = ("429", "500", "503", "hang", "truncated", "malformed", "reset")
MARKUP = (
    "<script>alert(1)</script>",
    "# heading injected",
    "{{< embed x.ipynb#y >}}",
    "@fig-injected",
    "#set page(fill: red)",
    "| a | b |",
)


# --- the server ---------------------------------------------------------------------------


class _Listener(ThreadingHTTPServer):
    daemon_threads = True  # a handler still sleeping must not hold the shutdown
    request_queue_size = 256  # the default 5 drops connections when many clients start at once


class LocalServer:
    """An HTTP server on a free 127.0.0.1 port (``url``: its /v1 root), serving ``handler``
    from a thread while in a ``with`` block (the fake servers of the suite and the tests)."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.httpd = _Listener(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class FaultServer(LocalServer):
    """A deterministic chat-completions server on 127.0.0.1 that can misbehave on purpose.

    Votes and verdicts are a pure function of the request (so a resumed run gets the
    answers an uninterrupted one got); ``fault_rate`` of the attempts fail, with one of
    ``FAULTS``, chosen from the request and its attempt number; ``markup`` puts every
    MARKUP string into each thought. Every answer takes ``latency_s``, or with
    ``exponential`` a delay drawn from an exponential law of that mean (like a busy API).
    """

    def __init__(
        self, fault_rate: float = 0.0, markup: bool = False, hang_s: float = 3.0,
        latency_s: float = 0.05, exponential: bool = False,
    ):  # fmt: skip
        self.fault_rate, self.markup, self.hang_s = fault_rate, markup, hang_s
        self.latency_s, self.exponential = latency_s, exponential
        self.attempts: dict[str, int] = {}
        self.faults = dict.fromkeys(FAULTS, 0)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # the preflight's models listing
                self.send(200, json.dumps({"object": "list", "data": []}).encode())

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                key = hashlib.sha256(body).hexdigest()
                with server.lock:
                    attempt = server.attempts.get(key, 0)
                    server.attempts[key] = attempt + 1
                draw = random.Random(f"{key}:{attempt}")
                mean = server.latency_s
                time.sleep(draw.expovariate(1 / mean) if server.exponential and mean else mean)
                if server.fault_rate and draw.random() < server.fault_rate:
                    fault = draw.choice(FAULTS)
                    with server.lock:
                        server.faults[fault] += 1
                    return self.fail(fault)
                self.send(200, server.reply(json.loads(body), key))

            def fail(self, fault: str):
                if fault == "hang":
                    time.sleep(server.hang_s)
                    return self.send(200, b"{}")
                if fault == "reset":
                    self.connection.shutdown(2)
                    return None
                if fault == "truncated":
                    return self.send(200, b'{"id": "x", "choices": [{"mess')
                if fault == "malformed":
                    return self.send(200, b'{"id": "x", "choices": "none"}')
                extra = {"Retry-After": "0.05"} if fault == "503" else {}
                return self.send(int(fault), b'{"error": {"message": "injected"}}', extra)

            def send(self, status: int, payload: bytes, headers: dict | None = None):
                with contextlib.suppress(OSError):
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)

        super().__init__(Handler)

    def reply(self, body: dict, key: str) -> bytes:
        system = body["messages"][0]["content"]
        field = re.search(r"your final (\w+) inside", system).group(1)
        thought = " ".join(MARKUP) if self.markup else f"thinking {key[:8]}"
        if field == "vote":
            answer = "AB"[int(key[0], 16) % 2]
        else:
            answer = ("Yes", "No")[int(key[1], 16) % 2]
        text = f"<think>{thought}</think><{field}>{answer}</{field}>"
        return json.dumps(
            {
                "id": f"chatcmpl-{key[:10]}", "object": "chat.completion", "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
            }
        ).encode()  # fmt: skip


# --- the suite's profile and runs ------------------------------------------------------------


def suite_profile(
    folder: Path, name: str = "faults", tasks=("sales",), test: int = 2, voters: int = 2
) -> Path:
    """The smoke profile cut down, with its audience and judge behind the fault server."""
    spec = load_profile("smoke").model_dump(mode="json")
    spec.update(name=name, tasks=list(tasks), anchors={"source": "v1", "train": 2, "test": test})
    spec["players"][0].update(max_tokens=8)
    for role in ("audience", "judge"):
        spec[role].update(
            backend="openai", model="fake-" + role, force_answer=False, max_tokens=64,
            max_concurrency=4, timeout_s=0.3, connect_timeout_s=0.5, retry_base_s=0.05,
        )  # fmt: skip
    spec["audience"]["voters"] = voters
    spec["training"].update(max_steps=1, batch_size=2)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def environment(server: FaultServer, cache: Path) -> dict:
    env = dict(
        os.environ, OPENAI_BASE_URL=server.url, OPENAI_API_KEY=SECRET, MOLOCH_CACHE=str(cache)
    )
    env.pop("MOLOCH_LLM_MODE", None)
    return env


def outputs(folder: Path) -> dict[str, bytes]:
    """Every JSON-lines output of a run folder, by relative path (what must not change)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.jsonl"))}


def leftovers(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp")
            or p.name.endswith(".tmp.ipynb")]  # fmt: skip


def cli_run(profile: Path, folder: Path, env: dict, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "moloch.cli", "run", "--profile", str(profile),
               "--run-dir", str(folder), *extra]  # fmt: skip
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def kernels_of(folder: Path) -> list[int]:
    """Pids of live notebook kernels started for ``folder``'s run."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(proc.info["cmdline"] or [])
            if "moloch.kernels" in cmd and str(folder) in json.dumps(proc.environ()):
                found.append(proc.info["pid"])
    return found


# --- 1. kills --------------------------------------------------------------------------------


KILLS = ("group", "kernel", "sigint")  # SIGKILL to the run's process group or its kernel; Ctrl-C


def children_feel_ctrl_c() -> None:
    """A shell's background job starts with SIGINT ignored, and the runs it starts would
    inherit that (their Ctrl-C then does nothing): they must meet it as a terminal's run."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def kill_campaign(kills: int, work: Path, cache: Path, seed: int) -> dict:
    """``kills`` runs, each killed once, then resumed and compared with a clean run. Kill i
    aims at stage i (in turn, so every stage is met however short) with kind i (in turn), at
    a random moment within the time that stage took in the reference run. A run that
    finishes before its kill is not a kill: it is counted apart, and run again."""
    rng = random.Random(seed)
    children_feel_ctrl_c()
    profile = suite_profile(work)
    with FaultServer() as server:
        env = environment(server, cache)
        reference = work / "reference"
        started, start = time.time(), time.monotonic()
        done = cli_run(profile, reference, env)
        done.communicate()
        reference_s = time.monotonic() - start
        if done.returncode:
            raise RuntimeError(f"the reference run failed: {done.stderr}")
        clean, units = outputs(reference), _units_by_stage(reference)
        seconds = _stage_seconds(reference, units, started)
        results: list[dict] = []
        finished_first = 0
        while len(results) < kills:
            if finished_first > kills:
                raise RuntimeError(f"{finished_first} runs finished before their kill")
            kind = KILLS[len(results) % len(KILLS)]
            aimed = list(units)[len(results) % len(units)]
            delay = rng.uniform(0.0, 0.9 * seconds[aimed])
            folder = work / f"kill-{len(results):02d}"
            shutil.rmtree(folder, ignore_errors=True)
            began = time.monotonic()
            proc = cli_run(profile, folder, env)
            entered = _reached(proc, folder, units, aimed)
            signalled = None if entered is None else _kill_at(proc, kind, folder, entered + delay)
            if signalled is None:  # the run ended first: no kill
                proc.communicate()
                finished_first += 1
                continue
            at, stage = time.monotonic() - began, _stage_at(folder, units)  # the stage it met
            _, err = proc.communicate(timeout=600)
            time.sleep(2.0)
            orphans = kernels_of(folder)
            resumed = cli_run(profile, folder, env)
            resumed.communicate(timeout=1200)
            results.append({
                "kill": kind, "signalled": signalled, "stage_aimed": aimed, "stage": stage,
                "at_s": round(at, 1), "exit_code": proc.returncode, "orphans": len(orphans),
                "traceback_on_kill": "Traceback" in err and kind == "sigint",
                "resumed_ok": resumed.returncode == 0,
                "identical": resumed.returncode == 0 and outputs(folder) == clean,
                "leftovers": leftovers(folder),
            })  # fmt: skip
            shutil.rmtree(folder, ignore_errors=True)
            # The campaign is long: what it has found so far is on disk after every kill.
            counts = _kill_counts(results, reference_s, finished_first)
            write_atomic(work / "kills-so-far.json", json.dumps(counts))
    return _kill_counts(results, reference_s, finished_first)


def _reached(proc: subprocess.Popen, folder: Path, units: dict, stage: str) -> float | None:
    """When the run in ``folder`` reached ``stage`` (or a later one), or None if it ended."""
    order = list(units) + ["after the stages"]
    while proc.poll() is None:
        if order.index(_stage_at(folder, units)) >= order.index(stage):
            return time.monotonic()
        time.sleep(0.05)
    return None


def _kill_at(proc: subprocess.Popen, kind: str, folder: Path, deadline: float) -> str | None:
    """Signal ``proc`` at ``deadline`` as ``kind`` says; a kernel kill waits, past the
    deadline if it must, for a live kernel of the run. Returns what was signalled, or None
    where the run ended first."""
    target = None
    while proc.poll() is None:
        if kind == "kernel":
            target = next(iter(kernels_of(folder)), None)
            if target and time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, signal.SIGKILL)
                    return "kernel"
        elif time.monotonic() >= deadline:
            os.killpg(proc.pid, signal.SIGINT if kind == "sigint" else signal.SIGKILL)
            return "process group"
        time.sleep(0.1)
    return None


def _units_by_stage(folder: Path) -> dict[str, list[str]]:
    """The manifests of a finished run, by stage (its first folder), in the order run."""
    found: dict[str, list[tuple[float, str]]] = {}
    for path in folder.rglob("manifest.json"):
        stage = path.relative_to(folder).parts[0]
        found.setdefault(stage, []).append((path.stat().st_mtime, str(path.relative_to(folder))))
    ordered = sorted(found.items(), key=lambda item: min(item[1]))
    return {stage: [name for _, name in paths] for stage, paths in ordered}


def _stage_seconds(folder: Path, units: dict[str, list[str]], started: float) -> dict:
    """How long each stage took in the run in ``folder`` started at ``started`` (epoch
    seconds): from the previous stage's last manifest to its own last."""
    seconds, before = {}, started
    for stage, names in units.items():
        end = max((folder / name).stat().st_mtime for name in names)
        seconds[stage], before = max(end - before, 0.1), end
    return seconds


def _stage_at(folder: Path, units: dict[str, list[str]]) -> str:
    """The first stage of ``units`` with a manifest missing in ``folder`` (the stage a kill
    met), or "after the stages" (the report's notebooks)."""
    for stage, names in units.items():
        if not all((folder / name).is_file() for name in names):
            return stage
    return "after the stages"


def _kill_counts(results: list[dict], reference_s: float, finished_first: int) -> dict:
    def tally(key: str, kind: str | None = None) -> dict:  # of every kill, or of one kind's
        return dict(Counter(str(r[key]) for r in results if kind in (None, r["kill"])))

    return {
        "kills": len(results),
        "reference_run_s": round(reference_s, 1),
        "runs_finished_before_their_kill": finished_first,  # not kills; not counted above
        "kills_by_kind": tally("kill"),
        "kills_by_stage": tally("stage"),
        "resumed_identically": sum(r["identical"] for r in results),
        "orphan_processes": sum(r["orphans"] for r in results),
        "leftover_files": sum(len(r["leftovers"]) for r in results),
        "sigint_tracebacks": sum(r["traceback_on_kill"] for r in results),
        "sigint_exit_codes": tally("exit_code", kind="sigint"),  # Ctrl-C's convention: 130
        "cases": results,
    }


# --- 2. corruption ---------------------------------------------------------------------------


def _same_size_edit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    while chr(data[i]) in '{}[]":,\n\\':  # change a letter, keep the file's shape
        i += 1
    data[i] = ord("Q") if data[i] != ord("Q") else ord("R")
    path.write_bytes(bytes(data))


def corruption_cases(reference: Path, cache: Path) -> list[tuple[str, list[str], callable]]:
    """(name, extra run arguments, damage(folder)) for every case."""
    unit = "{}/sales/SmolLM2-135M-Instruct"
    cases = []
    for stage, name in [("prepare", "train.jsonl"), ("prepare", "test.jsonl"),
                        ("prepare", "voters.jsonl"), ("candidates", "candidates.jsonl"),
                        ("episodes", "votes.jsonl"), ("trainsets", "rft.jsonl"),
                        ("trainsets", "tfb.jsonl"), ("generate/base", "generations.jsonl"),
                        ("generate/rft", "generations.jsonl"), ("compete", "votes.jsonl"),
                        ("probe", "labels.jsonl")]:  # fmt: skip
        base, _, method = stage.partition("/")
        rel = unit.format(base) + (f"/{method}" if method else "") + "/" + name
        cases.append((f"same-size edit {rel}", [], lambda f, rel=rel: _same_size_edit(f / rel)))
    for rel in ("compete/sales/SmolLM2-135M-Instruct/votes.jsonl",
                "generate/sales/SmolLM2-135M-Instruct/tfb/generations.jsonl"):  # fmt: skip
        cases.append((f"truncated {rel}", [], lambda f, rel=rel: (f / rel).write_bytes(
            (f / rel).read_bytes()[: len((f / rel).read_bytes()) // 2])))  # fmt: skip
        cases.append((f"deleted {rel}", [], lambda f, rel=rel: (f / rel).unlink()))
    manifest = "probe/sales/SmolLM2-135M-Instruct/manifest.json"
    damaged = [("non-UTF-8", b"\xff\xfe\x00{"), ("a list", b"[]"),
               ("no outputs", b'{"stage": "probe"}'), ("torn", b'{"outputs": {')]  # fmt: skip
    for what, content in damaged:
        cases.append((f"manifest {what}", [], lambda f, c=content: (f / manifest).write_bytes(c)))

    def flip_cache(column: str):
        def damage(folder: Path) -> None:
            with sqlite3.connect(folder / "llm-cache.sqlite") as db:
                key, value = db.execute(f"SELECT key, {column} FROM calls LIMIT 1").fetchone()
                new = value + 1 if isinstance(value, int) else str(value)[::-1] + "x"
                db.execute(f"UPDATE calls SET {column} = ? WHERE key = ?", (new, key))

        return damage

    everything = [part for stage in ("candidates", "episodes", "generate", "compete", "probe")
                  for part in ("--force", stage)]  # fmt: skip
    for column in ("text", "completion_tokens", "meta"):
        cases.append((f"cached answer: {column} changed", everything, flip_cache(column)))
    for method in ("rft", "tfb"):
        rel = f"train/sales/SmolLM2-135M-Instruct/{method}/adapter/adapter_model.safetensors"
        cases.append((f"adapter {method} garbled", [], lambda f, rel=rel: _same_size_edit(f / rel)))
    cases.append(("adapter summary hash changed", ["--force", "generate"], lambda f: _edit_json(
        f / "train/sales/SmolLM2-135M-Instruct/rft/adapter/train_summary.json",
        "adapter_sha256", "0" * 64)))  # fmt: skip

    def garble_checkpoint(folder: Path) -> None:
        weights = next((cache / "models").glob("SmolLM2-*/model.safetensors"))
        _same_size_edit(weights)

    cases.append(("converted checkpoint garbled", ["--force", "generate"], garble_checkpoint))

    def garble_input(folder: Path) -> None:
        path = next((cache / "data").rglob("Qwen3-8B/train.json"))
        _same_size_edit(path)

    cases.append(("cached input garbled", ["--force", "prepare"], garble_input))
    return cases


def _edit_json(path: Path, key: str, value) -> None:
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))


def corruption_campaign(work: Path, cache: Path) -> dict:
    profile = suite_profile(work, "corruption")
    results = []
    with FaultServer() as server:
        env = environment(server, cache)
        reference = work / "corruption-reference"
        done = cli_run(profile, reference, env)
        done.communicate()
        clean = outputs(reference)
        for name, extra, damage in corruption_cases(reference, cache):
            folder = work / "corrupted"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(reference, folder)
            _rewrite_paths(folder, reference)
            damage(folder)
            proc = cli_run(profile, folder, env, *extra)
            _, err = proc.communicate(timeout=1200)
            same = outputs(folder) == clean
            named = proc.returncode != 0 and "moloch: error:" in err
            results.append({
                "case": name, "exit_code": proc.returncode,
                "outcome": "rebuilt" if proc.returncode == 0 and same else
                           "refused" if named else "used silently",
                "traceback": "Traceback" in err, "message": err.strip().splitlines()[-1:] or [],
            })  # fmt: skip
            # a refused damage to the shared cache (checkpoint, inputs) is repaired for the next
            if proc.returncode != 0:
                subprocess.run([sys.executable, "-m", "moloch.llm.embedded"], env=env, cwd=ROOT,
                               capture_output=True)  # fmt: skip
    return {
        "cases": len(results),
        "used_silently": sum(r["outcome"] == "used silently" for r in results),
        "rebuilt": sum(r["outcome"] == "rebuilt" for r in results),
        "refused": sum(r["outcome"] == "refused" for r in results),
        "tracebacks": sum(r["traceback"] for r in results),
        "details": results,
    }


def _rewrite_paths(folder: Path, reference: Path) -> None:
    """A copied run folder: its manifests may name the original's paths (adapter folders)."""
    for path in folder.rglob("manifest.json"):
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace(str(reference), str(folder)), encoding="utf-8")


# --- 3. bad input ----------------------------------------------------------------------------


def bad_inputs(work: Path) -> list[tuple[str, list[str]]]:
    smoke = load_profile("smoke").model_dump(mode="json")

    def profile(label: str, **changes) -> str:
        spec = json.loads(json.dumps(smoke))
        for key, value in changes.items():
            section, _, field = key.partition("__")
            if field:
                spec[section][field] = value
            else:
                spec[section] = value
        path = work / f"bad-{label}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return str(path)

    player = smoke["players"][0]
    (work / "not-yaml.yaml").write_text("name: [unclosed")
    (work / "a-list.yaml").write_text("- 1\n- 2\n")
    other = work / "other-run"
    other.mkdir(exist_ok=True)
    (other / "profile.yaml").write_text(yaml.safe_dump(smoke | {"name": "someone-else"}))
    run = ["run", "--profile"]
    return [
        ("unknown profile", run + ["nowhere"]),
        ("missing profile file", run + [str(work / "missing.yaml")]),
        ("profile not YAML", run + [str(work / "not-yaml.yaml")]),
        ("profile a list", run + [str(work / "a-list.yaml")]),
        ("name escaping the runs", run + [profile("escape", name="../../x")]),
        ("name with a slash", run + [profile("slash", name="a/b")]),
        ("player name with a slash", run + [profile("player", players=[player | {"name": "a/b"}])]),
        ("duplicate players", run + [profile("dup", players=[player, player])]),
        ("duplicate tasks", run + [profile("tasks", tasks=["sales", "sales"])]),
        ("unknown task", run + [profile("task", tasks=["cooking"])]),
        ("negative steps", run + [profile("steps", training__max_steps=-5)]),
        ("zero steps", run + [profile("zero", training__max_steps=0)]),
        ("negative anchors", run + [profile("anchors", anchors={"train": -1, "test": 2})]),
        ("too many anchors", run + [profile("many", anchors={"train": 5000, "test": 2})]),
        ("no voters", run + [profile("voters", audience__voters=0)]),
        ("temperature 5", run + [profile("temp", judge__temperature=5)]),
        ("top_p 2", run + [profile("topp", judge__top_p=2)]),
        ("unknown backend", run + [profile("backend", judge__backend="magic")]),
        ("unknown key", run + [profile("key", judge__colour="blue")]),
        ("no budget on a local model", run + [profile("budget", audience__max_tokens=None)]),
        ("a string for a number", run + [profile("string", seed="many")]),
        ("unknown parser", run + [profile("parser", audience__parser="loose")]),
        ("unknown stage", ["run", "--only", "cook"]),
        ("unknown forced stage", ["run", "--force", "cook"]),
        ("only and until", ["run", "--only", "probe", "--until", "compete"]),
        ("unknown task flag", ["run", "--task", "cooking"]),
        ("unknown model flag", ["run", "--model", "nobody"]),
        ("run folder of another profile", run + ["smoke", "--run-dir", str(other)]),
        ("run folder with no profile", ["run", "--run-dir", str(work / "empty-run")]),
        (
            "a stage before its inputs",
            [
                "run",
                "--only",
                "compete",
                "--run-dir",
                str(work / "fresh-run"),
                "--profile",
                "smoke",
            ],
        ),  # fmt: skip
        ("bad LLM mode", ["run", "--only", "prepare", "--run-dir", str(work / "mode-run")]),
    ]


def bad_input_campaign(work: Path) -> dict:
    from . import cli

    results = []
    for name, argv in bad_inputs(work):
        err = io.StringIO()
        env_mode = {"MOLOCH_LLM_MODE": "sometimes"} if name == "bad LLM mode" else {}
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                _environ(env_mode):  # fmt: skip
            try:
                code = cli.main(argv)
                traceback = False
            except SystemExit as exit:  # argparse's own usage errors
                code, traceback = exit.code, False
            except Exception:  # noqa: BLE001 - what the campaign counts
                code, traceback = None, True
        text = err.getvalue()
        lines = text.strip().splitlines()
        # The error's first line says what and what to do (a profile's keys follow it).
        first = lines[0] if lines else ""
        results.append({
            "input": name, "exit_code": code,
            "traceback": traceback or "Traceback (most recent call last)" in text,
            "error_line": first.startswith(("moloch: error:", "usage:")),
            "message": first if first.startswith("moloch") else lines[-1] if lines else "",
        })  # fmt: skip
    return {
        "inputs": len(results),
        "tracebacks": sum(r["traceback"] for r in results),
        "clean_errors": sum(r["exit_code"] in (1, 2) and r["error_line"] for r in results),
        "details": results,
    }


@contextlib.contextmanager
def _environ(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- 4, 5, 6. API faults, secrets, markup ----------------------------------------------------


def _api_seconds(folder: Path) -> float:
    total = 0.0
    for path in folder.rglob("manifest.json"):
        llm = json.loads(path.read_text()).get("llm") or {}
        total += sum(v.get("wall_seconds", 0.0) for k, v in llm.items() if k != "player")
    return total


def api_campaign(work: Path, cache: Path) -> dict:
    profile = suite_profile(work, "api", test=8, voters=4)
    runs = {}
    for label, rate in (("fault_free", 0.0), ("faulty", 0.3)):
        with FaultServer(fault_rate=rate, hang_s=1.0) as server:
            folder = work / f"api-{label}"
            proc = cli_run(profile, folder, environment(server, cache))
            _, err = proc.communicate(timeout=1800)
            runs[label] = {
                "folder": folder, "exit_code": proc.returncode, "stderr": err,
                "api_s": _api_seconds(folder), "faults": dict(server.faults),
            }  # fmt: skip
    same = outputs(runs["fault_free"]["folder"]) == outputs(runs["faulty"]["folder"])
    ratio = runs["faulty"]["api_s"] / max(runs["fault_free"]["api_s"], 1e-9)
    return {
        "fault_rate": 0.3,
        "faults_injected": runs["faulty"]["faults"],
        "exit_codes": {k: v["exit_code"] for k, v in runs.items()},
        "outputs_identical": same,
        "api_seconds": {k: round(v["api_s"], 2) for k, v in runs.items()},
        "api_time_ratio": round(ratio, 2),
        "stderr_tail": runs["faulty"]["stderr"].strip().splitlines()[-3:],
    }


def secret_campaign(work: Path) -> dict:
    found = []
    for path in work.rglob("*"):
        if path.is_file():
            with contextlib.suppress(OSError):
                if SECRET.encode() in path.read_bytes():
                    found.append(str(path.relative_to(work)))
    return {
        "files_searched": sum(1 for p in work.rglob("*") if p.is_file()),
        "secret_found": len(found),
        "where": found,
    }


def markup_campaign(work: Path, cache: Path) -> dict:
    from .report.__main__ import build
    from .report.checks import pdf_text
    from .runs import find_run

    profile = suite_profile(work, "markup", tasks=("sales", "elections", "social_media"))
    root = work / "book"
    root.mkdir(exist_ok=True)
    for part in ("_quarto.yml", "index.qmd", "chapters"):
        (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, root / part)
    books = {}
    for label, markup in (("clean", False), ("hostile", True)):
        with FaultServer(markup=markup) as server:
            folder = work / f"markup-{label}"
            if markup:  # the players' answers are the clean run's: reuse them (time only)
                folder.mkdir(parents=True, exist_ok=True)
                clean = find_run(run_dir=work / "markup-clean").cache_path
                with sqlite3.connect(clean) as src, sqlite3.connect(folder / clean.name) as dst:
                    src.backup(dst)
            proc = cli_run(profile, folder, environment(server, cache))
            proc.communicate(timeout=1800)
        old = dict(os.environ)
        os.environ["MOLOCH_CACHE"] = str(cache)
        try:
            out = build(find_run(run_dir=folder), root=root)
        finally:
            os.environ.clear()
            os.environ.update(old)
        html = {p.name: p.read_text() for p in sorted(out["html"].parent.glob("*.html"))}
        books[label] = {"html": html, "pdf": pdf_text(out["pdf"])}
        shutil.copytree(out["html"].parent, work / f"book-{label}")
    return markup_shown(books)


def markup_shown(books: dict) -> dict:
    """Whether each MARKUP string shows literally in the hostile book's HTML (escaped) and PDF
    text, compared with runs of white space folded (pandoc and Typst wrap lines anywhere),
    and whether the tables of contents equal the clean book's.
    ``books``: {"clean"|"hostile": {"html": {page name: text}, "pdf": text}}."""
    import html as html_lib

    page = " ".join(books["hostile"]["html"]["sales.html"].split())
    text_pdf = " ".join(books["hostile"]["pdf"].split())
    shown = 0
    details = []
    for item in MARKUP:
        literal_html = " ".join(html_lib.escape(item, quote=False).split()) in page
        in_pdf = " ".join(item.split()) in text_pdf
        shown += literal_html and in_pdf
        details.append({"markup": item, "literal_in_html": literal_html, "literal_in_pdf": in_pdf})

    def tocs(label: str) -> dict:
        pages = books[label]["html"].items()
        return {k: re.findall(r'<nav id="TOC".*?</nav>', v, re.S) for k, v in pages}

    return {
        "markup_kinds": len(MARKUP),
        "shown_literally": shown,
        "script_tag_live": "<script>alert(1)</script>" in page,
        "toc_unchanged": tocs("hostile") == tocs("clean"),
        "details": details,
    }


# --- the suite -------------------------------------------------------------------------------


CAMPAIGNS = ("bad_input", "api_faults", "markup", "corruption", "kills")


def run(kills: int, seed: int, keep: Path | None = None, only=CAMPAIGNS) -> dict:
    work = Path(tempfile.mkdtemp(prefix="moloch-faults-", dir=keep))
    cache = work / "cache"
    if (_user_cache() / "data").is_dir():  # the inputs, so nothing is fetched again
        shutil.copytree(_user_cache() / "data", cache / "data", dirs_exist_ok=True)
    report: dict = {"seed": seed, "machine": _machine()}
    started = time.monotonic()
    for name, campaign in (
        ("bad_input", lambda: bad_input_campaign(work)),
        ("api_faults", lambda: api_campaign(work, cache)),
        ("markup", lambda: markup_campaign(work, cache)),
        ("corruption", lambda: corruption_campaign(work, cache)),
        ("kills", lambda: kill_campaign(kills, work, cache, seed)),
    ):
        if name not in only:
            continue
        t = time.monotonic()
        report[name] = campaign()
        report[name]["time_s"] = round(time.monotonic() - t, 1)
        print(f"{name}: done in {report[name]['time_s']} s", flush=True)
    report["secrets"] = secret_campaign(work)
    report["time_s"] = round(time.monotonic() - started, 1)
    if keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _user_cache() -> Path:
    from .paths import cache_dir

    return cache_dir()


def _machine() -> dict:
    from .bench_runtime import machine

    return machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=20251007)
    parser.add_argument("--keep", type=Path, help="keep the work folders under this folder")
    parser.add_argument("--out", type=Path, default=runs_dir() / "bench" / "faults.json")
    parser.add_argument(
        "--only", help=f"comma-separated campaigns of {','.join(CAMPAIGNS)}, merged into --out"
    )
    args = parser.parse_args(argv)
    only = args.only.split(",") if args.only else CAMPAIGNS
    if unknown := set(only) - set(CAMPAIGNS):
        parser.error(f"unknown campaign(s) {sorted(unknown)}: choose from {', '.join(CAMPAIGNS)}")
    if args.kills < 1:
        parser.error(f"--kills must be at least 1, not {args.kills}")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    report = run(args.kills, args.seed, args.keep, only)
    if args.only and args.out.is_file():  # a rerun of some campaigns: keep the others' counts
        earlier = json.loads(args.out.read_text(encoding="utf-8"))
        secrets = earlier.get("secrets", {"files_searched": 0, "secret_found": 0, "where": []})
        report["secrets"] = {k: secrets[k] + report["secrets"][k] for k in secrets}
        report = {**earlier, **report, "time_s": earlier.get("time_s", 0) + report["time_s"]}
    write_atomic(args.out, json.dumps(report, indent=2, default=str) + "\n")
    missing = [name for name in CAMPAIGNS if name not in report]
    if missing:
        print(f"campaigns not run yet: {', '.join(missing)} (--only {','.join(missing)})")
        return 0

    def of(part: dict, count: str, total: str) -> str:
        return f"{part[count]} of {part[total]}"

    summary = {
        "kills resumed identically": of(report["kills"], "resumed_identically", "kills"),
        "orphan processes": report["kills"]["orphan_processes"],
        "Ctrl-C exit codes": report["kills"].get("sigint_exit_codes"),
        "leftover files": report["kills"]["leftover_files"],
        "corruption used silently": of(report["corruption"], "used_silently", "cases"),
        "bad inputs ending in a traceback": of(report["bad_input"], "tracebacks", "inputs"),
        "API outputs identical": report["api_faults"]["outputs_identical"],
        "API time ratio": report["api_faults"]["api_time_ratio"],
        "secret found": report["secrets"]["secret_found"],
        "markup shown literally": of(report["markup"], "shown_literally", "markup_kinds"),
    }
    for key, value in summary.items():
        print(f"{key}: {value}")
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
