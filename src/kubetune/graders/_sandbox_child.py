"""The process a tenant's `python` grader runs in — started by sandbox.py as `python -I THIS_FILE LIMITS`
with an empty environment, in an empty directory, with only stdin/stdout/stderr open.

Order matters: limits are set and the modules a grader may use are imported first, while files can
still be read; the request (grader source and samples) is read from stdin; then a seccomp filter is
loaded that denies every system call a running grader does not need — no open (no files, no further
imports), no socket, no fork/exec, no signals to other processes, no ptrace, no new signal handlers.
Only then does the tenant's code run. It imports nothing of kubetune: nothing of the server is in
this interpreter's memory.

The first line on stdout is {"loaded": true}, or {"fatal": "..."} for a grader that cannot load;
then one JSON line per sample: {"i": N, "score": X} or {"i": N, "error": "..."}. What the grader prints goes to stderr.
"""

import json
import os
import resource
import sys

# The standard library a grader commonly uses, and those of OpenAI's python-grader packages that load
# fast (sympy, pandas, nltk take 0.3-1.4 s a process); a grader cannot import anything else.
PRELOAD = ("json", "math", "re", "string", "collections", "itertools", "functools", "statistics", "decimal",
           "fractions", "datetime", "difflib", "unicodedata", "random", "operator", "typing", "dataclasses",
           "textwrap", "heapq", "bisect", "copy", "enum", "numpy", "rapidfuzz", "rapidfuzz.fuzz",
           "rapidfuzz.distance", "yaml", "jsonschema")

# The system calls a grader needs once loaded: memory, its own pipes, time, randomness, exit.
ALLOWED = ("read", "mmap", "munmap", "mremap", "mprotect", "brk", "madvise", "rt_sigprocmask", "rt_sigreturn",
           "sigaltstack", "futex", "exit", "exit_group", "getrandom",
           "nanosleep", "gettimeofday", "getpid", "gettid", "getuid", "geteuid", "getgid",
           "getegid", "sched_yield", "getrusage", "times", "fstat", "lseek", "close", "restart_syscall")


RESULTS = 1  # moved off stdout before the grader runs: what it prints, even to fd 1, is not a result


def _emit(record: dict) -> None:
    data = (json.dumps(record) + "\n").encode()
    while data:
        data = data[os.write(RESULTS, data):]


def _limits(memory: int, cpu: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at cpu, SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _confine() -> None:
    import pyseccomp as seccomp

    flt = seccomp.SyscallFilter(seccomp.ERRNO(1))  # anything else: EPERM
    for name in ALLOWED:
        try:
            flt.add_rule(seccomp.ALLOW, name)
        except (OSError, ValueError):  # a call this architecture does not have
            pass
    for fd in (1, 2, RESULTS):  # write only to the result pipe and stderr (fd 1 is stderr by now)
        flt.add_rule(seccomp.ALLOW, "write", seccomp.Arg(0, seccomp.EQ, fd))
    # stat of an open descriptor (glibc's fstat is newfstatat(fd, "", AT_EMPTY_PATH)), never of a path
    flt.add_rule(seccomp.ALLOW, "newfstatat", seccomp.Arg(3, seccomp.MASKED_EQ, 0x1000, 0x1000))
    flt.add_rule(seccomp.ALLOW, "prlimit64", seccomp.Arg(0, seccomp.EQ, 0), seccomp.Arg(2, seccomp.EQ, 0))  # own, read
    flt.add_rule(seccomp.ALLOW, "sched_getaffinity", seccomp.Arg(0, seccomp.EQ, 0))  # its own CPUs only
    for clock in ("clock_gettime", "clock_getres", "clock_nanosleep"):  # the fixed clocks, not other processes' CPU
        flt.add_rule(seccomp.ALLOW, clock, seccomp.Arg(0, seccomp.LT, 16))
    flt.load()


def main() -> None:
    limits = json.loads(sys.argv[1])
    _limits(int(limits["memory"]), int(limits["cpu"]))
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception:  # not installed here, or fails to import: a grader that uses it fails at import
            pass
    request = json.loads(sys.stdin.buffer.read())
    try:
        code = compile(request["source"], "<grader>", "exec")
    except (SyntaxError, ValueError) as exc:
        _emit({"fatal": f"{type(exc).__name__}: {exc}"})
        return
    global RESULTS
    RESULTS = os.dup(1)
    os.dup2(2, 1)  # print() and os.write(1) in a grader are its log, not results
    sys.stdout = sys.stderr
    _confine()
    namespace: dict = {"__name__": "grader", "__builtins__": __builtins__}
    try:
        exec(code, namespace)
        grade = namespace.get("grade")
        if not callable(grade):
            raise TypeError("the source defines no function grade(sample, item)")
    except BaseException as exc:  # the tenant's code: anything it raises is its error
        _emit({"fatal": f"{type(exc).__name__}: {exc}"[:1000]})
        return
    _emit({"loaded": True})
    for i, case in enumerate(request["samples"]):
        try:
            score = float(grade(case["sample"], case["item"]))
            _emit({"i": i, "score": score} if score == score and abs(score) != float("inf")
                  else {"i": i, "error": f"grade returned {score}, not a finite number"})
        except BaseException as exc:
            _emit({"i": i, "error": f"{type(exc).__name__}: {exc}"[:1000]})


if __name__ == "__main__":
    main()
