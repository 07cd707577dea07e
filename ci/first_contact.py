"""The bookkeeping of ci/gpu-first-contact.sh: its one-screen summary, and what it reads from mpbench.

Standard library only, so that a summary is written even when mpbench, torch or CUDA is broken.

    python ci/first_contact.py summary DIR [BUDGET_S]  # DIR/summary.txt from steps.tsv, run.log, the records
    python ci/first_contact.py facts DIR     # "DEVICE_TYPE MACHINE" from DIR/env.json ("unknown unknown")
    python ci/first_contact.py modes DIR     # the registry's modes, comma-separated, from DIR/modes.txt

steps.tsv has one row per event of a step (started, ended, not run); the last row of a step wins.
Columns: see STEP_COLUMNS. A step's output is the byte range [log_from, log_to) of run.log, its
records the line range [rec_from, rec_to) of its records file, so one file holds every step's.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

STEP_COLUMNS = ("name", "state", "rc", "seconds", "log_from", "log_to", "records", "rec_from", "rec_to", "expect",
                "what", "note", "command")  # fmt: skip
FAILED = ("oom", "diverged", "error", "timeout")  # as suite.records.store.FAILED
GRID_STEPS = ("eager", "compiled", "fidelity")  # steps whose records make the mode grid
WIDTH = 118  # one screen: lines are cut to this


@dataclass
class Step:
    """The last known state of one step, from steps.tsv."""

    name: str
    state: str  # running | done | not run
    rc: str
    seconds: str
    log_from: int
    log_to: int
    records: str
    rec_from: int
    rec_to: int
    expect: list[str]
    what: str
    note: str
    command: str


def read_steps(folder: Path) -> list[Step]:
    """Steps in the order they first appear; each with its last row."""
    steps: dict[str, Step] = {}
    path = folder / "steps.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        cols = (line.split("\t") + [""] * len(STEP_COLUMNS))[: len(STEP_COLUMNS)]
        row = dict(zip(STEP_COLUMNS, cols, strict=True))
        steps[row["name"]] = Step(
            name=row["name"], state=row["state"], rc=row["rc"], seconds=row["seconds"],
            log_from=_int(row["log_from"]), log_to=_int(row["log_to"]), records=row["records"],
            rec_from=_int(row["rec_from"]), rec_to=_int(row["rec_to"]),
            expect=[m for m in row["expect"].split(",") if m], what=row["what"], note=row["note"],
            command=row["command"],
        )  # fmt: skip
    return list(steps.values())


def _int(text: str) -> int:
    return int(text) if text.strip().lstrip("-").isdigit() else 0


def step_log(folder: Path, step: Step) -> list[str]:
    """The lines this step wrote to run.log (to the end of the file while it runs)."""
    path = folder / "run.log"
    if not path.is_file():
        return []
    with path.open("rb") as f:
        f.seek(step.log_from)
        data = f.read() if step.state == "running" else f.read(max(step.log_to - step.log_from, 0))
    return data.decode(errors="replace").splitlines()


def step_records(folder: Path, step: Step) -> list[dict]:
    """The records this step appended (to the end of the file while it runs); broken lines skipped."""
    path = folder / step.records if step.records else None
    if path is None or not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    end = step.rec_to if step.state == "done" and step.rec_to >= step.rec_from else len(lines)
    out = []
    for line in lines[step.rec_from : end]:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill: the rest are still counted
    return out


def outcome(folder: Path, step: Step, records: list[dict], log: list[str]) -> str:
    """What the step produced: record counts, the doctor's verdicts, or the device found."""
    if step.records:
        ok = sum(r.get("status") == "ok" for r in records)
        skipped = sum(r.get("status") == "skipped" for r in records)
        failed = sum(r.get("status") in FAILED for r in records)
        text = f"{ok} ok, {skipped} skipped, {failed} failed"
        missing = [m for m in step.expect if m not in {r.get("mode") for r in records}]
        return text + (f", {len(missing)} not reached" if missing and step.state == "done" else "")
    for line in reversed(log):
        found = re.match(r"(\d+) failed, (\d+) passed, (\d+) cannot be checked here", line.strip())
        if found:
            return f"{found[2]} pass, {found[1]} FAIL, {found[3]} cannot check"
    if step.name == "env":
        env = read_env(folder)
        return f"{env.get('device', '?')}: {env.get('gpu_name') or env.get('cpu') or '?'}" if env else "-"
    if step.name == "modes":
        return f"{len(read_modes(folder))} modes" if read_modes(folder) else "-"
    return "-"


ERROR_LINE = re.compile(r"Traceback|Error\b|error:|^FAIL\b|Killed|Segmentation fault|core dumped")


def first_error(step: Step, records: list[dict], log: list[str]) -> str:
    """The first failed record's mode and reason; else the first error-looking line of a step that
    failed or was stopped; else its last line."""
    for r in records:
        if r.get("status") in FAILED:
            return f"{r.get('mode')}: {r.get('status')}: {r.get('reason')}"
    for line in log:
        if line.startswith("FAIL"):  # the doctor's failed checks
            return " ".join(line.split())
    if step.state != "done" or step.rc == "0":
        return ""
    lines = [line.strip() for line in log if line.strip()]
    found = next((line for line in lines if ERROR_LINE.search(line)), None)
    if found or step.note:  # a step stopped from outside says so in its note; its last line is no error
        return found or ""
    return lines[-1] if lines else "no output"


def read_env(folder: Path) -> dict:
    """`mpbench env`'s JSON, or {} when it is missing or broken."""
    try:
        return json.loads((folder / "env.json").read_text())
    except (OSError, ValueError):
        return {}


def read_modes(folder: Path) -> list[str]:
    """Mode names: the first word of each row under the rule of `mpbench modes`' table."""
    path = folder / "modes.txt"
    lines = path.read_text().splitlines() if path.is_file() else []
    rule = next((i for i, line in enumerate(lines) if line.startswith("---")), None)
    if rule is None:
        return []
    names = []
    for line in lines[rule + 1 :]:
        if not line.strip():
            break
        names.append(line.split()[0])
    return names


def machine(env: dict) -> str:
    """The GPU's name, else "cpu" and the CPU's, as a folder name (as baseline.machine_key)."""
    name = env.get("gpu_name") or (f"cpu {env['cpu']}" if env.get("cpu") else "unknown")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def grid(folder: Path, steps: list[Step]) -> list[str]:
    """One line per mode: its status in each of the eager, compiled and fidelity steps."""
    by_step = {s.name: {r.get("mode"): r.get("status") for r in step_records(folder, s)} for s in steps}
    shown = [name for name in GRID_STEPS if name in by_step]
    modes = list(dict.fromkeys([*read_modes(folder), *(m for name in shown for m in by_step[name])]))
    if not modes or not any(by_step[name] for name in shown):
        return []
    expected = {s.name: set(s.expect) for s in steps}
    lines = [f"{'mode':<16}" + "".join(f"{name:<12}" for name in shown)]
    for mode in modes:
        cells = []
        for name in shown:
            status = by_step[name].get(mode)
            cells.append(status or ("not reached" if mode in expected[name] else "-"))
        lines.append(f"{str(mode):<16}" + "".join(f"{c:<12}" for c in cells))
    return lines


def skip_reasons(folder: Path, steps: list[Step]) -> list[str]:
    """The modes the eager pass skipped, grouped by reason: what this machine cannot run."""
    by_reason: dict[str, list[str]] = {}
    for s in steps:
        if s.name == "eager":
            for r in step_records(folder, s):
                if r.get("status") == "skipped":
                    by_reason.setdefault(str(r.get("reason")), []).append(str(r.get("mode")))
    return [f"skipped: {', '.join(modes)}: {reason}" for reason, modes in by_reason.items()]


def summary(folder: Path, budget_s: str = "?") -> str:
    """The one-screen summary: header, one line per step (and its first error), the mode grid, notes."""
    env, steps = read_env(folder), read_steps(folder)
    used = sum(float(s.seconds) for s in steps if s.seconds.replace(".", "", 1).isdigit())
    where = env.get("gpu_name") or env.get("cpu") or "unknown machine"
    ran_as = next((s.command.rsplit(" env", 1)[0] for s in steps if s.name == "env" and s.command), "?")
    head = [
        f"mpbench first contact on {where} ({env.get('device', '?')}), torch {env.get('torch', '?')}, "
        f"CUDA {env.get('cuda')}, driver {env.get('driver')}, commit {str(env.get('git_commit'))[:10]}",
        f"steps took {used:.0f} s of a {budget_s} s budget; mpbench ran as: {ran_as}; output in run.log, "
        "commands in steps.tsv",
        f"folder: {folder}",
        "",
        f"{'step':<11} {'exit':>4} {'seconds':>7}  {'outcome':<40} what ran",
    ]
    body = []
    for s in steps:
        records, log = step_records(folder, s), step_log(folder, s)
        exit_code = {"running": "...", "not run": "-"}.get(s.state, s.rc)
        seconds = s.seconds if s.state == "done" else "-"
        result = s.note if s.state == "not run" else outcome(folder, s, records, log)
        body.append(f"{s.name:<11} {exit_code:>4} {seconds:>7}  {result:<40} {s.what}")
        error = first_error(s, records, log) if s.state != "not run" else ""
        note = s.note if s.state != "not run" else ""
        for extra in (note, error and f"first error: {error}"):
            if extra:
                body.append(f"{'':<11} ! {extra}")
    lines = [*head, *body]
    table = grid(folder, steps)
    if table:
        lines += ["", *table, *skip_reasons(folder, steps)]
    text = "\n".join(line[:WIDTH].rstrip() for line in lines) + "\n"
    return text + "".join(f"\n{line}" for line in finish(folder, steps))


def finish(folder: Path, steps: list[Step]) -> list[str]:
    """For each `mpbench run` step stopped before all its modes ran: the command that finishes it."""
    out = []
    for s in steps:
        done = {r.get("mode") for r in step_records(folder, s)}
        missing = [m for m in s.expect if m not in done]
        if s.state == "done" and missing and s.command and " run " in f" {s.command} ":
            out.append(f"{s.name}: not reached: {', '.join(missing)}; to finish, from the repository root:")
            out.append(f"  {s.command} --resume {folder / s.records}")
    return out


def write_summary(folder: Path, budget_s: str = "?") -> Path:
    """Write DIR/summary.txt whole (a reader never sees half of it)."""
    path = folder / "summary.txt"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(summary(folder, budget_s))
    os.replace(tmp, path)
    return path


def main(argv: list[str]) -> int:
    """summary DIR [BUDGET_S] | facts DIR | modes DIR."""
    if len(argv) not in (2, 3 if argv[:1] == ["summary"] else 2) or argv[0] not in ("summary", "facts", "modes"):
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[1])
    if argv[0] == "summary":
        write_summary(folder, *argv[2:])
    elif argv[0] == "facts":
        env = read_env(folder)
        device = str(env.get("device", "unknown")).split(":")[0]
        print(device, machine(env) if env else "unknown")
    else:
        print(",".join(read_modes(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
