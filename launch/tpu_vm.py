"""Run a trainer on a Cloud TPU VM pod (one slice) or on several slices over DCN, with gcloud.

  python -m launch.tpu_vm create --name gemma --zone us-west4-a --accelerator-type v5litepod-256
  python -m launch.tpu_vm setup  --name gemma --zone us-west4-a
  python -m launch.tpu_vm run    --name gemma --zone us-west4-a [--detach] -- \
      python -m trainers.pretrain --config configs/gemma_2b.py --workdir /mnt/ckpt/gemma_2b ...
  python -m launch.tpu_vm logs | stop | status | delete --name gemma --zone us-west4-a

Every command takes --dry-run: it prints the gcloud commands instead of running them (each
is built as an argument list first, see `plan`). One host = one worker VM of a slice; every
worker runs the same trainer command (`--worker=all`), which joins the job with
`--distributed` (added when missing): JAX reads the pod's layout from the TPU metadata.

- create: a TPU VM (`gcloud compute tpus tpu-vm create`), or with --queued or --slices N > 1 a
  queued resource (`gcloud compute tpus queued-resources create`, N nodes named NAME-0 ...;
  multi-slice jobs must use queued resources). `status` shows when it is ACTIVE.
- setup: this checkout's files (git's tracked and untracked-but-not-ignored ones, uncommitted
  edits included) are packed, copied to every worker and unpacked into ~/gemma-jax, or
  `--source git+URL[@REF]` is fetched there; then --install runs in it (default: a Python
  3.11 venv made by uv, with this package and jax[tpu]; a second setup reuses the venv).
- run: the command on every worker of every slice, in ~/gemma-jax with the venv's python,
  PYTHONUNBUFFERED=1, LIBTPU_INIT_ARGS set to MaxText's v5e flags for asynchronous, fused and
  overlapped collectives (launch.libtpu_flags; `--env LIBTPU_INIT_ARGS=...` replaces them,
  an empty value keeps libtpu's defaults) and each --env KEY=VALUE; with --slices N the command gets
  --config.mesh.dcn_data=N unless it sets a mesh.dcn_* key itself (the MEGASCALE_* variables
  that multi-slice JAX needs are set by the TPU runtime of a multi-node queued resource).
  Without --detach the output of all workers streams here and ends with the job; with it the
  job runs under nohup, writing ~/gemma-jax/run.log (`logs` follows worker 0's, where process
  0 prints the metrics) and its pid to ~/gemma-jax/run.pid (`stop` sends it SIGTERM: every
  host saves a checkpoint at the same step and exits). A trainer stopped by SIGTERM (`stop`,
  or a preemption) exits with status 75 (gemma_jax.exits.EXIT_PREEMPTED), which `run` passes
  on with a note: the job is resumable by running the same command again.
- delete: the VM, or the queued resource with its nodes.

The workdir must be one file system seen by every worker (a gcsfuse-mounted bucket or NFS at the
same path); the trainer refuses one that is not. Data and tokenizer paths must exist on every
worker too.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from gemma_jax import exits
from gemma_jax.exits import EXIT_PREEMPTED
from launch import libtpu_flags

REMOTE_DIR = "~/gemma-jax"
REMOTE_ARCHIVE = "~/gemma-jax.tar.gz"
# Python >= 3.11 is required; TPU VM images ship an older python3, so uv fetches one.
INSTALL = ("python3 -m pip install -q --user uv && "
           "(test -x .venv/bin/python || python3 -m uv venv -q --python 3.11 .venv) && "
           "python3 -m uv pip install -q --python .venv/bin/python -e . 'jax[tpu]~=0.10.2'")
# TPU VM software version by accelerator type prefix (gcloud's --version / --runtime-version).
RUNTIME_VERSIONS = {"v4-": "tpu-ubuntu2204-base", "v5litepod-": "v2-alpha-tpuv5-lite",
                    "v5p-": "v2-alpha-tpuv5", "v6e-": "v2-alpha-tpuv6e"}
COMMANDS = ("create", "setup", "run", "logs", "stop", "status", "delete")


class LaunchError(ValueError):
  """Flags that cannot make a job; the message names the flag."""


def runtime_version(accelerator_type: str) -> str:
  for prefix, version in RUNTIME_VERSIONS.items():
    if accelerator_type.startswith(prefix):
      return version
  raise LaunchError(f"--accelerator-type={accelerator_type}: no default runtime version for it; "
                    f"pass --runtime-version (defaults known for {sorted(RUNTIME_VERSIONS)})")


def _queued(args: argparse.Namespace) -> bool:
  return args.queued or args.slices > 1


def _scope(args: argparse.Namespace) -> list[str]:
  return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def node_names(args: argparse.Namespace) -> list[str]:
  """The TPU VM (slice) names: NAME, or NAME-0 ... NAME-{N-1} for a multi-slice resource."""
  return [args.name] if args.slices == 1 else [f"{args.name}-{i}" for i in range(args.slices)]


def create_command(args: argparse.Namespace) -> list[str]:
  version = args.runtime_version or runtime_version(args.accelerator_type)
  if not _queued(args):
    return ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_scope(args),
            f"--accelerator-type={args.accelerator_type}", f"--version={version}",
            *(["--spot"] if args.spot else [])]
  nodes = ([f"--node-id={args.name}"] if args.slices == 1 else
           [f"--node-count={args.slices}", f"--node-prefix={args.name}"])
  return ["gcloud", "compute", "tpus", "queued-resources", "create", args.name, *_scope(args),
          f"--accelerator-type={args.accelerator_type}", f"--runtime-version={version}", *nodes,
          *(["--spot"] if args.spot else []), *(["--reserved"] if args.reserved else [])]


def delete_command(args: argparse.Namespace) -> list[str]:
  if _queued(args):  # --force: its TPU VMs go with it
    return ["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_scope(args),
            "--force", "--quiet"]
  return ["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_scope(args), "--quiet"]


def status_command(args: argparse.Namespace) -> list[str]:
  if _queued(args):
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name,
            *_scope(args), "--format=value(state.state)"]
  return ["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *_scope(args),
          "--format=value(state)"]


def ssh_command(args: argparse.Namespace, remote: str, worker: str = "all",
                node: str = "all") -> list[str]:
  """`remote` (a shell command line) on `worker` of slice `node` (multi-slice only)."""
  if args.slices > 1:
    return ["gcloud", "compute", "tpus", "queued-resources", "ssh", args.name, *_scope(args),
            f"--node={node}", f"--worker={worker}", f"--command={remote}"]
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_scope(args),
          f"--worker={worker}", f"--command={remote}"]


def scp_commands(args: argparse.Namespace, local: str, remote: str) -> list[list[str]]:
  """Copy `local` to `remote` on every worker, one gcloud call per slice."""
  return [["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{node}:{remote}",
           *_scope(args), "--worker=all"] for node in node_names(args)]


def setup_commands(args: argparse.Namespace, archive: str) -> list[list[str]]:
  """Put the code in REMOTE_DIR on every worker (over what is there: its venv stays), then
  run the install line there."""
  if args.source.startswith("git+"):
    url, _, ref = args.source[len("git+"):].partition("@")
    fetch = (f"(test -d {REMOTE_DIR}/.git || git clone -q {shlex.quote(url)} {REMOTE_DIR}) && "
             f"cd {REMOTE_DIR} && git fetch -q --depth=1 origin {shlex.quote(ref or 'HEAD')} && "
             "git checkout -q FETCH_HEAD")
    return [ssh_command(args, f"set -e; {fetch} && {args.install}")]
  unpack = (f"set -e; mkdir -p {REMOTE_DIR} && tar -xzf {REMOTE_ARCHIVE} -C {REMOTE_DIR} && "
            f"cd {REMOTE_DIR} && {args.install}")
  return [*scp_commands(args, archive, REMOTE_ARCHIVE), ssh_command(args, unpack)]


def trainer_line(args: argparse.Namespace) -> str:
  """The shell line every worker runs in REMOTE_DIR: env, the venv's python, the flags."""
  command = list(args.command)
  if not command:
    raise LaunchError("run: no command; put it after --, e.g. -- python -m trainers.pretrain "
                      "--config configs/gemma_2b.py --workdir /mnt/ckpt/run ...")
  if command[0] in ("python", "python3"):
    command[0] = ".venv/bin/python"
  is_trainer = any(a.startswith("trainers.") for a in command)
  if is_trainer and "--distributed" not in command:
    command.append("--distributed")
  if is_trainer and args.slices > 1 and not any(a.startswith("--config.mesh.dcn_")
                                                for a in command):
    command.append(f"--config.mesh.dcn_data={args.slices}")
  env = {"PYTHONUNBUFFERED": "1", libtpu_flags.ENV: libtpu_flags.DEFAULT}
  for item in args.env:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise LaunchError(f"--env {item!r}: expected KEY=VALUE")
    env[key] = value
  return shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *command])


def run_command(args: argparse.Namespace) -> list[str]:
  line = trainer_line(args)
  if args.detach:  # nohup and env exec: the saved pid is the trainer's
    return ssh_command(args, f"cd {REMOTE_DIR} && nohup {line} > run.log 2>&1 < /dev/null & "
                             "echo $! > run.pid")
  return ssh_command(args, f"cd {REMOTE_DIR} && exec {line}")


def plan(args: argparse.Namespace, archive: str = "<archive of this checkout>") -> list[list[str]]:
  """The gcloud commands `args.action` runs, in order (what --dry-run prints)."""
  if args.action == "create":
    return [create_command(args)]
  if args.action == "setup":
    return setup_commands(args, archive)
  if args.action == "run":
    return [run_command(args)]
  if args.action == "logs":
    # Process 0 (slice 0, worker 0 by default) prints the metrics.
    return [ssh_command(args, f"tail -n +1 -F {REMOTE_DIR}/run.log", worker=args.worker,
                        node="0")]
  if args.action == "stop":
    return [ssh_command(args, f"kill -TERM $(cat {REMOTE_DIR}/run.pid)")]
  if args.action == "status":
    return [status_command(args)]
  return [delete_command(args)]


def pack_checkout(root: Path, out: Path) -> Path:
  """A .tar.gz of the checkout's files as git lists them (tracked + untracked, not ignored)."""
  try:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=root, check=True, capture_output=True)
  except (OSError, subprocess.CalledProcessError) as e:
    raise LaunchError(f"setup: cannot list the files of {root} with git ({e}); use "
                      "--source git+URL[@REF] instead") from e
  with tarfile.open(out, "w:gz") as tar:
    for name in sorted(set(listed.stdout.decode().split("\0")) - {""}):
      if (root / name).is_file():  # deleted but still tracked: skip
        tar.add(root / name, arcname=name)
  return out


def execute(commands: Sequence[Sequence[str]]) -> int:
  """Run each command in turn, output streaming through; stop at the first failure."""
  for command in commands:
    print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
    status = subprocess.call(list(command))
    if status:
      return status
  return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m launch.tpu_vm",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("action", choices=COMMANDS)
  parser.add_argument("--name", required=True, help="TPU VM or queued resource name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default="", help="default: gcloud's configured project")
  parser.add_argument("--accelerator-type", default="v5litepod-256",
                      help="per slice, e.g. v5litepod-256 (a 16x16 v5e pod)")
  parser.add_argument("--runtime-version", default="",
                      help="TPU software version (default: by accelerator type)")
  parser.add_argument("--slices", type=int, default=1,
                      help="slices joined over DCN (> 1: a multi-node queued resource)")
  parser.add_argument("--queued", action="store_true",
                      help="one slice, but through a queued resource (waits for capacity)")
  parser.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
  parser.add_argument("--reserved", action="store_true", help="queued: use a reservation")
  parser.add_argument("--source", default="local",
                      help="setup: 'local' (this checkout) or git+URL[@REF]")
  parser.add_argument("--install", default=INSTALL, help="setup: shell line run in the copy")
  parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="run: an environment variable for the trainer (repeatable)")
  parser.add_argument("--detach", action="store_true",
                      help="run: in the background (see logs / stop)")
  parser.add_argument("--worker", default="0", help="logs: which worker's log (or all)")
  parser.add_argument("--dry-run", action="store_true", help="print the gcloud commands only")
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  args = parser.parse_args(argv[:split])
  args.command = argv[split + 1:]
  if args.slices < 1:
    parser.error(f"--slices={args.slices} must be >= 1")
  if args.command and args.action != "run":
    parser.error(f"a command after -- is for 'run', not {args.action!r}")
  return args


@exits.command("launch.tpu_vm")
def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  try:
    if args.dry_run:
      for command in plan(args):
        print(shlex.join(command))
      return 0
    if args.action == "setup" and args.source == "local":
      with tempfile.TemporaryDirectory() as tmp:
        archive = pack_checkout(Path(__file__).resolve().parents[1],
                                Path(tmp) / "gemma-jax.tar.gz")
        return execute(plan(args, str(archive)))
    status = execute(plan(args))
    if args.action == "run" and status == EXIT_PREEMPTED:
      print(f"launch.tpu_vm: the job was stopped by SIGTERM after saving a checkpoint (status "
            f"{EXIT_PREEMPTED}: preempted); `run` the same command again to resume",
            file=sys.stderr)
    return status
  except LaunchError as e:
    print(f"launch.tpu_vm: {e}", file=sys.stderr)
    return 2
  except FileNotFoundError as e:  # no gcloud
    print(f"launch.tpu_vm: {e.filename or e}: not found; install the Google Cloud CLI or use "
          "--dry-run", file=sys.stderr)
    return 127


if __name__ == "__main__":
  sys.exit(main())
