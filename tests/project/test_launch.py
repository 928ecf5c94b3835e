"""Launch scripts (launch/): --dry-run output of every command, settings and errors, quoting, and
the commands themselves run against stand-ins for gcloud / srun / the trainer.

Nothing here needs gcloud, SLURM or a GPU: `gcloud`, `srun` and `python` are replaced by small
recorders on PATH (every dry-run also checks that none of them was called). The TPU test runs the
remote commands of train / status / stop in a local "worker home", with a fake trainer module and
pgrep/pkill limited to this test's processes; the SLURM test starts two real JAX processes that
form one cluster from SLURM_* variables, as the sbatch script sets them up.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_pod.sh"
SLURM = LAUNCH / "gpu_slurm.sbatch"
LOCAL = LAUNCH / "gpu_local.sh"
LAUNCHERS = [TPU, SLURM, LOCAL]  # the launch/ scripts: --dry-run and SORTED_JAX_WORKDIR
SCRIPTS = [*LAUNCHERS, *sorted((REPO / "bench").glob("*.sh"))]  # bench/ scripts: shellcheck too
TPU_COMMANDS = ["create", "setup", "train", "tail", "status", "stop", "delete"]
TRAIN = ["-m", "sorted_jax.train"]

# Settings a developer's shell may hold; every script run starts without them.
ENV_PREFIXES = ("TPU_", "SORTED_JAX_", "SLURM_", "SRUN_", "XLA_", "JAX_")
ENV_NAMES = ("CLOUDSDK_CORE_PROJECT", "DRY_RUN", "CUDA_VISIBLE_DEVICES", "PYTHON")

RECORDER = """#!{python}
import json, os, sys
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps({{"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:]}}) + "\\n")
"""


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake(tmp_path):
    """A bin dir with recorders for gcloud, srun and python; `fake.calls()` reads what ran."""

    class Fake:
        bin = tmp_path / "fakebin"
        log = tmp_path / "calls.jsonl"

        def calls(self):
            if not self.log.exists():
                return []
            return [json.loads(line) for line in self.log.read_text().splitlines()]

    Fake.bin.mkdir()
    for prog in ("gcloud", "srun", "python"):
        _write_exe(Fake.bin / prog, RECORDER.format(python=sys.executable))
    return Fake()


def script_env(fake, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(ENV_PREFIXES) and k not in ENV_NAMES}
    env["PATH"] = f"{fake.bin}{os.pathsep}{env.get('PATH', '')}"
    env["FAKE_CALLS"] = str(fake.log)
    env.update(extra)
    return env


def run(script: Path, *args: str, fake, env=None, cwd=None, check_rc: int | None = 0):
    proc = subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          env=script_env(fake, **(env or {})), cwd=cwd or REPO, timeout=120)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def printed(stdout: str) -> list[list[str]]:
    """The '+ ' lines as argv lists (each must be valid shell)."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def dry(script: Path, *args: str, fake, env=None, cwd=None) -> list[list[str]]:
    proc = run(script, "--dry-run", *args, fake=fake, env=env, cwd=cwd)
    assert fake.calls() == [], "a dry run ran something"
    return printed(proc.stdout)


def flag(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def remote(argv: list[str]) -> str:
    return flag(argv, "--command")


# ---------------------------------------------------------------------------------------------
# all scripts


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_executable_and_parses(script):
    assert os.access(script, os.X_OK), f"chmod +x {script}"
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    exe = shutil.which("shellcheck")
    if exe is None:
        if os.environ.get("SORTED_JAX_REQUIRE_SHELLCHECK"):  # CI (.ci/run): never skip
            pytest.fail("shellcheck is not installed, and .ci/run requires it")
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    proc = subprocess.run([exe, "--shell=bash", "--external-sources", str(script)],
                          capture_output=True, text=True)  # follows `source launch/quote.sh`
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", LAUNCHERS, ids=lambda p: p.name)
def test_help(script, fake):
    out = run(script, "--help", fake=fake).stdout
    assert "--dry-run" in out and "SORTED_JAX_WORKDIR" in out
    assert fake.calls() == []


# ---------------------------------------------------------------------------------------------
# TPU pod

SETTINGS = ["--name=soft-pod", "--project=my-proj", "--zone=us-central2-b",
            "--accelerator-type=v4-32", "--workdir=/mnt/bkt/soft_7b"]


def test_tpu_create(fake):
    (cmd,) = dry(TPU, *SETTINGS, "create", fake=fake)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "soft-pod"]
    assert flag(cmd, "--zone") == "us-central2-b"
    assert flag(cmd, "--project") == "my-proj"
    assert flag(cmd, "--accelerator-type") == "v4-32"
    assert flag(cmd, "--version") == "tpu-ubuntu2204-base"
    assert "--spot" not in cmd and "--preemptible" not in cmd
    (cmd,) = dry(TPU, *SETTINGS, "--spot", "create", fake=fake)
    assert "--spot" in cmd
    (cmd,) = dry(TPU, "create", *SETTINGS, "--preemptible", fake=fake)  # options after the command
    assert "--preemptible" in cmd
    run(TPU, "-n", *SETTINGS, "--spot", "--preemptible", "create", fake=fake, check_rc=2)


@pytest.mark.parametrize("accel, runtime", [
    ("v5p-8", "v2-alpha-tpuv5"), ("v5p-128", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v4-8", "tpu-ubuntu2204-base"),
])
def test_tpu_runtime_follows_accelerator(fake, accel, runtime):
    (cmd,) = dry(TPU, "--name=a", "--project=b", f"--accelerator-type={accel}", "create",
                 fake=fake)
    assert flag(cmd, "--version") == runtime
    (cmd,) = dry(TPU, "--name=a", "--project=b", f"--accelerator-type={accel}",
                 "--runtime-version", "tpu-vm-custom", "create", fake=fake)
    assert flag(cmd, "--version") == "tpu-vm-custom"


def test_tpu_defaults_and_environment(fake):
    (cmd,) = dry(TPU, "create", fake=fake, env={"TPU_NAME": "env-tpu", "TPU_PROJECT": "env-proj"})
    assert cmd[5] == "env-tpu" and flag(cmd, "--project") == "env-proj"
    assert flag(cmd, "--accelerator-type") == "v5p-8"
    assert flag(cmd, "--version") == "v2-alpha-tpuv5"
    assert flag(cmd, "--zone") == "us-east5-a"
    env = {"TPU_NAME": "env-tpu", "TPU_PROJECT": "env-proj", "TPU_ZONE": "europe-west4-b",
           "TPU_TYPE": "v6e-64", "TPU_RUNTIME": "rt-x", "TPU_SPOT": "1"}
    (cmd,) = dry(TPU, "create", fake=fake, env=env)
    assert (flag(cmd, "--zone"), flag(cmd, "--accelerator-type"), flag(cmd, "--version")) == (
        "europe-west4-b", "v6e-64", "rt-x")
    assert "--spot" in cmd
    (cmd,) = dry(TPU, "--name", "flag-tpu", "--zone=z", "create", fake=fake, env=env)  # flags win
    assert cmd[5] == "flag-tpu" and flag(cmd, "--zone") == "z"
    (cmd,) = dry(TPU, "create", fake=fake, env={"TPU_NAME": "t", "CLOUDSDK_CORE_PROJECT": "gp"})
    assert flag(cmd, "--project") == "gp"


@pytest.mark.parametrize("command", TPU_COMMANDS)
def test_tpu_every_command_targets_the_tpu(fake, command):
    cmds = [c for c in dry(TPU, *SETTINGS, command, fake=fake) if c[0] == "gcloud"]
    assert cmds, command
    for cmd in cmds:
        assert cmd[:4] == ["gcloud", "compute", "tpus", "tpu-vm"], cmd
        assert "soft-pod" in cmd or any(a.startswith("soft-pod:") for a in cmd), cmd
        assert flag(cmd, "--zone") == "us-central2-b"
        assert flag(cmd, "--project") == "my-proj"
        if cmd[4] in ("ssh", "scp"):
            assert flag(cmd, "--worker") == ("0" if command == "tail" else "all"), cmd


def test_tpu_placeholders_only_in_dry_run(fake):
    proc = run(TPU, "--dry-run", "train", fake=fake)
    (cmd,) = printed(proc.stdout)
    assert cmd[5] == "YOUR_TPU_NAME" and flag(cmd, "--project") == "YOUR_PROJECT"
    assert "--workdir=/mnt/YOUR_SHARED_DIR/" in remote(cmd)
    assert "TPU_NAME" in proc.stderr and "TPU_PROJECT" in proc.stderr
    for command in TPU_COMMANDS:
        proc = run(TPU, command, fake=fake, check_rc=2, env={"TPU_PROJECT": "p"})
        assert "the TPU name is not set: pass --name=NAME or set TPU_NAME" in proc.stderr
        proc = run(TPU, command, fake=fake, check_rc=2, env={"TPU_NAME": "n"})
        assert "project is not set: pass --project=PROJECT or set TPU_PROJECT" in proc.stderr
    proc = run(TPU, "--name=n", "--project=p", "train", fake=fake, check_rc=2)
    assert "workdir is not set: pass --workdir=DIR or set SORTED_JAX_WORKDIR" in proc.stderr
    proc = run(TPU, "--name=n", "--project=p", "--workdir=gs://b/run", "train", fake=fake,
               check_rc=2)
    assert "workdir 'gs://b/run' is a URL" in proc.stderr and "gcsfuse" in proc.stderr
    assert fake.calls() == []


@pytest.mark.parametrize("args, message", [
    ([], "no command given"),
    (["launch"], "unknown command 'launch'"),
    (["create", "delete"], "one command at a time"),
    (["--nope", "create"], "unknown option '--nope'"),
    (["--zone"], "--zone needs a value"),
    (["--zone=", "create"], "--zone needs a value"),
    (["create", "--", "--config.x=1"], "arguments after '--' are for 'train' only"),
    (["--env=1A=b", "train"], "--env needs KEY=VALUE"),
    (["--worker=x", "tail"], "--worker must be a worker number"),
    (["--ref=v1", "setup"], "--ref is for a git URL"),
])
def test_tpu_usage_errors(fake, args, message):
    proc = run(TPU, "-n", "--name=n", "--project=p", *args, fake=fake, check_rc=2)
    assert message in proc.stderr


def test_tpu_setup_copies_the_checkout(fake, tmp_path):
    pack, scp, ssh = dry(TPU, *SETTINGS, "setup", fake=fake)
    bar = pack.index("|")
    assert pack[:bar] == ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"]
    tgz = pack[-1]
    assert scp[4:7] == ["scp", tgz, "soft-pod:sorted_jax-src.tgz"]
    c = remote(ssh)
    assert "tar -xzf sorted_jax-src.tgz -C sorted_jax" in c
    assert "uv venv --python 3.12 .venv" in c
    assert "uv pip install --python .venv/bin/python --upgrade 'jax[tpu]' -e ." in c

    # The printed pipeline packs the repo's files and nothing git ignores.
    out = tmp_path / "src.tgz"
    line = shlex.join(pack[:bar]) + " | " + shlex.join([*pack[bar + 1:-1], str(out)])
    subprocess.run(["bash", "-o", "pipefail", "-c", line], check=True)
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "launch/tpu_pod.sh", "sorted_jax/__init__.py"} <= names
    assert not [n for n in names if n.startswith(".git/") or "__pycache__" in n
                or ".egg-info" in n]


def test_tpu_setup_from_git(fake):
    (ssh,) = dry(TPU, *SETTINGS, "--repo=https://github.com/org/sorted_jax.git", "--ref=v0.1",
                 "--remote-dir=sj", "--python=3.11", "setup", fake=fake)
    c = remote(ssh)
    assert "[ -d sj/.git ] || git clone --quiet https://github.com/org/sorted_jax.git sj" in c
    assert "git -C sj fetch --quiet https://github.com/org/sorted_jax.git v0.1" in c
    assert "git -C sj checkout --quiet --force FETCH_HEAD" in c
    assert "cd sj && " in c and "uv venv --python 3.11 .venv" in c
    assert "'jax[tpu]' -e ." in c


def test_tpu_train_tail_stop_lines(fake):
    extra = ["--config.init_from=/mnt/bkt/llama2-7b", "--config.data.train=/data/a b.json"]
    (ssh,) = dry(TPU, *SETTINGS, "--config=configs/soft_13b.py", "train", "--", *extra,
                 fake=fake)
    words = shlex.split(remote(ssh))
    i = words.index("nohup")
    j = words.index(">>", i)
    assert words[i:j] == ["nohup", "env", "PYTHONUNBUFFERED=1", ".venv/bin/python", *TRAIN,
                          "--config=configs/soft_13b.py", "--workdir=/mnt/bkt/soft_7b",
                          "--config.distributed.enabled=True", *extra]
    assert words[j:j + 5] == [">>", "train.log", "2>&1", "<", "/dev/null"]
    assert words[j + 5] == "&"
    assert words[:2] == ["cd", "sorted_jax"]

    (ssh,) = dry(TPU, *SETTINGS, "--log=/tmp/soft.log", "--worker=3", "tail", fake=fake)
    assert flag(ssh, "--worker") == "3"
    assert remote(ssh) == "cd sorted_jax && tail -n 100 -F /tmp/soft.log"

    (ssh,) = dry(TPU, *SETTINGS, "stop", fake=fake)
    c = remote(ssh)
    assert "pkill -TERM -f " in c and "KILL" not in c and "-9" not in c
    assert "-ge 900" in c  # waits for the checkpoint


def test_tpu_printed_lines_are_what_runs(fake):
    """Without --dry-run the same argv reaches gcloud, word for word."""
    args = [*SETTINGS, "--env=HF_HOME=/mnt/hf cache", "train", "--", "--config.exits=12,16",
            "--config.data.train=/d/it's here.json", ""]
    want = dry(TPU, *args, fake=fake)
    run(TPU, *args, fake=fake)
    assert [c["argv"] for c in fake.calls()] == [w[1:] for w in want]
    for command in ("create", "tail", "status", "stop", "delete"):
        fake.log.unlink()
        want = dry(TPU, *SETTINGS, "--spot", command, fake=fake)
        run(TPU, *SETTINGS, "--spot", command, fake=fake)
        assert [c["argv"] for c in fake.calls()] == [w[1:] for w in want]


FAKE_GCLOUD = """#!{python}
# gcloud stand-in: records argv; `tpu-vm ssh --command=C` runs C with bash in $FAKE_WORKER_HOME.
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps({{"prog": "gcloud", "argv": args}}) + "\\n")
if args[3] == "ssh":
    command = [a for a in args if a.startswith("--command=")][0].split("=", 1)[1]
    sys.exit(subprocess.call(["bash", "-c", command], cwd=os.environ["FAKE_WORKER_HOME"]))
"""

FAKE_TRAINER = """
import json, os, signal, sys, time
out = os.environ["FAKE_TRAIN_OUT"]
def on_term(*_):
    with open(out + ".signal", "w") as f:
        f.write("TERM")
    print("checkpoint saved", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
with open(out + ".json", "w") as f:
    json.dump({"argv": sys.argv[1:], "pid": os.getpid(), "cwd": os.getcwd(),
               "env": {k: os.environ.get(k) for k in ("PYTHONUNBUFFERED", "HF_HOME")}}, f)
print("fake trainer running", flush=True)
for _ in range(600):
    time.sleep(0.1)
"""

# pgrep / pkill limited to processes that carry this test's token in their environment, so the
# test never sees (or signals) anything it did not start. Same regex, same exit codes.
SCOPED_PGREP = """#!{python}
import os, re, signal, sys
kill = os.path.basename(sys.argv[0]) == "pkill"
show, sig, pattern = False, signal.SIGTERM, None
for a in sys.argv[1:]:
    if a in ("-f", "-af", "-fa", "-a"):
        show = show or "a" in a
    elif kill and a.startswith("-"):
        sig = getattr(signal, "SIG" + a[1:])
    else:
        pattern = a
token = ("LAUNCH_TEST_TOKEN=" + os.environ["LAUNCH_TEST_TOKEN"]).encode()
hits = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) == os.getpid():
        continue
    try:
        cmdline = open(f"/proc/{{pid}}/cmdline", "rb").read()
        environ = open(f"/proc/{{pid}}/environ", "rb").read().split(b"\\0")
    except OSError:
        continue
    line = cmdline.replace(b"\\0", b" ").decode(errors="replace").strip()
    if token in environ and line and re.search(pattern, line):
        hits.append((int(pid), line))
for pid, line in hits:
    if kill:
        os.kill(pid, sig)
    else:
        print(f"{{pid}} {{line}}" if show else pid)
sys.exit(0 if hits else 1)
"""


def test_tpu_remote_commands_run(fake, tmp_path):
    """train / status / stop executed for real in a local 'worker': argv, log, TERM, wait."""
    home = tmp_path / "worker"
    pkg = home / "sorted_jax" / "sorted_jax"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(FAKE_TRAINER)
    venv = home / "sorted_jax" / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(sys.executable)
    _write_exe(fake.bin / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    for prog in ("pgrep", "pkill"):
        _write_exe(fake.bin / prog, SCOPED_PGREP.format(python=sys.executable))
    out = tmp_path / "trainer"
    env = {"FAKE_WORKER_HOME": str(home), "FAKE_TRAIN_OUT": str(out),
           "LAUNCH_TEST_TOKEN": uuid.uuid4().hex}
    extra = ["--config.exits=12,16", "--config.data.train=/d/it's here.json"]
    base = ["--name=t", "--project=p", "--workdir=/mnt/b/run 1", "--stop-timeout=30"]
    started = None
    try:
        proc = run(TPU, *base, "--env=HF_HOME=/mnt/hf cache", "train", "--", *extra,
                   fake=fake, env=env)
        assert "started pid" in proc.stdout
        for _ in range(200):
            if out.with_suffix(".json").exists():
                break
            time.sleep(0.05)
        started = json.loads(out.with_suffix(".json").read_text())
        assert started["argv"] == ["--config=configs/soft_7b.py", "--workdir=/mnt/b/run 1",
                                   "--config.distributed.enabled=True", *extra]
        assert started["env"] == {"PYTHONUNBUFFERED": "1", "HF_HOME": "/mnt/hf cache"}
        assert Path(started["cwd"]) == home / "sorted_jax"

        proc = run(TPU, *base, "train", fake=fake, env=env, check_rc=1)
        assert "already running; stop it first" in proc.stderr
        proc = run(TPU, *base, "status", fake=fake, env=env)
        assert f"{started['pid']} .venv/bin/python -m sorted_jax.train" in proc.stdout

        proc = run(TPU, *base, "stop", fake=fake, env=env)
        assert "sent SIGTERM" in proc.stdout and "stopped" in proc.stdout
        assert out.with_suffix(".signal").read_text() == "TERM"
        started = None
        assert "not running" in run(TPU, *base, "status", fake=fake, env=env).stdout
        assert "not running" in run(TPU, *base, "stop", fake=fake, env=env).stdout
        log = (home / "sorted_jax" / "train.log").read_text()
        assert "sorted_jax.train start" in log
        assert "fake trainer running" in log and "checkpoint saved" in log
    finally:
        if started is not None:  # only the fake trainer this test started
            try:
                os.kill(started["pid"], 9)
            except ProcessLookupError:
                pass


def test_tpu_process_pattern_skips_the_remote_shell(fake):
    """The real pgrep: the shell whose command line names the module is not a match."""
    pgrep = shutil.which("pgrep")
    if pgrep is None:
        pytest.skip("no pgrep")
    (ssh,) = dry(TPU, "--name=n", "--project=p", "status", fake=fake)
    words = shlex.split(remote(ssh))
    pattern = words[words.index("-af") + 1]
    shell = ("echo .venv/bin/python -m sorted_jax.train >/dev/null; "
             f"{pgrep} -f {shlex.quote(pattern)}; echo self=$$")
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True).stdout
    *pids, self_line = out.split()
    assert self_line.startswith("self=") and self_line[5:] not in pids


# ---------------------------------------------------------------------------------------------
# SLURM


def sbatch_header() -> dict[str, str]:
    lines = [ln.split(None, 1)[1] for ln in SLURM.read_text().splitlines()
             if ln.startswith("#SBATCH ")]
    return dict((*ln.split("=", 1), "")[:2] for ln in lines)


def test_slurm_header():
    h = sbatch_header()
    assert h["--ntasks-per-node"] == "1"
    assert int(h["--nodes"]) >= 2 and int(h["--gpus-per-node"]) >= 1
    assert h["--time"] and h["--output"] and h["--job-name"]
    assert "--exclusive" in h
    assert h["--signal"].startswith("TERM@")  # checkpoint before the time limit


def exports(stdout: str) -> dict[str, str]:
    return dict(c[1].split("=", 1) for c in printed(stdout) if c[0] == "export")


def test_slurm_one_process_per_node(fake):
    proc = run(SLURM, "--dry-run", "--workdir=/shared/ckpt/soft 7b", "--config.optim.lr=1e-5",
               fake=fake, env={"SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "1",
                               "SLURM_JOB_NUM_NODES": "3", "SLURM_CPUS_PER_TASK": "32"})
    assert fake.calls() == []
    cmds = printed(proc.stdout)
    assert cmds[-1] == ["srun", "--kill-on-bad-exit=1", "python", *TRAIN,
                        "--config=configs/soft_7b.py", "--workdir=/shared/ckpt/soft 7b",
                        "--config.distributed.enabled=True", "--config.optim.lr=1e-5"]
    env = exports(proc.stdout)
    assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
    assert env["SRUN_CPUS_PER_TASK"] == "32"
    assert env["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true"
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert "3 node(s), one process per node owning its 4 GPUs" in proc.stderr


def test_slurm_one_process_per_gpu(fake):
    proc = run(SLURM, "-n", "--workdir", "/w", fake=fake,
               env={"SLURM_GPUS_PER_NODE": "h100:8", "SLURM_NTASKS_PER_NODE": "8",
                    "XLA_FLAGS": "", "XLA_PYTHON_CLIENT_MEM_FRACTION": ".8"})
    env = exports(proc.stdout)
    assert "JAX_LOCAL_DEVICE_IDS" not in env  # JAX picks GPU $SLURM_LOCALID itself
    assert "XLA_FLAGS" not in env and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env  # user's own
    assert printed(proc.stdout)[-1][0] == "srun"
    proc = run(SLURM, "-n", "--workdir=/w", fake=fake, check_rc=2,
               env={"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "2"})
    assert "use 1 (one process per node) or 8 (one process per GPU)" in proc.stderr


def test_slurm_settings_from_environment(fake, tmp_path):
    env = {"DRY_RUN": "1", "SORTED_JAX_CONFIG": "configs/soft_13b.py",
           "SORTED_JAX_WORKDIR": "/shared/w", "PYTHON": "/opt/venv/bin/python",
           "SORTED_JAX_TRAIN_ARGS": "--config.exits=12,40 --config.optim.lr=1e-5",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(REPO)}
    proc = run(SLURM, fake=fake, env=env, cwd=tmp_path)  # cwd: a copied script's spool dir
    assert fake.calls() == []
    assert printed(proc.stdout)[-1] == [
        "srun", "--kill-on-bad-exit=1", "/opt/venv/bin/python", *TRAIN,
        f"--config={REPO}/configs/soft_13b.py", "--workdir=/shared/w",
        "--config.distributed.enabled=True", "--config.exits=12,40", "--config.optim.lr=1e-5"]
    proc = run(SLURM, "--config", "/abs/c.py", "--workdir=/x", "--", "--config.a=1", fake=fake,
               env=env)
    assert printed(proc.stdout)[-1][5:] == ["--config=/abs/c.py", "--workdir=/x",
                                             "--config.distributed.enabled=True",
                                             "--config.exits=12,40", "--config.optim.lr=1e-5",
                                             "--config.a=1"]


def test_slurm_missing_settings(fake):
    proc = run(SLURM, fake=fake, check_rc=2, env={"SLURM_GPUS_ON_NODE": "8"})
    assert "the workdir is not set: pass --workdir=DIR" in proc.stderr
    proc = run(SLURM, "--workdir=/w", fake=fake, check_rc=2)
    assert "cannot tell the GPUs per node" in proc.stderr
    assert fake.calls() == []


def test_slurm_printed_line_is_what_runs(fake):
    args = ["--workdir=/shared/a b", "--config.data.train=/d/it's.json"]
    env = {"SLURM_GPUS_ON_NODE": "2", "SLURM_NTASKS_PER_NODE": "1"}
    want = dry(SLURM, *args, fake=fake, env=env)
    run(SLURM, *args, fake=fake, env=env)
    assert [c["argv"] for c in fake.calls()] == [want[-1][1:]]


FAKE_SRUN = """#!{python}
# srun stand-in: starts $SLURM_NTASKS copies of the program on this host with the SLURM_* variables
# a real step gives them (LOCALID 0 for all when one task per node, else the task index).
import os, subprocess, sys
args = sys.argv[1:]
while args[0].startswith("--"):
    args.pop(0)
n = int(os.environ["SLURM_NTASKS"])
per_node = int(os.environ["SLURM_NTASKS_PER_NODE"])
procs = []
for i in range(n):
    env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i % per_node),
               SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES=str(n // per_node))
    procs.append(subprocess.Popen(args, env=env))
sys.exit(max(p.wait(timeout=120) for p in procs))
"""

# Stands in for `python -m sorted_jax.train ...`: what jax.distributed.initialize() makes of it.
FAKE_PYTHON = """#!{python}
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(initialization_timeout=60)
with open(os.environ["PROBE_OUT"] + f".{{jax.process_index()}}.json", "w") as f:
    json.dump({{"argv": sys.argv[1:], "process_count": jax.process_count(),
               "devices": jax.device_count(),
               "visible": jax.config.values["jax_cuda_visible_devices"]}}, f)
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("per_node", [1, 2], ids=["process-per-node", "process-per-gpu"])
def test_slurm_jax_cluster_from_srun(fake, tmp_path, per_node):
    """Two JAX processes started the way the sbatch script starts them form one cluster, and
    each owns the GPUs the layout promises (all of the node's, or GPU SLURM_LOCALID)."""
    pytest.importorskip("jax")
    _write_exe(fake.bin / "srun", FAKE_SRUN.format(python=sys.executable))
    probe = _write_exe(tmp_path / "probe_python", FAKE_PYTHON.format(python=sys.executable))
    out = tmp_path / "probe"
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": str(per_node),
           "SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_NUM_NODES": str(2 // per_node),
           "JAX_COORDINATOR_PORT": str(_free_port()), "PYTHON": str(probe),
           "PROBE_OUT": str(out), "JAX_PLATFORMS": "cpu"}
    run(SLURM, "--workdir=/shared/w", fake=fake, env=env)
    results = [json.loads(out.with_suffix(f".{i}.json").read_text()) for i in range(2)]
    for i, r in enumerate(results):
        assert r["argv"] == [*TRAIN, "--config=configs/soft_7b.py", "--workdir=/shared/w",
                             "--config.distributed.enabled=True"]
        assert r["process_count"] == 2 and r["devices"] == 2
        assert r["visible"] == ("0,1" if per_node == 1 else str(i))


# ---------------------------------------------------------------------------------------------
# one GPU host


def test_local_dry_run(fake, tmp_path):
    proc = run(LOCAL, "--dry-run", "--workdir=runs/soft 7b", "--gpus=0,1,2,3", "--mesh",
               "1,-1,1", "--", "--config.batch_size=32", fake=fake)
    assert fake.calls() == []
    cmds = printed(proc.stdout)
    assert cmds[-1] == ["python", *TRAIN, "--config=configs/soft_7b.py", "--workdir=runs/soft 7b",
                        "--config.mesh.shape=1,-1,1", "--config.batch_size=32"]
    assert not any("distributed" in a for a in cmds[-1])  # one process: no jax.distributed
    env = exports(proc.stdout)
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90",
                   "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true"}
    # From another directory the default config is the repo's; env settings; user's XLA env wins.
    proc = run(LOCAL, fake=fake, cwd=tmp_path, env={
        "DRY_RUN": "1", "SORTED_JAX_WORKDIR": "/w", "SORTED_JAX_MESH": "2,-1,1",
        "SORTED_JAX_TRAIN_ARGS": "--config.exits=12,32", "XLA_FLAGS": "--xla_dump_to=/tmp/d",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"})
    assert printed(proc.stdout)[-1] == ["python", *TRAIN, f"--config={REPO}/configs/soft_7b.py",
                                        "--workdir=/w", "--config.mesh.shape=2,-1,1",
                                        "--config.exits=12,32"]
    assert exports(proc.stdout) == {}


@pytest.mark.parametrize("args, message", [
    ([], "the workdir is not set: pass --workdir=DIR or set SORTED_JAX_WORKDIR"),
    (["--workdir=w", "--mesh=8"], "--mesh takes data,fsdp,tensor sizes"),
    (["--workdir=w", "--gpus=all"], "--gpus takes GPU indices"),
    (["--workdir"], "--workdir needs a value"),
])
def test_local_errors(fake, args, message):
    proc = run(LOCAL, *args, fake=fake, check_rc=2)
    assert message in proc.stderr
    assert fake.calls() == []


def test_local_printed_line_is_what_runs(fake):
    args = ["--workdir=/tmp/a b", "--mesh=1,-1,1", "--config.data.train=/d/it's.json"]
    want = dry(LOCAL, *args, fake=fake)
    run(LOCAL, *args, fake=fake)
    assert [c["argv"] for c in fake.calls()] == [want[-1][1:]]


def test_suggested_xla_flags_exist():
    """Every XLA flag the GPU scripts set or suggest is known to the installed jaxlib (XLA
    aborts on an unknown one, and flags come and go between releases)."""
    pytest.importorskip("jax")
    found = set()
    for script in (SLURM, LOCAL):
        for word in script.read_text().split():
            if word.startswith("--xla_"):
                found.add(word.rstrip(")"))
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in found
    env = dict(os.environ, XLA_FLAGS=" ".join(sorted(found)), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
