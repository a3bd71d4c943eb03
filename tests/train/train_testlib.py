"""Shared helpers of the train tests: a tiny MLA model config and subprocess runners."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn import lowrank
from jaxattn.layers import AdapterParam
from train.config import TrainConfig

# the persistent compilation cache, for the training subprocesses only: a restarted run, or a
# finetune whose step equals a pretraining step, reuses compiled programs. It is not switched
# on in the pytest worker itself: the worker also runs other test files, and executables with
# host callbacks (Pallas TPU interpret mode) must never be reloaded from a persistent cache.
# One cache per pytest session, shared by its xdist workers (an entry another process is
# still writing fails to decode; jax warns and compiles the program itself).
_SESSION = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
CACHE_DIR = os.path.join(tempfile.gettempdir(), f"jaxattn_train_tests_jax_cache_{_SESSION}")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# mla-tiny-default shrunk to ~60k parameters so every test step compiles and runs in seconds
TINY_MODEL = (
    "d_model=64",
    "num_layers=2",
    "num_heads=2",
    "mlp_dim=128",
    "kv_lora_rank=32",
    "qk_nope_head_dim=16",
    "qk_rope_head_dim=8",
    "v_head_dim=16",
    "implementation=xla",
)


# a few fast CPU steps of the tiny model; no TensorBoard, plot or samples
TINY_RUN = dict(
    name="test",
    model_overrides=TINY_MODEL,
    seq_len=32,
    batch_size=8,
    steps=6,
    warmup_steps=2,
    log_every=1,
    eval_every=1000,
    eval_batches=2,
    ckpt_every=2,
    tensorboard=False,
    plot=False,
    sample_tokens=0,
)


_FORWARD = nnx.jit(lambda model, tokens: model(tokens))


def forward(model, tokens):
    """``model(tokens)`` as one compiled program (per model structure), as a numpy array: an
    eager call of a whole model compiles every op on its own."""
    return np.asarray(_FORWARD(model, jnp.asarray(tokens)))


def tiny_config(run_dir, **changes) -> TrainConfig:
    """A TrainConfig of ``TINY_RUN`` writing under ``run_dir``, with ``changes``."""
    return TrainConfig(**(TINY_RUN | {"run_dir": str(run_dir)} | changes))


def as_set_args(config_changes: dict) -> list[str]:
    """``--set key=value`` arguments for the command line."""
    args = []
    for key, value in config_changes.items():
        if isinstance(value, tuple):
            value = ",".join(value)
        args += ["--set", f"{key}={value}"]
    return args


def cli_env(num_devices: int, cache_dir=CACHE_DIR) -> dict:
    """Environment of a training subprocess with ``num_devices`` fake CPU devices and the
    persistent compilation cache (so a killed run and its restart compile once)."""
    env = dict(os.environ)
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def pretrain_cmd(run_dir, **changes) -> list[str]:
    """Command line of ``python -m train.pretrain`` for ``TINY_RUN`` with ``changes``."""
    settings = TINY_RUN | {"run_dir": str(run_dir)} | changes
    return [sys.executable, "-m", "train.pretrain", *as_set_args(settings)]


def run_ok(cmd, env, timeout=600) -> str:
    """Run ``cmd``; fail with its output if it exits non-zero. Returns stdout + stderr."""
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A process that imports the training code once and forks one child per run (os.fork before
# any JAX backend exists, single-threaded: OPENBLAS_NUM_THREADS=1), so a test that starts
# many short runs pays Python's and JAX's import time once. Each child calls a command-line
# entry point (``train.pretrain.main(argv)``, ...) with stdout and stderr in a log file; it
# is an ordinary process that can be killed with SIGKILL. Commands (JSON lines on stdin):
# ["start", "module:function", argv, log] answers the child's pid, ["wait", pid] its exit
# code.
_ZYGOTE = r"""
import importlib, json, os, sys, threading, traceback
import models, train.finetune, train.pretrain, train.sample
assert threading.active_count() == 1 and len(os.listdir("/proc/self/task")) == 1
for line in sys.stdin:
    command, *args = json.loads(line)
    if command == "wait":
        print(os.waitstatus_to_exitcode(os.waitpid(args[0], 0)[1]), flush=True)
        continue
    target, argv, log = args
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1), os.dup2(fd, 2)
        try:
            module, function = target.split(":")
            getattr(importlib.import_module(module), function)(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
"""


class Zygote:
    """Starts ``train.pretrain`` runs as forked children of one pre-imported process.

    Usage: ``with Zygote(cli_env(1)) as z: pid = z.start(argv, log); ...; z.wait(pid)``.
    """

    def __init__(self, env: dict):
        here = os.path.dirname(os.path.abspath(__file__))  # targets may live in this module
        path = here + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE],
            env=env | {"OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": path},
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.running: set[int] = set()

    def _ask(self, *command, timeout: float = 600) -> int:
        import json
        import select

        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        # every answer is one line read whole, so nothing waits in stdout's buffer here
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.close()  # a hung run fails its test instead of stalling the suite
            raise AssertionError(f"no answer to {command[:2]} from the zygote in {timeout} s")
        line = self.proc.stdout.readline()
        assert line, f"the zygote died (exit code {self.proc.poll()})"
        return int(line)

    def start(self, argv: list[str], log, target: str = "train.pretrain:main") -> int:
        """Fork a child calling ``target(argv)`` (output in ``log``); its pid."""
        pid = self._ask("start", target, argv, str(log))
        self.running.add(pid)
        return pid

    def run(self, argv: list[str], log, target: str = "train.pretrain:main") -> tuple[int, str]:
        """Run ``target(argv)`` to its end: ``(exit code, output)``."""
        code = self.wait(self.start(argv, log, target))
        return code, open(log).read()

    def wait(self, pid: int) -> int:
        """Exit code of child ``pid`` (negative: killed by that signal)."""
        code = self._ask("wait", pid)  # on a timeout ``pid`` is still running: close kills it
        self.running.discard(pid)
        return code

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Kill the runs still going (a failed test leaves none behind), then end the zygote."""
        import signal

        for pid in self.running:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.running.clear()
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def item_digest(argv: list[str]) -> None:
    """Zygote target, ``argv = [item_dir, out]``: writes to ``out`` (JSON) what orbax alone
    reads of the checkpoint item ``item_dir`` (no jaxattn check): ``[dtype, shape, sha256]``
    of every leaf, or ``{"error": message}``. Reading a corrupted checkpoint in a child keeps
    orbax's failed reads (and their leftover async tasks) out of the pytest process."""
    import hashlib
    import json

    import numpy as np
    import orbax.checkpoint as ocp

    item_dir, out = argv
    try:
        tree = ocp.PyTreeCheckpointer().restore(item_dir)
        leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
        result = [[str(x.dtype), list(x.shape), hashlib.sha256(x.tobytes()).hexdigest()]
                  for x in leaves]  # fmt: skip
    except Exception as err:  # noqa: BLE001 - an unreadable item is a result
        result = {"error": f"{type(err).__name__}: {err}"[:500]}
    with open(out, "w") as f:
        json.dump(result, f)


def set_args(changes: dict) -> list[str]:
    """``--set`` arguments of ``TINY_RUN`` with ``changes`` (for ``Zygote.start``)."""
    return as_set_args(TINY_RUN | changes)


def abstract_params(config: TrainConfig | None = None) -> dict:
    """Pure dict of ShapeDtypeStructs: the parameters of ``config``'s model (``TINY_RUN``)."""
    from flax import nnx

    from train.pretrain import build_model

    _, model_fn = build_model(config or TrainConfig(**TINY_RUN))
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(model_fn)
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def flip_bytes(path, count: int = 3000) -> None:
    """XOR ``count`` bytes of the file ``path`` with 0xFF, from a quarter of its length on."""
    data = bytearray(open(path, "rb").read())
    start = len(data) // 4
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)


def largest_file(directory) -> str:
    """The largest file under ``directory`` (for a step's ``params/``: its biggest data file)."""
    files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
    return max(files, key=os.path.getsize)


class Bigram(nnx.Module):
    """The smallest language model the trainer accepts: next-token logits from a table. The
    loop and step logic is the same for every model; this one compiles in a second."""

    def __init__(self, rngs: nnx.Rngs):
        self.table_VV = nnx.Param(jax.random.normal(rngs.params(), (256, 256)) * 0.02)

    def __call__(self, tokens_BT, *, rng=None):  # the trainer passes a per-step key
        return self.table_VV[tokens_BT]


def bigram() -> Bigram:
    """A fresh :class:`Bigram` (a ``model_fn`` for ``train_loop``)."""
    return Bigram(nnx.Rngs(0))


# fine-tuning into extra leaves: a low-rank adapter on every query projection, trained alone
RULES = ("adamw:/adapter/", "frozen:.*")  # train the adapters only


class LowRank(nnx.Module):
    """A test-local adapter ``W -> W + a·b`` with b = 0 at birth (an exact no-op)."""

    def __init__(self, linear, rank: int = 2):
        self.a = AdapterParam(jax.random.normal(jax.random.key(1), (linear.fan_in, rank)) * 0.3)
        self.b = AdapterParam(jnp.zeros((rank, linear.fan_out)))

    def delta(self, x, ctx, *, base):  # a projection with one input dim: x [..., D]
        return (x @ self.a[...] @ self.b[...]).reshape(*x.shape[:-1], *base.shape[1:])

    def delta_kernel(self, base):
        return (self.a[...] @ self.b[...]).reshape(base.shape)


def extend(model):
    """Attach a :class:`LowRank` to every ``attn/q`` of ``model`` (``finetune.run(extend=)``)."""
    lowrank.attach(model, r"attn/q$", lambda path, linear: LowRank(linear))
