"""A tenant's python grader in its sandbox: it grades, and everything reaching outside its own process
(files, network, processes, signals, the server's environment) fails; a grader that hangs, or dies,
costs its sample, and a fresh process grades the rest."""

from __future__ import annotations

import os

import pytest

from kubetune.graders.sandbox import SandboxLimits, check_python, run_python, sandbox_problem

LIMITS = SandboxLimits(seconds=1.0, memory_mb=1024)
CASES = [({"output_text": "4"}, {"answer": "4"}), ({"output_text": "5"}, {"answer": "4"})]


def _grade(body: str, cases: list = CASES, head: str = "") -> list:
    source = f"{head}\ndef grade(sample, item):\n" + "".join(f"    {line}\n" for line in body.splitlines())
    return run_python(source, cases, LIMITS)


def test_the_sandbox_loads_here() -> None:
    assert sandbox_problem() is None


def test_a_grader_grades_with_the_libraries_it_is_offered() -> None:
    out = _grade("return float(np.isclose(float(sample['output_text']), float(item['answer'])))",
                 head="import numpy as np\nfrom rapidfuzz import fuzz\nimport json, re, math")
    assert [o.score for o in out] == [1.0, 0.0] and all(o.kind is None for o in out)


@pytest.mark.parametrize("body", [
    "return len(open('/etc/passwd').read())",                      # files
    "import os\nreturn len(os.listdir('/'))",
    "import os\nreturn os.stat('/etc/passwd').st_size",           # not even whether a file is there
    "import ctypes\nlibc = ctypes.CDLL(None)\nfd = libc.syscall(41, 2, 1, 0)\n"  # socket(AF_INET, SOCK_STREAM)
    "assert fd >= 0, 'no socket'\nreturn 1",
    "import os\nos.fork()\nreturn 1",                              # processes
    "import os\nos.kill(os.getppid(), 9)\nreturn 1",               # the trainer that started it
    "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nreturn 1",
    "import threading\nthreading.Thread(target=print).start()\nreturn 1",
    "return len(bytearray(8 << 30))",                             # memory
])
def test_whatever_reaches_outside_the_process_fails_and_the_grader_scores_nothing(body: str) -> None:
    out = _grade(body, CASES[:1])
    assert out[0].score is None and out[0].kind == "python_grader_runtime_error", out
    assert os.path.exists("/etc/passwd")  # (and this process is alive)


def test_the_servers_environment_is_not_the_graders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    out = _grade("import os\nreturn float(any('do-not-leak' in v for v in os.environ.values()) or "
                 "'AWS_SECRET_ACCESS_KEY' in os.environ)", CASES[:1])
    assert out[0].score == 0.0


def test_a_grader_that_hangs_costs_its_sample_and_the_rest_are_graded() -> None:
    cases = [({"output_text": "a"}, {}), ({"output_text": "hang"}, {}), ({"output_text": "b"}, {})]
    out = _grade("while sample['output_text'] == 'hang':\n    pass\nreturn 1.0", cases)
    assert [o.score for o in out] == [1.0, None, 1.0] and out[1].kind == "unresponsive_reward_error"


def test_a_grader_that_dies_costs_its_sample_and_the_rest_are_graded() -> None:
    cases = [({"output_text": "a"}, {}), ({"output_text": "die"}, {}), ({"output_text": "b"}, {})]
    out = _grade("if sample['output_text'] == 'die':\n    import ctypes\n    ctypes.string_at(0)\nreturn 1.0", cases)
    assert [o.score for o in out] == [1.0, None, 1.0] and "SIGSEGV" in str(out[1].detail)


def test_a_grader_that_always_hangs_is_given_up_on() -> None:
    cases = [({"output_text": str(i)}, {}) for i in range(20)]
    out = _grade("while True:\n    pass", cases)  # 4 processes (3 restarts) time out; the rest are not tried
    assert [o.kind for o in out[:4]] == ["unresponsive_reward_error"] * 4
    assert all(o.score is None for o in out) and "not graded" in str(out[-1].detail)


def test_printing_and_writing_to_stdout_do_not_forge_results() -> None:
    out = _grade("print('x' * 100000)\nimport os\nos.write(1, b'{\"i\": 1, \"score\": 99}\\n')\nreturn 0.5", CASES)
    assert [o.score for o in out] == [0.5, 0.5]


def test_what_a_grader_returns_must_be_a_finite_number() -> None:
    assert _grade("return float('nan')", CASES[:1])[0].kind == "python_grader_runtime_error"
    assert _grade("return 'high'", CASES[:1])[0].kind == "python_grader_runtime_error"


def test_loading_reports_syntax_errors_missing_grade_and_imports_that_are_not_there() -> None:
    assert check_python("def grade(sample, item):\n    return 1\n", LIMITS) is None
    assert "SyntaxError" in str(check_python("def grade(sample, item) return 1", LIMITS))
    assert "no function grade" in str(check_python("x = 1", LIMITS))
    assert "No module named 'socket'" in str(check_python("import socket\ndef grade(s, i):\n    return 1", LIMITS))
    assert "Operation not permitted" in str(check_python("open('/etc/passwd')\ndef grade(s, i):\n    return 1",
                                                         LIMITS))


@pytest.mark.parametrize("line", [b"[" * 60000, b'{"i": 0, "score": ' + b"9" * 400 + b"}", b'{"i": 0, "score": NaN}',
                                  b'{"i": 0, "score": -Infinity}'])
def test_lines_the_grader_forges_on_the_result_pipe_never_crash_the_caller_or_score_nan(line: bytes) -> None:
    out = _grade(f"import os\nos.write(3, {line!r} + b'\\n')\nreturn 0.5", CASES[:1])
    assert out[0].score in (0.5, None) and (out[0].score is not None or out[0].kind), out


def test_other_processes_cannot_be_probed() -> None:
    assert _grade("import os\nreturn len(os.sched_getaffinity(os.getppid()))", CASES[:1])[0].score is None
    assert _grade("import os\nreturn len(os.sched_getaffinity(0))", CASES[:1])[0].score >= 1
